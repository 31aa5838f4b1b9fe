"""Whole photos at their own aspect ratio against the square center crop (issue 20).

    python benchmarks/bench_native_aspect.py --out bench/                 # the packaged default, a few minutes on a CPU
    python benchmarks/bench_native_aspect.py --out bench/ --model vit_vq:default-v1 --photos DIR ...

For each held-out photo, three views go through `encode` / `decode` and are scored against
themselves (PSNR and SSIM of the reconstruction against the view that was coded):
* `crop`: `preprocess(resize="crop")`, the square S x S center crop every model has always coded;
* `native S`: `preprocess(resize="native")`, the whole photo, short side S (the model's size);
* `native 2S`: the whole photo, short side 2S.
Bits per pixel are the same in each case: log2(codebook_size) bits per patch.

The photos: the held-out photos of the packaged default that are on this machine (the bundled samples'
originals from scikit-image / scikit-learn / `lomiri-wallpapers-16.04`, the held-out `opencv-doc`
photos `bench_codecs.py` uses plus `squirrel_cls.jpg`, matplotlib's `grace_hopper.jpg`), or
`--photos`. Writes `native_aspect.json` and `native_aspect.md` into `--out`.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
from pathlib import Path

import torch
from PIL import Image

from vit_vq import ViTVQTokenizer
from vit_vq.data import load_image
from vit_vq.metrics import psnr, ssim

SUFFIXES = (".jpg", ".jpeg", ".png")
OPENCV_DATA = Path("/usr/share/doc/opencv-doc/examples/data")
OPENCV_HELDOUT = ("squirrel_cls.jpg", "home.jpg", "stuff.jpg", "licenseplate_motion.jpg", "blox.jpg")
LOMIRI = Path("/usr/share/backgrounds")
LOMIRI_HELDOUT = ("picosdeeuropa_by_Aitzol_Berasategi.jpg", "seeding_by_Clements_Engelhardt.jpg")


def default_photos(root: Path) -> list[tuple[str, object]]:
    """`(name, image)` of the packaged default's held-out colour photos found on this machine.

    `root` is prepended to the Debian paths (a `dpkg -x` folder), `/` for installed packages.
    """
    import matplotlib
    import skimage.data
    from sklearn.datasets import load_sample_images

    photos: list[tuple[str, object]] = [(f"skimage_{n}", getattr(skimage.data, n)()) for n in ("astronaut", "chelsea", "coffee")]
    photos.append(("sklearn_china", load_sample_images().images[0]))
    for folder, names, prefix in ((LOMIRI, LOMIRI_HELDOUT, "lomiri"), (OPENCV_DATA, OPENCV_HELDOUT, "opencv")):
        for name in names:
            path = root / folder.relative_to("/") / name
            if path.is_file():
                photos.append((f"{prefix}_{Path(name).stem}", load_image(path)))
    grace = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    photos.append(("matplotlib_grace_hopper", Image.open(grace)))
    return photos


def views(tok: ViTVQTokenizer, image: object) -> dict[str, torch.Tensor]:
    S = tok.config.image_size
    return {
        f"crop {S}": tok.preprocess(image)[0],
        f"native {S}": tok.preprocess(image, "native")[0],
        f"native {2 * S}": tok.preprocess(image, "native", short_side=2 * S)[0],
    }


def score(tok: ViTVQTokenizer, view: torch.Tensor) -> dict[str, float]:
    codes = tok.encode(view[None])
    recon = tok.decode(codes)
    return {
        "psnr": float(psnr(recon, view[None])[0]),
        "ssim": float(ssim(recon, view[None])[0]),
        "grid": list(codes.shape[1:]),
    }


def summary(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.2f}" if values else "-"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f} ({min(values):.2f}–{max(values):.2f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="vit_vq:default")
    parser.add_argument("--photos", type=Path, nargs="*", help="files or folders instead of the held-out set")
    parser.add_argument("--debian-root", type=Path, default=Path("/"), help="where the Debian photo packages are unpacked")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    tok = ViTVQTokenizer.from_pretrained(args.model)
    if args.photos:
        files = [f for p in args.photos for f in (sorted(p.iterdir()) if p.is_dir() else [p]) if f.suffix.lower() in SUFFIXES]
        photos = [(f.stem, load_image(f)) for f in files]
    else:
        photos = default_photos(args.debian_root)
    rows = []
    for name, image in photos:
        row = {"photo": name}
        for view_name, view in views(tok, image).items():
            row[view_name] = score(tok, view)
        rows.append(row)
        print(name, {k: (round(v["psnr"], 2), v["grid"]) for k, v in row.items() if k != "photo"}, file=sys.stderr)
    names = [k for k in rows[0] if k != "photo"]
    bits = math.log2(tok.config.codebook_size) / tok.config.patch_size**2
    lines = [
        f"Model `{args.model}`, {len(rows)} photos, {bits:.4f} bits per pixel in every view "
        f"(torch {torch.__version__}, {platform.machine()}). Mean ± standard deviation (min–max) over photos.",
        "",
        "| view | PSNR dB | SSIM |",
        "|---|---|---|",
    ]
    for n in names:
        lines.append(f"| {n} | {summary([r[n]['psnr'] for r in rows])} | {summary([r[n]['ssim'] for r in rows])} |")
    lines += ["", "| photo | " + " | ".join(f"{n} (grid)" for n in names) + " |", "|---" * (len(names) + 1) + "|"]
    for r in rows:
        cells = [f"{r[n]['psnr']:.2f} ({r[n]['grid'][0]}x{r[n]['grid'][1]})" for n in names]
        lines.append(f"| {r['photo']} | " + " | ".join(cells) + " |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "native_aspect.json").write_text(json.dumps({"model": args.model, "rows": rows}, indent=2) + "\n")
    (args.out / "native_aspect.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
