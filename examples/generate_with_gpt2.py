"""Train a tiny GPT-2 on image codes and sample new images.

1. Tokenize a small image set with a vit_vq tokenizer (a folder of yours with `--data`,
   else crops of the photos bundled with scikit-image / scikit-learn).
2. Lay each code grid out as a flat sequence `BOS c_0 ... c_{h*w-1} EOS` (`vit_vq.tokens.TokenLayout`).
3. Train a small `transformers.GPT2LMHeadModel` on those sequences.
4. Sample new sequences from `layout.prompt()` (BOS) with every non-code id suppressed, map the
   whole `generate` output back to grids with `layout.to_codes` and decode them to images:
   `OUT/samples.png` (training images in the top row).

Mixed shapes (`--resize native`): each image is coded whole at its own aspect ratio, so grids
differ in shape. The grid shape goes in as a prefix: one conditioning token per `(h, w)` shape
seen in training (`TokenLayout(num_conditions=<shapes>, condition_len=1)`), so a sequence is
`BOS <shape k> c_0 ... c_{h*w-1} EOS` with the codes row-major. Sequences of different lengths are
padded with EOS and the padding is left out of the loss. To sample, pick a shape, start from
`layout.prompt(k)` and generate exactly `h * w` codes, then reshape them to `[h, w]`.

Only public API is used: `ViTVQTokenizer`, `vit_vq.tokens.TokenLayout`, `vit_vq.preprocess`, `vit_vq.data`.

    python examples/generate_with_gpt2.py --model org/tokenizer --out gpt2_samples --steps 500

A tokenizer trained on real images gives recognisable textures after a few hundred steps
on a GPU; with a handful of images the model mostly memorises them, which is the point of
a smoke test. For real work pre-tokenize with `vit-vq tokenize` and read the shards with
`vit_vq.pipeline.iter_shards`.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from vit_vq import ViTVQTokenizer
from vit_vq.preprocess import native_size, resize_center_crop, resize_to, to_tensor
from vit_vq.tokens import TokenLayout

ASPECTS = ((1, 1), (2, 3), (3, 2))  # (h, w) ratios of the bundled-photo crops under --resize native


def photo_crops(size: int, count: int, seed: int = 0) -> torch.Tensor:
    """`count` random crops `[count, 3, size, size]` in [0, 1] of the photos shipped with scikit-image/-learn."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    names = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry")
    photos = [getattr(skimage.data, n)()[..., :3] for n in names] + list(load_sample_images().images)
    gen = torch.Generator().manual_seed(seed)
    crops = []
    for i in range(count):
        img = resize_center_crop(to_tensor(photos[i % len(photos)]), size * 2)
        top, left = (int(v) for v in torch.randint(0, size + 1, (2,), generator=gen))
        crops.append(img[:, top : top + size, left : left + size])
    return torch.stack(crops)


def mixed_photo_crops(size: int, patch: int, count: int) -> list[torch.Tensor]:
    """`count` crops `[3, H, W]` of the bundled photos at the aspect ratios of `ASPECTS`, short side `size`."""
    squares = photo_crops(size * 3 // 2, count)  # (count, 3, 1.5 S, 1.5 S)
    crops = []
    for i, square in enumerate(squares):
        ah, aw = ASPECTS[i % len(ASPECTS)]
        h, w = native_size(ah * 64, aw * 64, size, patch)
        side = square.shape[-1]
        crop = square[:, : side * ah // max(ah, aw), : side * aw // max(ah, aw)]
        crops.append(resize_to(crop, (h, w)))
    return crops


def load_images(data: str | None, size: int, count: int, resize: str = "crop", patch: int = 1) -> list[torch.Tensor]:
    """`count` images `[3, H, W]`: the first `count` of a folder, or photo crops; square (`"crop"`) or
    whole at their own aspect ratio, short side `size` (`"native"`)."""
    if data is None:
        return list(photo_crops(size, count)) if resize == "crop" else mixed_photo_crops(size, patch, count)
    from vit_vq.data import list_images, load_image

    files = list_images(data)[:count]
    if not files:
        raise SystemExit(f"error: no images in {data!r}")
    images = [load_image(f) for f in files]
    if resize == "crop":
        return [resize_center_crop(im, size) for im in images]
    return [resize_to(im, native_size(im.shape[1], im.shape[2], size, patch)) for im in images]


def shape_layout(config: Any, shapes: list[tuple[int, int]]) -> TokenLayout:
    """BOS, the grid shape as one conditioning token when there are several shapes, the codes, EOS."""
    several = len(shapes) > 1
    return TokenLayout.for_config(config, bos=True, eos=True, num_conditions=len(shapes) if several else 0,
                                  condition_len=int(several))


def to_sequences(
    grids: list[torch.Tensor], shapes: list[tuple[int, int]], layout: TokenLayout
) -> tuple[torch.Tensor, torch.Tensor]:
    """Code grids `[h, w]` -> `(token ids [N, L], labels [N, L])`, L the longest sequence.

    One shape: `layout.to_tokens`, labels = ids. Several: `BOS <shape> codes EOS`, padded with EOS,
    the padding labelled -100 (left out of the loss).
    """
    if layout.condition_len == 0:
        tokens = layout.to_tokens(torch.stack(grids))  # (N, 1 + h*w + 1)
        return tokens, tokens
    rows = []
    for grid in grids:
        prefix = layout.prompt([shapes.index(tuple(grid.shape))])[0]  # (2,): BOS, shape token
        rows.append(torch.cat([prefix, grid.reshape(-1) + layout.offset, torch.tensor([layout.eos_id])]))
    length = max(len(r) for r in rows)
    tokens = torch.full((len(rows), length), layout.eos_id, dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = row
        labels[i, : len(row)] = row
    return tokens, labels


def build_gpt2(layout: TokenLayout, length: int, width: int, layers: int, heads: int) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=layout.vocab_size, n_positions=length, n_embd=width, n_layer=layers, n_head=heads,
        bos_token_id=layout.bos_id, eos_token_id=layout.eos_id, pad_token_id=layout.eos_id,
    )
    return GPT2LMHeadModel(config)


def train(
    model: Any, sequences: torch.Tensor, labels: torch.Tensor, steps: int, batch_size: int, lr: float, log_every: int
) -> list[float]:
    """Next-token training on `[N, L]` sequences (labels -100 where padded); returns the loss of every step."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    gen = torch.Generator().manual_seed(0)
    losses = []
    model.train()
    for step in range(steps):
        pick = torch.randint(0, len(sequences), (batch_size,), generator=gen)
        batch = sequences[pick].to(model.device)  # (b, L)
        loss = model(input_ids=batch, labels=labels[pick].to(model.device)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"step {step:5d}  loss {losses[-1]:.3f}")
    return losses


@torch.no_grad()
def sample(
    model: Any, layout: TokenLayout, shapes: list[tuple[int, int]], count: int, temperature: float, top_k: int
) -> list[torch.Tensor]:
    """`count` new code grids, shapes taken in turn from `shapes`: exactly `h*w` code tokens after the
    prompt (BOS, and the shape token when there are several shapes), non-code ids suppressed."""
    model.eval()
    grids: list[torch.Tensor] = [torch.empty(0)] * count
    for k, (h, w) in enumerate(shapes):
        positions = list(range(k, count, len(shapes)))
        if not positions:
            continue
        conditions = [k] * len(positions) if layout.condition_len else None
        start = layout.prompt(conditions, batch_size=len(positions)).to(model.device)  # (n, prefix_len)
        out = model.generate(
            input_ids=start, attention_mask=torch.ones_like(start), do_sample=True, temperature=temperature,
            top_k=top_k, max_new_tokens=h * w, min_new_tokens=h * w, suppress_tokens=layout.non_code_ids,
            pad_token_id=layout.eos_id,
        ).cpu()  # (n, prefix_len + h*w): the prompt, then the codes
        if layout.condition_len == 0:
            codes = layout.to_codes(out)  # (n, h, w)
        else:
            codes = (out[:, layout.prefix_len :] - layout.offset).view(len(positions), h, w)
            if bool(((codes < 0) | (codes >= layout.codebook_size)).any()):
                raise RuntimeError("a sampled token is not a code id although non-code ids were suppressed")
        for j, i in enumerate(positions):
            grids[i] = codes[j]
    return grids


def save_grid(rows: list[list[torch.Tensor]], path: Path, pad: int = 2) -> Path:
    """Rows of float images `[3, H, W]` in [0, 1] (any sizes, each in a cell of the largest) -> one PNG on white."""
    H = max(img.shape[1] for row in rows for img in row)
    W = max(img.shape[2] for row in rows for img in row)
    n = max(len(row) for row in rows)
    grid = torch.ones(3, len(rows) * (H + pad) + pad, n * (W + pad) + pad)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            top, left = pad + i * (H + pad), pad + j * (W + pad)
            grid[:, top : top + img.shape[1], left : left + img.shape[2]] = img.clamp(0, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((grid.permute(1, 2, 0) * 255).round().byte().numpy()).save(path)  # (H, W, 3)
    return path


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="tokenizer: Hub id or folder (default: the built-in one)")
    p.add_argument("--data", default=None, help="image folder (default: crops of bundled photos)")
    p.add_argument("--out", default="gpt2_samples", help="output folder")
    p.add_argument("--images", type=int, default=64, help="training images")
    p.add_argument("--steps", type=int, default=300, help="training steps")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--width", type=int, default=128, help="GPT-2 width (n_embd)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--samples", type=int, default=8, help="images to sample")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = sample from the whole distribution")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resize", choices=("crop", "native"), default="crop",
                   help="crop: square crops; native: whole images at their own aspect ratio (grids of several shapes)")
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)

    tok = ViTVQTokenizer.default() if args.model is None else ViTVQTokenizer.from_pretrained(args.model)
    tok = tok.to(args.device).eval()
    cfg = tok.config
    images = load_images(args.data, cfg.image_size, args.images, args.resize, cfg.patch_size)  # [3, H, W] each
    grids = [g.cpu() for g in tok.encode([im.to(args.device) for im in images])]  # [h, w] each, coded by shape
    shapes = sorted({tuple(g.shape) for g in grids})
    layout = shape_layout(cfg, shapes)
    sequences, labels = to_sequences(grids, shapes, layout)  # (N, L)
    lengths = "" if len(shapes) == 1 else f" (longest; {len(shapes)} grid shapes, each a conditioning token)"
    print(f"{len(images)} images -> sequences of {sequences.shape[1]} tokens{lengths}, vocabulary {layout.vocab_size}")

    model = build_gpt2(layout, sequences.shape[1], args.width, args.layers, args.heads).to(args.device)
    losses = train(model, sequences, labels, args.steps, args.batch_size, args.lr, log_every=max(1, args.steps // 10))
    sampled = sample(model, layout, shapes, args.samples, args.temperature, args.top_k)  # [h, w] each
    generated = [im.cpu() for im in tok.decode([g.to(args.device) for g in sampled])]  # [3, h*p, w*p] each

    out = Path(args.out)
    reference = images[: args.samples]
    path = save_grid([reference, generated], out / "samples.png")
    print(f"wrote {path} (top: training images, bottom: samples)")
    codes: Any = torch.stack(sampled) if len(shapes) == 1 else sampled
    return {"losses": losses, "codes": codes, "images": torch.stack(generated) if len(shapes) == 1 else generated,
            "png": path, "shapes": shapes}


if __name__ == "__main__":
    main()
