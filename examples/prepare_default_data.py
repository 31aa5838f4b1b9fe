"""Collect the photos that train and evaluate the packaged default tokenizer.

Every photo comes from a package that installs here: scikit-image's and scikit-learn's
bundled images, and the photographic wallpapers / sample photos of a few Debian packages.
Install the Debian ones first (`mate-backgrounds` is never used: it is kept for an
independent evaluation):

    apt-get install -y plasma-workspace-wallpapers lomiri-wallpapers-16.04 \\
        lomiri-wallpapers-20.04 opencv-doc
    python examples/prepare_default_data.py --out .data/default_pack

The photos were chosen by eye (abstract, vector and rendered art left out; for a
wallpaper shipped at several sizes only the largest is read). Each is resized so its
short side is at most `--short-side` px and written as a JPEG (quality 95) under
`train/` or `heldout/`, with `manifest.json` recording source, original path, size and
licence. Exact duplicates across sources are refused by an 8x8 average hash.
`HELDOUT` photos are never used for training. `--samples DIR` also writes small copies
of the held-out photos whose licences allow redistribution, for `vit-vq demo`.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

PLASMA = "/usr/share/wallpapers"
LOMIRI = "/usr/share/backgrounds"
OPENCV = "/usr/share/doc/opencv-doc/examples"

# source name -> (how to read it, licence, attribution)
SKIMAGE_COLOR = {
    "astronaut": ("public domain (NASA)", "NASA"),
    "chelsea": ("CC0-1.0", "Stefan van der Walt"),
    "coffee": ("CC0-1.0", "Rachel Michetti, courtesy of Pikolo Espresso Bar"),
    "hubble_deep_field": ("public domain (NASA)", "NASA"),
    "immunohistochemistry": ("public domain", "scikit-image"),
    "retina": ("CC0-1.0", "Mikael Häggström"),
    "rocket": ("public domain (SpaceX)", "SpaceX"),
}
SKIMAGE_GREY = {
    "camera": ("CC0-1.0", "Lav Varshney"),
    "brick": ("CC0-1.0", "CC0Textures"),
    "grass": ("CC0-1.0", "CC0Textures"),
    "gravel": ("CC0-1.0", "CC0Textures"),
    "coins": ("public domain", "Walters Art Museum"),
    "text": ("public domain", "scikit-image"),
}
SKLEARN = {
    "china": ("CC-BY-2.0", "danielbuechele (Flickr)"),
    "flower": ("CC-BY-2.0", "vultilion (Flickr)"),
}
PLASMA_PHOTOS = (
    "BytheWater", "ColdRipple", "ColorfulCups", "DarkestHour", "EveningGlow", "FallenLeaf",
    "Grey", "Kite", "OneStandsOut", "Path", "summer_1am",
)
# file stem -> (licence, author), from /usr/share/doc/lomiri-wallpapers-*/copyright
LOMIRI_PHOTOS = {
    "Bridge_by_Sander_Klootwijk": ("CC-BY-SA-4.0", "Sander Klootwijk"),
    "Dragonfly_by_Bolly": ("CC-BY-SA-4.0", "Bolly"),
    "Picture_0B_by_freespace": ("CC-BY-4.0", "Trevor (Freespace)"),
    "Picture_1A_by_freespace": ("CC-BY-4.0", "Trevor (Freespace)"),
    "Wine_by_Jakkub_Mede": ("CC-BY-4.0", "Jakub Mede"),
    "aitzgorri_by_Aitzol_Berasategi": ("CC-BY-4.0", "Aitzol Berasategi"),
    "analogpattern_by_Peter_Nerlich": ("CC-BY-SA-4.0", "Peter Nerlich"),
    "free_by_Peter_Nerlich": ("CC-BY-SA-4.0", "Peter Nerlich"),
    "friends_by_Aitzol_Berasategi": ("CC-BY-4.0", "Aitzol Berasategi"),
    "greentock_by_Peter_Nerlich": ("CC-BY-SA-4.0", "Peter Nerlich"),
    "life_by_Aitzol_Berasategi": ("CC-BY-4.0", "Aitzol Berasategi"),
    "picosdeeuropa_by_Aitzol_Berasategi": ("CC-BY-4.0", "Aitzol Berasategi"),
    "seeding_by_Clements_Engelhardt": ("CC0-1.0", "Clemens Engelhardt"),
    "sunset_by_Aitzol_Berasategi": ("CC-BY-4.0", "Aitzol Berasategi"),
    "Kleiber_by_Lukas_Baubkus": ("CC-BY-SA-3.0", "Lukas Baubkus"),
}
OPENCV_PHOTOS = (
    "alphamat/input_images/plant.jpg", "data/aero1.jpg", "data/aero3.jpg", "data/aloeL.jpg",
    "data/apple.jpg", "data/baboon.jpg", "data/board.jpg", "data/building.jpg", "data/butterfly.jpg",
    "data/chicky_512.png", "data/ela_original.jpg", "data/fruits.jpg", "data/graf1.png",
    "data/leuvenA.jpg", "data/messi5.jpg", "data/orange.jpg", "data/rubberwhale1.png",
    "data/squirrel_cls.jpg", "dnn_superres/butterfly.png", "hfs/data/000.jpg", "reg/home.png",
    *(f"text/scenetext0{i}.jpg" for i in range(1, 7)),
    *(f"text/scenetext_segmented_word0{i}.jpg" for i in range(1, 6)),
)
OPENCV_LICENCE = "Apache-2.0 AND BSD-3-Clause (OpenCV sample data, per /usr/share/doc/opencv-doc/copyright)"

# Never trained on. The first group may be redistributed (public domain / CC0 / CC-BY).
HELDOUT_SHIPPABLE = ("skimage_astronaut", "skimage_coffee", "skimage_chelsea", "sklearn_china",
                     "lomiri_seeding_by_Clements_Engelhardt", "lomiri_picosdeeuropa_by_Aitzol_Berasategi")
HELDOUT = (*HELDOUT_SHIPPABLE, "plasma_EveningGlow", "opencv_squirrel_cls")
EXCLUDED_PACKAGES = ("mate-backgrounds",)  # reserved for independent evaluation


@dataclass
class Photo:
    name: str
    split: str
    source: str
    origin: str
    licence: str
    attribution: str
    original_size: tuple[int, int]
    stored_size: tuple[int, int] = (0, 0)


def _largest(paths: list[Path]) -> Path:
    def area(p: Path) -> int:
        with Image.open(p) as im:
            return im.size[0] * im.size[1]

    return max(paths, key=area)


def collect() -> list[tuple[Photo, Image.Image]]:
    """Every photo as `(Photo, PIL RGB image)`; raises if a source is not installed."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    out: list[tuple[Photo, Image.Image]] = []

    def add(name: str, source: str, origin: str, licence: str, attribution: str, image: Image.Image) -> None:
        split = "heldout" if name in HELDOUT else "train"
        out.append((Photo(name, split, source, origin, licence, attribution, image.size), image.convert("RGB")))

    for group in (SKIMAGE_COLOR, SKIMAGE_GREY):
        for key, (lic, by) in group.items():
            arr = getattr(skimage.data, key)()
            image = Image.fromarray(arr[..., :3] if arr.ndim == 3 else arr)
            add(f"skimage_{key}", "scikit-image", f"skimage.data.{key}()", lic, by, image)
    samples = load_sample_images()
    for key, arr in zip((Path(f).stem for f in samples.filenames), samples.images, strict=True):
        lic, by = SKLEARN[key]
        add(f"sklearn_{key}", "scikit-learn", f"sklearn.datasets.load_sample_images():{key}", lic, by, Image.fromarray(arr))
    for theme in PLASMA_PHOTOS:
        files = sorted(p for p in Path(PLASMA, theme, "contents", "images").iterdir() if p.suffix in (".jpg", ".png"))
        if not files:
            raise FileNotFoundError(f"{PLASMA}/{theme}: install plasma-workspace-wallpapers")
        path = _largest(files)
        add(f"plasma_{theme}", "plasma-workspace-wallpapers", str(path), "GPL-2+", "KDE Visual Design Group", Image.open(path))
    for stem, (lic, author) in LOMIRI_PHOTOS.items():
        path = Path(LOMIRI, f"{stem}.jpg")
        pkg = "lomiri-wallpapers-20.04" if stem.startswith("Kleiber") else "lomiri-wallpapers-16.04"
        if not path.exists():
            raise FileNotFoundError(f"{path}: install {pkg}")
        add(f"lomiri_{stem}", pkg, str(path), lic, author, Image.open(path))
    for rel in OPENCV_PHOTOS:
        path = Path(OPENCV, rel)
        if not path.exists():
            raise FileNotFoundError(f"{path}: install opencv-doc")
        top = rel.split("/")[0]
        stem = path.stem if top in ("data", "text") else f"{top}_{path.stem}"
        add(f"opencv_{stem}", "opencv-doc", str(path), OPENCV_LICENCE, "OpenCV contributors", Image.open(path))
    return out


def average_hash(image: Image.Image) -> int:
    small = np.asarray(image.convert("L").resize((8, 8), Image.Resampling.BOX), dtype=np.float32)
    bits = (small > small.mean()).flatten()
    return int("".join("1" if b else "0" for b in bits), 2)


def shrink(image: Image.Image, short_side: int) -> Image.Image:
    w, h = image.size
    scale = short_side / min(w, h)
    if scale >= 1:
        return image
    return image.resize((round(w * scale), round(h * scale)), Image.Resampling.LANCZOS)


def write_samples(photos: list[tuple[Photo, Image.Image]], folder: Path, short_side: int) -> None:
    """The redistributable held-out photos as JPEGs (quality 90) plus `CREDITS.md` with their licences."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Demo photos",
        "",
        "Held-out photos (never used to train the default tokenizer), downscaled to short side "
        f"{short_side} px by `examples/prepare_default_data.py`. Modified from the originals (resized, re-encoded).",
        "",
        "| file | origin | licence | author |",
        "|---|---|---|---|",
    ]
    for photo, image in photos:
        if photo.name in HELDOUT_SHIPPABLE:
            shrink(image, short_side).save(folder / f"{photo.name}.jpg", quality=90)
            lines.append(f"| `{photo.name}.jpg` | {photo.origin} ({photo.source}) | {photo.licence} | {photo.attribution} |")
    (folder / "CREDITS.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(".data/default_pack"))
    parser.add_argument("--short-side", type=int, default=384, help="downscale so the short side is at most this")
    parser.add_argument("--samples", type=Path, help="also write demo samples of the shippable held-out photos here")
    parser.add_argument("--sample-side", type=int, default=256)
    args = parser.parse_args(argv)

    photos = collect()
    seen: dict[int, str] = {}
    for photo, image in photos:
        h = average_hash(image)
        if h in seen:
            raise SystemExit(f"{photo.name} duplicates {seen[h]}: fix the hand list")
        seen[h] = photo.name
    missing = set(HELDOUT) - {p.name for p, _ in photos}
    if missing:
        raise SystemExit(f"held-out names not found: {sorted(missing)}")
    for split in ("train", "heldout"):
        (args.out / split).mkdir(parents=True, exist_ok=True)
    for photo, image in photos:
        small = shrink(image, args.short_side)
        photo.stored_size = small.size
        small.save(args.out / photo.split / f"{photo.name}.jpg", quality=95)
    manifest = {
        "short_side": args.short_side,
        "excluded_packages": list(EXCLUDED_PACKAGES),
        "heldout": list(HELDOUT),
        "demo_samples": list(HELDOUT_SHIPPABLE),
        "photos": [asdict(p) for p, _ in photos],
    }
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    if args.samples:
        write_samples(photos, args.samples, args.sample_side)
    counts: dict[str, dict[str, int]] = {}
    for p, _ in photos:
        counts.setdefault(p.source, {"train": 0, "heldout": 0})[p.split] += 1
    for source, c in counts.items():
        print(f"{source:30s} train {c['train']:3d}  held-out {c['heldout']:2d}")
    n_train = sum(c["train"] for c in counts.values())
    print(f"{'total':30s} train {n_train:3d}  held-out {len(HELDOUT):2d}  -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
