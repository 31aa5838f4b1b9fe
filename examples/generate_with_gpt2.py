"""Train a tiny GPT-2 on image codes and sample new images.

1. Tokenize a small image set with a vit_vq tokenizer (a folder of yours with `--data`,
   else crops of the photos bundled with scikit-image / scikit-learn).
2. Lay each code grid out as a flat sequence `BOS c_0 ... c_{h*w-1} EOS` (`vit_vq.tokens.TokenLayout`).
3. Train a small `transformers.GPT2LMHeadModel` on those sequences.
4. Sample new sequences from `layout.prompt()` (BOS) with every non-code id suppressed, map the
   whole `generate` output back to grids with `layout.to_codes` and decode them to images:
   `OUT/samples.png` (training images in the top row).

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
from vit_vq.preprocess import resize_center_crop, to_tensor
from vit_vq.tokens import TokenLayout


def photo_crops(size: int, count: int, seed: int = 0) -> torch.Tensor:
    """`count` random crops `[count, 3, size, size]` in [0, 1] of the photos shipped with scikit-image/-learn."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    names = ("astronaut", "coffee", "chelsea", "rocket", "cat", "immunohistochemistry")
    photos = [getattr(skimage.data, n)()[..., :3] for n in names] + list(load_sample_images().images)
    gen = torch.Generator().manual_seed(seed)
    crops = []
    for i in range(count):
        img = resize_center_crop(to_tensor(photos[i % len(photos)]), size * 2)
        top, left = (int(v) for v in torch.randint(0, size + 1, (2,), generator=gen))
        crops.append(img[:, top : top + size, left : left + size])
    return torch.stack(crops)


def load_images(data: str | None, size: int, count: int) -> torch.Tensor:
    """`[N, 3, size, size]` images: the first `count` of a folder, or photo crops."""
    if data is None:
        return photo_crops(size, count)
    from vit_vq.data import list_images, load_image

    files = list_images(data)[:count]
    if not files:
        raise SystemExit(f"error: no images in {data!r}")
    return torch.stack([resize_center_crop(load_image(f), size) for f in files])


def build_gpt2(layout: TokenLayout, width: int, layers: int, heads: int) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=layout.vocab_size, n_positions=layout.seq_len, n_embd=width, n_layer=layers, n_head=heads,
        bos_token_id=layout.bos_id, eos_token_id=layout.eos_id, pad_token_id=layout.eos_id,
    )
    return GPT2LMHeadModel(config)


def train(model: Any, sequences: torch.Tensor, steps: int, batch_size: int, lr: float, log_every: int) -> list[float]:
    """Next-token training on `[N, L]` sequences; returns the loss of every step."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    gen = torch.Generator().manual_seed(0)
    losses = []
    model.train()
    for step in range(steps):
        batch = sequences[torch.randint(0, len(sequences), (batch_size,), generator=gen)].to(model.device)  # (b, L)
        loss = model(input_ids=batch, labels=batch).loss
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
def sample(model: Any, layout: TokenLayout, count: int, temperature: float, top_k: int) -> torch.Tensor:
    """`count` new code grids `[count, h, w]`: exactly `h*w` code tokens after BOS, non-code ids suppressed."""
    model.eval()
    start = layout.prompt(batch_size=count).to(model.device)  # (count, 1): BOS
    out = model.generate(
        input_ids=start, attention_mask=torch.ones_like(start), do_sample=True, temperature=temperature, top_k=top_k,
        max_new_tokens=layout.num_codes, min_new_tokens=layout.num_codes, suppress_tokens=layout.non_code_ids,
        pad_token_id=layout.eos_id,
    )  # (count, 1 + h*w): BOS, then the codes
    return layout.to_codes(out.cpu())


def save_grid(rows: list[torch.Tensor], path: Path, pad: int = 2) -> Path:
    """Rows of float images `[n, 3, S, S]` in [0, 1] -> one PNG on white, `pad` pixels between images."""
    n, _, S, _ = rows[0].shape
    grid = torch.ones(3, len(rows) * (S + pad) + pad, n * (S + pad) + pad)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            top, left = pad + i * (S + pad), pad + j * (S + pad)
            grid[:, top : top + S, left : left + S] = img.clamp(0, 1)
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
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)

    tok = ViTVQTokenizer.default() if args.model is None else ViTVQTokenizer.from_pretrained(args.model)
    tok = tok.to(args.device).eval()
    cfg = tok.config
    images = load_images(args.data, cfg.image_size, args.images)  # (N, 3, S, S)
    codes = torch.cat([tok.encode(images[i : i + 64].to(args.device)).cpu() for i in range(0, len(images), 64)])  # (N, h, w)
    layout = TokenLayout.for_config(cfg, bos=True, eos=True)
    sequences = layout.to_tokens(codes)  # (N, 1 + h*w + 1)
    print(f"{len(images)} images -> sequences of {layout.seq_len} tokens, vocabulary {layout.vocab_size}")

    model = build_gpt2(layout, args.width, args.layers, args.heads).to(args.device)
    losses = train(model, sequences, args.steps, args.batch_size, args.lr, log_every=max(1, args.steps // 10))
    sampled = sample(model, layout, args.samples, args.temperature, args.top_k)  # (samples, h, w)
    generated = tok.decode(sampled.to(args.device)).cpu()  # (samples, 3, S, S)

    out = Path(args.out)
    reference = images[: args.samples]
    path = save_grid([reference, generated], out / "samples.png")
    print(f"wrote {path} (top: training images, bottom: samples)")
    return {"losses": losses, "codes": sampled, "images": generated, "png": path}


if __name__ == "__main__":
    main()
