"""Pieces shared by the `encode`, `decode`, `reconstruct`, `tokenize` and `eval` subcommands.

Model options (`--model`, `--revision`, `--device`, `--precision`, `--compile`), the
resize policy, batch loading with a progress bar, and output files that never replace a
file the command did not make (`--overwrite` to allow it), written atomically.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from ..distributed import default_workers
from ..pipeline.batching import DEFAULT_BATCH_TOKENS, lookahead, shape_chunks
from ..pipeline.runtime import ModelInfo, load_tokenizer, prepare_for_inference
from ..pipeline.sources import RESIZE_MODES, FileImages, ModelSizedImages, collate_sized, resize_notice
from ..registry import DEFAULT_MODEL
from ..tokenizer import ViTVQTokenizer
from .main import CLIError

HUB_ID = re.compile(r"[A-Za-z0-9_][\w.-]*(/[\w.-]+)?")
MODEL_HELP = (f"Hub id, local folder, or {DEFAULT_MODEL} (the bundled tokenizer, used when --model is left out); "
              "vit_vq:default-v1 is the bundled default of vit_vq 0.1")


# -- arguments ------------------------------------------------------------------------
def add_model_args(parser: argparse.ArgumentParser) -> None:
    """`--model`, `--revision`, `--device`, `--precision`, `--compile`, `--batch-size`, `--num-workers`."""
    g = parser.add_argument_group("model")
    g.add_argument("--model", "-m", default=None, help=MODEL_HELP)
    g.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) of --model")
    g.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    g.add_argument(
        "--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
        help="encoder/decoder compute dtype; the codebook lookup stays fp32 (auto: bf16 on CUDA, fp32 on CPU)",
    )
    g.add_argument("--compile", action="store_true", help="torch.compile encoder and decoder (slow start, fast after)")
    g.add_argument("--batch-size", "-b", type=positive_int, default=64, help="images per forward pass (default 64)")
    g.add_argument(
        "--batch-tokens", type=positive_int, default=None, metavar="N",
        help=f"tokens per forward pass, the activation budget: fewer images go in a pass when their grids are "
        f"large, never fewer than one (default {DEFAULT_BATCH_TOKENS})",
    )
    g.add_argument(
        "--num-workers", type=int, default=default_workers(),
        help=f"image-decoding worker processes (default {default_workers()}: the CPUs available, at most 4; 0 = in-process)",
    )


def add_resize_arg(parser: argparse.ArgumentParser) -> None:
    """`--resize crop|native|budget|none` and `--short-side N`."""
    parser.add_argument(
        "--resize", choices=RESIZE_MODES, default="crop",
        help="crop = resize the short side and center-crop to the model's square (default); native = the whole image, "
        "short side to the model's resolution (or --short-side), sides rounded to the patch: one grid shape per "
        "aspect ratio; budget = the whole image at the largest size within the model's token budget; "
        "none = reject images not at the model's resolution",
    )
    parser.add_argument(
        "--short-side", type=positive_int, default=None, metavar="N",
        help="with --resize native: the short side in pixels (default: the model's image_size); with crop: the square's side",
    )


def sized_images(base: Dataset, tok: ViTVQTokenizer, args: argparse.Namespace, indices: Any = None) -> ModelSizedImages:
    """`base` at the size `--resize` / `--short-side` ask for, within the model's token budget.

    Raises:
        CLIError: `--short-side` with `--resize budget` or `none`.
    """
    short_side = getattr(args, "short_side", None)
    if short_side is not None and args.resize not in ("crop", "native"):
        raise CLIError(f"--short-side goes with --resize native or crop, not --resize {args.resize}")
    cfg = tok.config
    return ModelSizedImages(
        base, cfg.image_size, args.resize, indices, patch_size=cfg.patch_size, max_tokens=cfg.token_budget,
        short_side=short_side,
    )


def images_per_read(tok: ViTVQTokenizer, args: argparse.Namespace) -> int:
    """Images a loader batch holds: a pass's worth at one shape, more to group by shape at several."""
    uniform = args.resize in ("crop", "none")
    return lookahead(tok.config, args.batch_size, getattr(args, "batch_tokens", None), uniform=uniform)


def plural(count: int, word: str, many: str | None = None) -> str:
    """`1 image`, `2 images` (`many` for irregular plurals: `plural(2, "process", "processes")`)."""
    return f"{count} {word if count == 1 else many or word + 's'}"


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


# -- model ----------------------------------------------------------------------------
def load_model(name: str | None, revision: str | None = None) -> ViTVQTokenizer:
    """The tokenizer named by `--model` (a Hub id, a folder or `vit_vq:default`); the bundled one when None.

    Raises:
        CLIError: a Hub id that cannot be fetched.
        FileNotFoundError / ValueError: a missing local folder, one without weights, bad weights.
    """
    if name is None:
        return ViTVQTokenizer.from_pretrained(DEFAULT_MODEL, revision=revision)
    try:
        return load_tokenizer(name, revision=revision)
    except (FileNotFoundError, ValueError, TypeError):
        raise
    except Exception as err:  # Hub/network errors come in many types; one clear line for all
        if Path(name).expanduser().exists() or not HUB_ID.fullmatch(name):
            raise
        raise CLIError(
            f"could not load tokenizer {name!r} from the Hugging Face Hub ({type(err).__name__}: {err}); "
            "check the id, your connection, or pass a local folder"
        ) from err


def model_id(name: str | None) -> str:
    """What codes record as the model: a local folder's absolute path, a Hub id, or `vit_vq:default`."""
    if name is None:
        return DEFAULT_MODEL
    path = Path(name).expanduser()
    return str(path.resolve()) if path.is_dir() else name


def setup_model(args: argparse.Namespace, name: str | None = None) -> tuple[ViTVQTokenizer, ModelInfo]:
    """Load (`name` or `args.model`), move, cast and optionally compile the tokenizer."""
    name = name if name is not None else args.model
    tok = load_model(name, args.revision)
    return prepare_for_inference(
        tok, model_id=model_id(name), revision=args.revision, device=args.device,
        precision=args.precision, compile=args.compile,
    )


def device_of(tok: ViTVQTokenizer) -> torch.device:
    return next(tok.parameters()).device


# -- images in --------------------------------------------------------------------------
def loader(dataset: Dataset, args: argparse.Namespace, device: torch.device, batch_size: int | None = None) -> DataLoader:
    """Batches of `collate_sized` dicts (`batch_size` images, default `--batch-size`), in order."""
    return DataLoader(
        dataset, batch_size=batch_size or args.batch_size, shuffle=False, num_workers=args.num_workers,
        collate_fn=collate_sized, pin_memory=device.type == "cuda",
    )


def progress(iterable: Any, total: int, desc: str) -> Any:
    """A tqdm bar on stderr counting images (updated by the caller)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="img", file=sys.stderr, dynamic_ncols=True)


def input_images(paths: list[str], output_dir: Path | None = None) -> FileImages:
    """The image files named by `paths` (files or folders), without the command's own outputs.

    When `output_dir` lies inside an input folder, the images found under it (written by
    an earlier run) are not read back as inputs; files named one by one are always kept.

    Raises:
        FileNotFoundError: a missing path. ValueError: no images. CLIError: only such outputs.
    """
    images = FileImages(paths)
    if output_dir is None:
        return images
    out = output_dir.expanduser().resolve()
    folders = [Path(p).expanduser().resolve() for p in paths if Path(p).expanduser().is_dir()]
    if not any(out != d and out.is_relative_to(d) for d in folders):
        return images
    named = {Path(p).expanduser().resolve() for p in paths if not Path(p).expanduser().is_dir()}
    keep = [i for i, f in enumerate(images.files) if f.resolve() in named or not f.resolve().is_relative_to(out)]
    if not keep:
        raise CLIError(f"every input image lies inside the output folder {str(output_dir)!r}; choose another output folder")
    images.files = [images.files[i] for i in keep]
    images.keys = [images.keys[i] for i in keep]
    return images


def shape_passes(batches: Iterable[dict[str, Any]], tok: ViTVQTokenizer, args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    """Loader batches -> forward passes: `pixels` `[n, 3, H, W]` of one shape within `--batch-size` and
    `--batch-tokens`, with the `keys` of those images; a batch's `skipped` and `resized` ride on its first
    pass (a batch with no readable image is one pass with `pixels` None)."""
    p = tok.config.patch_size
    for batch in batches:
        pixels = batch["pixels"]
        if pixels is None:
            yield batch
            continue
        items = list(pixels)
        chunks = shape_chunks([(t.shape[-2] // p, t.shape[-1] // p) for t in items], args.batch_size,
                              getattr(args, "batch_tokens", None))
        for k, chunk in enumerate(chunks):
            x = pixels[chunk[0] : chunk[-1] + 1] if isinstance(pixels, torch.Tensor) else torch.stack([items[i] for i in chunk])
            yield {"pixels": x, "keys": [batch["keys"][i] for i in chunk], "skipped": batch["skipped"] if k == 0 else [],
                   "resized": batch["resized"] if k == 0 else 0}


def add_strict_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--strict", action="store_true",
        help="stop at the first unreadable image (default: skip it, report it at the end, code the rest)",
    )


def image_batches(
    images: FileImages, tok: ViTVQTokenizer, args: argparse.Namespace, desc: str
) -> Iterator[dict[str, Any]]:
    """Batches of `images` (see `input_images`) at the size `--resize` asks for: `pixels` is
    `[B, 3, H, W]`, or a list of `[3, H, W]` when shapes differ (code it with
    `pipeline.batching.encode_images`, which keeps passes within `--batch-tokens`).

    An unreadable image (or a wrong-size one under `--resize none`) is skipped and reported on
    stderr at the end, like `tokenize` does; with `--strict` it stops the command instead.
    Prints the resize notice at the end.

    Raises:
        CLIError: under `--strict`, an unreadable image; always, when no image at all could be read.
    """
    dataset = sized_images(images, tok, args)
    resized, coded, skipped = 0, 0, []
    bar = progress(None, len(dataset), desc)
    try:
        for batch in loader(dataset, args, device_of(tok), images_per_read(tok, args)):
            if batch["skipped"] and getattr(args, "strict", True):
                bad = batch["skipped"][0]
                more = f" (and {len(batch['skipped']) - 1} more in this batch)" if len(batch["skipped"]) > 1 else ""
                raise CLIError(f"{bad['reason']}{more}")
            skipped += batch["skipped"]
            resized += batch["resized"]
            bar.update(len(batch["keys"]) + len(batch["skipped"]))
            if batch["keys"]:
                coded += len(batch["keys"])
                yield batch
    finally:
        bar.close()
    for item in skipped[:10]:
        print(f"skipped {item['path']}: {item['reason']}", file=sys.stderr)
    if len(skipped) > 10:
        print(f"... and {len(skipped) - 10} more skipped", file=sys.stderr)
    if not coded:
        raise CLIError(f"none of the {len(dataset)} input images could be read (see the reasons above)")
    notice = resize_notice(resized, coded, dataset.size, args.resize)
    if notice:
        print(notice, file=sys.stderr)


# -- files out ---------------------------------------------------------------------------
def add_overwrite_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--overwrite", action="store_true",
        help="replace files that already exist at the output paths (default: refuse before doing any work)",
    )


def refuse_existing(targets: Iterable[Path], overwrite: bool) -> None:
    """Check every output path before any work: without `overwrite`, none may exist yet.

    Raises:
        CLIError: naming the first existing path, how many others exist, and `--overwrite`.
    """
    if overwrite:
        return
    existing = [t for t in targets if os.path.lexists(t)]
    if existing:
        others = f" (and {len(existing) - 1} more output paths that exist)" if len(existing) > 1 else ""
        raise CLIError(
            f"refusing to overwrite {str(existing[0])!r}{others}, which already exists; "
            "pass --overwrite to replace it, or choose another output"
        )


def check_writable(folder: Path, what: str) -> None:
    """Fail before any work when nothing can be written into `folder` (created if missing).

    Raises:
        CLIError: the folder cannot be created, or a file cannot be created in it.
    """
    import tempfile

    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder, prefix=".vit_vq-write-test-"):
            pass
    except OSError as err:
        raise CLIError(f"cannot write {what} into {str(folder)!r} ({err.strerror or err}); choose another output") from None


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float `[..., 3, H, W]` in [0, 1] -> uint8 `[..., H, W, 3]` on the CPU (round to nearest)."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).movedim(-3, -1).cpu()


def save_png(image: torch.Tensor, path: str | Path, *, overwrite: bool = True) -> Path:
    """Write float `[3, H, W]` in [0, 1] as an 8-bit RGB PNG, atomically (parent folders created).

    Raises:
        CLIError: `path` exists and `overwrite` is False (e.g. it appeared since `refuse_existing`).
    """
    from PIL import Image

    from ..files import atomic_write

    path = Path(path)
    refuse_existing([path], overwrite)
    array = to_uint8(image).numpy()
    return atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))


def image_grid(rows: list[torch.Tensor], pad: int = 2) -> torch.Tensor:
    """Rows of images, each float `[n, 3, H, W]` (n may shrink in the last rows) -> one `[3, H', W']` on white."""
    if not rows or not len(rows[0]):
        raise ValueError("image_grid needs at least one image")
    _, C, H, W = rows[0].shape
    cols = max(len(r) for r in rows)
    grid = torch.ones(C, len(rows) * (H + pad) + pad, cols * (W + pad) + pad)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            top, left = pad + i * (H + pad), pad + j * (W + pad)
            grid[:, top : top + H, left : left + W] = img.detach().float().cpu()
    return grid


MAX_NAME_DEPTH = 16  # folders kept from an image name (the innermost ones)
MAX_COMPONENT_BYTES = 200  # a file or folder name, with room for a de-duplicating suffix under 255 bytes


def _safe_component(part: str) -> str:
    """A path component cut to `MAX_COMPONENT_BYTES` (keeping a hash of the whole, so cut names stay apart)."""
    if len(os.fsencode(part)) <= MAX_COMPONENT_BYTES:
        return part
    from ..fingerprint import short_digest

    cut = part
    while len(os.fsencode(cut)) > MAX_COMPONENT_BYTES - 17:
        cut = cut[:-1]
    return f"{cut}~{short_digest(part)}"


def output_names(names: list[str], suffix: str = ".png") -> list[Path]:
    """Relative output paths for image names (a codes file's: someone else's data), one per name.

    The name with `suffix`; never absolute, never `..` (such names keep their last component); empty,
    `.` and `..` components dropped; at most `MAX_NAME_DEPTH` folders; components cut to
    `MAX_COMPONENT_BYTES`; de-duplicated, including a name that another needs as a folder.
    """
    used: set[Path] = set()
    folders: set[Path] = set()
    next_suffix: dict[Path, int] = {}  # per name: where its de-duplicating count goes on (linear, not quadratic)
    out = []
    for name in names:
        p = Path(name)
        parts = [p.name] if p.is_absolute() or ".." in p.parts else list(p.parts)
        parts = [_safe_component(q) for q in parts if q not in ("", ".", "..", "/")][-MAX_NAME_DEPTH - 1 :] or ["image"]
        rel = Path(*parts)
        rel = rel.with_suffix(suffix) if rel.stem else rel.with_name("image" + suffix)
        if any(parent in used for parent in rel.parents):  # a folder that is another image's file: flatten
            rel = Path(_safe_component("_".join(rel.parts)))
        candidate, k = rel, next_suffix.get(rel, 1)
        while candidate in used or candidate in folders:
            candidate = rel.with_name(f"{rel.stem}-{k}{suffix}")
            k += 1
        next_suffix[rel] = k
        used.add(candidate)
        folders.update(candidate.parents)
        out.append(candidate)
    return out


__all__ = [
    "add_model_args",
    "add_resize_arg",
    "plural",
    "sized_images",
    "images_per_read",
    "load_model",
    "model_id",
    "DEFAULT_MODEL",
    "setup_model",
    "loader",
    "progress",
    "input_images",
    "image_batches",
    "shape_passes",
    "add_strict_arg",
    "add_overwrite_arg",
    "refuse_existing",
    "check_writable",
    "to_uint8",
    "save_png",
    "image_grid",
    "output_names",
]
