"""The tokenizer against JPEG, WebP and AVIF at the tokenizer's exact byte budget per image.

    python benchmarks/bench_codecs.py --out OUT                                # the packaged default
    python benchmarks/bench_codecs.py --out OUT --model old=FOLDER --model new=FOLDER --photos DIR ...

Every photo is resized (short side) and center-cropped to the model's side S, as users feed
it, and rounded to 8 bits: that is the reference. The tokenizer's budget is its code stream,
`num_tokens x ceil(log2(codebook_size))` bits (128 px, 256 codes of 12 bits: 384 bytes, 0.1875
bits per pixel); its reconstruction is rounded to 8 bits too.

Each codec (Pillow: JPEG with `optimize=True`, WebP with `method=6`, AVIF at Pillow's default
speed; 4:2:0 chroma for all) encodes the photo twice: at full resolution, and at half resolution
(Lanczos down) decoded and upsampled bicubically to S. Whole files are counted, headers included.
The quality is bisected to the largest one whose file fits the budget; the metrics are then
interpolated linearly in file size between that quality and the next one up (which overshoots),
so every codec is scored at exactly the budget. A codec whose smallest file is over the budget
"cannot reach" that photo and is averaged over the photos it reaches (column `reached`).

Metrics (`vit_vq.metrics`): PSNR, SSIM, and blockiness (mean absolute pixel step across the
tokenizer's patch boundaries over the mean step inside patches, both directions; originals
score about 1). Per tokenizer also: codes used on these photos and the code perplexity.

Writes `bench_codecs.json`, `bench_codecs.md` and `bench_codecs.png` (original | tokenizer(s)
| WebP at the same bytes, zoomed with nearest-neighbour pixels) into `--out`.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from vit_vq import ViTVQTokenizer
from vit_vq.metrics import blockiness, psnr, ssim

SUFFIXES = (".jpg", ".jpeg", ".png")
# codec -> (Pillow format, lowest and highest quality, encoder options)
CODECS: dict[str, tuple[str, int, int, dict[str, Any]]] = {
    "JPEG": ("JPEG", 1, 100, {"optimize": True}),
    "WebP": ("WEBP", 0, 100, {"method": 6}),
    "AVIF": ("AVIF", 0, 100, {}),
}
# Real photographs the packaged default never trained on, besides the bundled samples (opencv-doc).
OPENCV_DATA = Path("/usr/share/doc/opencv-doc/examples/data")
EXTRA_HELDOUT = ("home.jpg", "stuff.jpg", "licenseplate_motion.jpg", "basketball1.png", "box_in_scene.png", "blox.jpg")
METRICS = ("psnr", "ssim", "blockiness")


@dataclass
class Coded:
    """One encoding: the file's bytes and the decoded image, float `[3, S, S]` on the 8-bit grid."""

    size: int
    image: torch.Tensor


def to_pil(x: torch.Tensor) -> Image.Image:
    return Image.fromarray(x.mul(255).round().clamp(0, 255).byte().permute(1, 2, 0).numpy())


def from_pil(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1).contiguous()


def encode(ref: Image.Image, codec: str, quality: int, half: bool) -> Coded:
    fmt, _, _, options = CODECS[codec]
    S = ref.width
    src = ref.resize((S // 2, S // 2), Image.Resampling.LANCZOS) if half else ref
    buf = io.BytesIO()
    src.save(buf, fmt, quality=quality, **options)
    with Image.open(io.BytesIO(buf.getvalue())) as im:
        out = im.convert("RGB")
    if half:
        out = out.resize((S, S), Image.Resampling.BICUBIC)
    return Coded(len(buf.getvalue()), from_pil(out))


def scores(x: torch.Tensor, ref: torch.Tensor, block: int) -> dict[str, float]:
    x, ref = x[None], ref[None]
    return {"psnr": psnr(x, ref).item(), "ssim": ssim(x, ref).item(), "blockiness": blockiness(x, block=block).item()}


def at_budget(ref: Image.Image, codec: str, half: bool, budget: int, block: int) -> dict[str, Any] | None:
    """The codec's scores interpolated to exactly `budget` bytes, or None if its smallest file is larger."""
    _, lo, hi, _ = CODECS[codec]
    target = from_pil(ref)
    low = encode(ref, codec, lo, half)
    if low.size > budget:
        return None
    top = encode(ref, codec, hi, half)
    if top.size <= budget:
        return {"quality": float(hi), "bytes": top.size, **scores(top.image, target, block), "fitting": top}
    low_q, high_q, high = lo, hi, top  # invariant: low fits, high does not
    while high_q - low_q > 1:
        mid_q = (low_q + high_q) // 2
        mid = encode(ref, codec, mid_q, half)
        if mid.size <= budget:
            low_q, low = mid_q, mid
        else:
            high_q, high = mid_q, mid
    t = (budget - low.size) / (high.size - low.size)
    a, b = scores(low.image, target, block), scores(high.image, target, block)
    return {"quality": low_q + t * (high_q - low_q), "bytes": budget, **{k: a[k] + t * (b[k] - a[k]) for k in METRICS},
            "fitting": low, "fitting_quality": low_q, "fitting_bytes": low.size}


def read_photos(paths: list[Path], size: int) -> dict[str, Image.Image]:
    """Name -> the 8-bit `size` px view users feed (short side resized, center crop); the first path of a name wins."""
    from vit_vq.preprocess import preprocess

    files: list[Path] = []
    for p in paths:
        files += sorted(f for f in p.iterdir() if f.suffix.lower() in SUFFIXES) if p.is_dir() else [p]
    photos: dict[str, Image.Image] = {}
    for f in files:
        name = f.stem if f.parent != OPENCV_DATA else f"opencv_{f.stem}"
        if name not in photos:
            with Image.open(f) as im:
                photos[name] = to_pil(preprocess(im.convert("RGB"), size)[0])
    if not photos:
        raise SystemExit(f"no photos found in {[str(p) for p in paths]}")
    return photos


@torch.no_grad()
def run_tokenizer(tok: ViTVQTokenizer, photos: dict[str, Image.Image]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    x = torch.stack([from_pil(im) for im in photos.values()]).to(next(tok.parameters()).device)
    codes = tok.encode(x)
    recon = tok.decode(codes).float().clamp(0, 1).cpu()
    recon = recon.mul(255).round().div(255)  # the 8-bit image a user saves
    return dict(zip(photos, recon, strict=True)), codes.cpu()


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarise(per_photo: dict[str, dict[str, Any] | None], n: int) -> dict[str, Any]:
    reached = {k: v for k, v in per_photo.items() if v is not None}
    return {"reached": len(reached), "of": n, **{m: mean([v[m] for v in reached.values()]) for m in METRICS}}


def picture(
    photos: dict[str, Image.Image], columns: dict[str, dict[str, torch.Tensor]], rows: list[str], zoom: int
) -> Image.Image:
    S, label_h = next(iter(photos.values())).width * zoom, 16
    sheet = Image.new("RGB", (S * len(columns), (S + label_h) * len(rows)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, name in enumerate(rows):
        for c, (label, images) in enumerate(columns.items()):
            tile = to_pil(images[name]).resize((S, S), Image.Resampling.NEAREST)
            x, y = c * S, r * (S + label_h)
            sheet.paste(tile, (x, y + label_h))
            draw.text((x + 3, y + 2), f"{label}  ({name})" if c == 0 else label, fill="black")
    return sheet


def markdown(record: dict[str, Any]) -> str:
    lines = [
        f"Budget: {record['budget_bytes']} bytes per {record['image_size']} px image "
        f"({8 * record['budget_bytes'] / record['image_size'] ** 2:.4f} bits per pixel), {record['num_photos']} held-out photos.",
        "",
        "| method | reached | PSNR dB | SSIM | blockiness | PSNR minus the tokenizer's (dB, photos reached) "
        "| tokenizer has the higher PSNR |",
        "|---|---|---|---|---|---|---|",
    ]

    def cell(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    first = next(iter(record["tokenizers"]))
    for label, row in record["rows"].items():
        d = row.get("vs_tokenizer", {})
        lines.append(
            f"| {label} | {row['reached']}/{row['of']} | {cell(row['psnr'], '.2f')} | {cell(row['ssim'], '.3f')} | "
            f"{cell(row['blockiness'], '.2f')} | {cell(d.get('psnr_delta'), '+.2f')} | "
            f"{d.get('tokenizer_wins', '-')}{'/' + str(row['reached']) if d else ''} |"
        )
    lines += ["", f"The last two columns compare with `{first}`, on the photos the codec reached.", "",
              "| tokenizer | codes used on these photos | perplexity |", "|---|---|---|"]
    for label, t in record["tokenizers"].items():
        lines.append(f"| {label} | {t['codes_used']} of {t['codebook_size']} ({100 * t['usage']:.1f}%) | {t['perplexity']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model", action="append", default=[], metavar="LABEL=FOLDER",
                   help="a tokenizer to score (repeatable); default: the packaged default")
    p.add_argument("--photos", type=Path, action="append", default=[], metavar="PATH",
                   help="held-out photos (folders or files; repeatable); default: the bundled samples and "
                        f"{', '.join(EXTRA_HELDOUT)} from {OPENCV_DATA} where installed")
    p.add_argument("--picture-rows", type=int, default=4)
    p.add_argument("--zoom", type=int, default=2)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    from vit_vq.default_model import default_model_dir

    models = dict(m.split("=", 1) for m in args.model) if args.model else {"default": str(default_model_dir())}
    toks = {label: ViTVQTokenizer.from_pretrained(folder, map_location=args.device).eval() for label, folder in models.items()}
    configs = {t.config.image_size for t in toks.values()}, {t.config.patch_size for t in toks.values()}
    if len(configs[0]) != 1 or len(configs[1]) != 1:
        raise SystemExit(f"the tokenizers differ in image or patch size: {configs}; compare like with like")
    cfg = next(iter(toks.values())).config
    S, block = cfg.image_size, cfg.patch_size
    budgets = {t.config.num_tokens * math.ceil(math.log2(t.config.codebook_size)) // 8 for t in toks.values()}
    if len(budgets) != 1:
        raise SystemExit(f"the tokenizers have different byte budgets {sorted(budgets)}")
    budget = budgets.pop()
    extra = [OPENCV_DATA / f for f in EXTRA_HELDOUT if (OPENCV_DATA / f).exists()]
    paths = args.photos or [default_model_dir().parent / "samples", *extra]
    photos = read_photos(paths, S)
    targets = {n: from_pil(im) for n, im in photos.items()}
    n = len(photos)

    per: dict[str, dict[str, dict[str, Any] | None]] = {"original": {k: scores(v, v, block) for k, v in targets.items()}}
    shown: dict[str, dict[str, torch.Tensor]] = {"original": targets}
    tokenizers = {}
    for label, tok in toks.items():
        recon, codes = run_tokenizer(tok, photos)
        per[f"tokenizer ({label})"] = {k: {"bytes": budget, **scores(recon[k], targets[k], block)} for k in photos}
        shown[f"tokenizer ({label}), {budget} B"] = recon
        counts = torch.bincount(codes.flatten(), minlength=tok.config.codebook_size).double()
        prob = counts[counts > 0] / counts.sum()
        tokenizers[label] = {
            "folder": models[label], "codebook_size": tok.config.codebook_size, "codes_used": int((counts > 0).sum()),
            "usage": float((counts > 0).double().mean()), "perplexity": float(torch.exp(-(prob * prob.log()).sum())),
            "decoder_head": tok.config.decoder_head,
        }
    fitting: dict[str, dict[str, torch.Tensor]] = {}
    for codec in CODECS:
        for half in (False, True):
            label = f"{codec} {'half res, bicubic up' if half else 'full res'}"
            results = {k: at_budget(im, codec, half, budget, block) for k, im in photos.items()}
            fitting[label] = {k: r.pop("fitting").image for k, r in results.items() if r is not None}
            per[label] = results

    first = f"tokenizer ({next(iter(toks))})"
    rows = {}
    for label, results in per.items():
        row = summarise(results, n)
        if label != "original" and label != first:
            both = [k for k, v in results.items() if v is not None]
            if both:
                row["vs_tokenizer"] = {
                    "psnr_delta": mean([results[k]["psnr"] - per[first][k]["psnr"] for k in both]),
                    "ssim_delta": mean([results[k]["ssim"] - per[first][k]["ssim"] for k in both]),
                    "tokenizer_wins": sum(per[first][k]["psnr"] > results[k]["psnr"] for k in both),
                }
        rows[label] = row
    record = {
        "image_size": S, "patch_size": block, "budget_bytes": budget, "num_photos": n, "photos": list(photos),
        "tokenizers": tokenizers, "rows": rows, "per_photo": per,
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "pillow": Image.__version__},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_codecs.json").write_text(json.dumps(record, indent=1) + "\n")
    table = markdown(record)
    (args.out / "bench_codecs.md").write_text(table)
    webp = max((lab for lab in fitting if lab.startswith("WebP")), key=lambda lab: (len(fitting[lab]), rows[lab]["psnr"] or 0))
    shown_rows = [k for k in photos if k in fitting[webp]] or list(photos)
    if fitting[webp]:
        shown[f"{webp}, <= {budget} B"] = fitting[webp]
    picture(photos, shown, shown_rows[: args.picture_rows], args.zoom).save(args.out / "bench_codecs.png", optimize=True)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
