"""Image sources shared by training, tokenizing and evaluation.

Every dataset here yields dicts `{"pixels": float [3, H, W] in [0, 1] | None, "key": str,
"label": int, "error": str | None}`. Unreadable items are not raised: they come back
with `pixels=None` and a reason, and `collate_images` drops and reports them, so a
corrupt file is skipped and counted instead of killing a long job.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from . import json_fields
from .files import OUTPUT_MARKER, NotRegularFileError, is_output, open_regular
from .hub import looks_local
from .preprocess import check_image_size, image_limits, to_tensor

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".avif")
# the decoders `load_image` uses (JPEG includes phones' MPO files); others (EPS runs Ghostscript, ...) are refused
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "DIB", "GIF", "WEBP", "TIFF", "PPM", "AVIF")


# JPEG scans (SOS markers) allowed per image, like `djpeg -maxscans`: each scan of a progressive
# file costs a pass over the whole image (~2.2 ms per megapixel), so the limit shrinks as the
# pixel count grows: JPEG_SCAN_PIXEL_BUDGET // pixels, clamped to [MIN_JPEG_SCANS, MAX_JPEG_SCANS].
# Baseline JPEGs have 1 scan, progressive ones about 10 (libjpeg's default script: 10 for colour,
# 6 for grey).
MIN_JPEG_SCANS = 64
MAX_JPEG_SCANS = 1000
JPEG_SCAN_PIXEL_BUDGET = 2**30
# SOF markers of arithmetic-coded JPEGs (rare; browsers do not decode them either): refused, since
# their data can be far smaller than a bit per block, which the truncation check relies on.
_ARITHMETIC_SOF = {0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7} | _ARITHMETIC_SOF
# In entropy-coded data 0xFF is followed by 0x00 (stuffing), RST0-7 or more 0xFF fill: anything else is a marker.
_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_RESTART = re.compile(rb"\xff[\xd0-\xd7]")  # RST0-7 between restart intervals of entropy-coded data
FILE_BYTES_PER_PIXEL = 16  # the most a pixel can take in a file (4 channels of float32), MPO's second image included
FILE_BYTES_SLACK = 4 << 20  # headers, ICC profiles, EXIF and thumbnails


def max_jpeg_scans(pixels: int) -> int:
    """The most scans (SOS markers) a JPEG of `pixels` pixels may have."""
    return max(MIN_JPEG_SCANS, min(MAX_JPEG_SCANS, JPEG_SCAN_PIXEL_BUDGET // max(pixels, 1)))


DEFAULT_DECODE_TIMEOUT_S = 60  # far above a legitimate image at the pixel limit (~1-3 s), far below a stall
DECODE_TIMEOUT_S: int | None = None  # set to override VIT_VQ_DECODE_TIMEOUT_S and the default; 0 turns it off


def decode_timeout() -> int:
    """Seconds one image may take to decode: `DECODE_TIMEOUT_S`, else `VIT_VQ_DECODE_TIMEOUT_S`, else 60 (0: none).

    Raises:
        ValueError: a malformed environment variable (naming it).
    """
    if DECODE_TIMEOUT_S is not None:
        return DECODE_TIMEOUT_S
    text = os.environ.get("VIT_VQ_DECODE_TIMEOUT_S", "")
    if not text.strip():
        return DEFAULT_DECODE_TIMEOUT_S
    return json_fields.integer_text(text, source="the environment variable", key="VIT_VQ_DECODE_TIMEOUT_S", low=0,
                                    high=10**6)


class _DecodeTimeout(Exception):
    """Raised by the alarm inside a decode that ran out of time (never escapes `load_image`)."""


@contextlib.contextmanager
def _time_limit(seconds: int) -> Iterator[None]:
    """Raise `_DecodeTimeout` in this thread after `seconds` of wall-clock time (main thread, POSIX only).

    Pipeline workers (DataLoader processes, the CLI) decode in their main thread, so a file that
    finds a way to be slow becomes that image's error, not the job's stall. Elsewhere (threads,
    Windows) there is no alarm to use and the limit does not apply; the structural limits still do.
    """
    if not seconds or not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    outer, _ = signal.getitimer(signal.ITIMER_REAL)
    if outer and outer <= seconds:  # someone else's alarm (a test runner's timeout) comes first: leave it be
        yield
        return

    def expire(signum: int, frame: object) -> None:
        raise _DecodeTimeout

    start = time.monotonic()
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer:  # give the outer alarm back what is left of it
            signal.setitimer(signal.ITIMER_REAL, max(outer - (time.monotonic() - start), 1e-3))


def check_settings() -> None:
    """Raise if the settings images are loaded under are wrong (called before any image is read).

    Raises:
        ValueError: a malformed limit in the environment (`image_limits`); Pillow's
            `ImageFile.LOAD_TRUNCATED_IMAGES` set, under which a truncated file loads with grey rows.
    """
    from PIL import ImageFile

    image_limits()
    decode_timeout()
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise ValueError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True: truncated images would load with their missing "
            "rows filled in, and vit_vq refuses them; set it back to False"
        )


Transform = Callable[[torch.Tensor], torch.Tensor]


def list_images(root: str | Path, *, include_all_files: bool = False) -> list[Path]:
    """Image files under `root`, recursively (hidden names skipped), sorted; `[root]` for a file.

    With `include_all_files` every entry that is not a folder is listed (FIFOs, sockets,
    devices, links to them, broken links), so that unreadable ones can be reported instead of
    silently ignored; without it, entries with an image extension are, whatever their type.
    A subfolder that cannot be read is listed too (loading it raises a `ValueError` that
    says why), so that no image is skipped unseen. Symlinked folders are not followed.
    Folders that vit_vq wrote its outputs into (`files.is_output`: a tokenize `--out` or a
    train `--output` inside the data) are left out, on every run.

    Raises:
        FileNotFoundError: `root` does not exist.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"no such file or folder: {str(root)!r}")
    if not root.is_dir():
        return [root]
    found: list[Path] = []
    outputs: list[str] = []
    for folder, subfolders, names in os.walk(root, onerror=lambda err: found.append(Path(err.filename))):
        if folder != str(root) and is_output(Path(folder), names):
            subfolders[:] = []
            outputs.append(folder)
            continue
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]
        for name in names:  # every entry but folders (and links to folders): loading says what is wrong
            if not name.startswith(".") and (include_all_files or Path(name).suffix.lower() in IMAGE_EXTENSIONS):
                found.append(Path(folder) / name)
    if outputs:
        logger.info("left out %d folder(s) under %s that vit_vq wrote outputs into (they hold a %s file), e.g. %s",
                    len(outputs), root, OUTPUT_MARKER, min(outputs))
    return sorted(found)


def load_image(path: str | Path | io.BytesIO) -> torch.Tensor:
    """Read an image file (or its bytes) -> float `[3, H, W]` in [0, 1], exactly (see `to_tensor`).

    Only regular files are opened (links are followed): a FIFO, socket or device is refused
    unopened, since reading it could block forever or never end. The size is checked from
    the header before any pixel is decoded (`check_image_size`); only `IMAGE_FORMATS` are
    opened; running out of memory, or taking longer than `decode_timeout()` seconds (in a
    main thread on POSIX, as in pipeline workers), is this image's error.

    Raises:
        ValueError: the file is not a readable image, not a regular file, empty, or too large
            (the message says why); a malformed limit in the environment.
    """
    from PIL import Image, UnidentifiedImageError

    name = "image bytes" if isinstance(path, io.BytesIO) else str(path)
    check_settings()  # a malformed environment variable is the caller's error, whatever the file
    limit = decode_timeout()
    try:
        with _time_limit(limit):
            if isinstance(path, io.BytesIO):
                if path.seek(0, io.SEEK_END) == 0:
                    raise ValueError("empty image bytes")
                return _decode(path)
            with _open_regular_file(Path(path)) as f:
                if os.fstat(f.fileno()).st_size == 0:
                    raise ValueError("an empty file")
                return _decode(f)
    except _DecodeTimeout:
        raise ValueError(
            f"{name}: took more than {limit} s to decode (vit_vq.data.DECODE_TIMEOUT_S, or the "
            "VIT_VQ_DECODE_TIMEOUT_S environment variable); refused as too costly"
        ) from None
    except UnidentifiedImageError as err:  # its own message names the file object, not the file
        known = ", ".join(IMAGE_FORMATS)
        raise ValueError(f"{name}: not a readable image (UnidentifiedImageError: not identified as {known})") from err
    except (Image.DecompressionBombError, OSError, SyntaxError, TypeError) as err:
        raise ValueError(f"{name}: not a readable image ({type(err).__name__}: {err})") from err
    except (MemoryError, RuntimeError) as err:  # an allocation failure is this image's, not the job's
        raise ValueError(f"{name}: out of memory while loading ({type(err).__name__}: {str(err)[:200]})") from err
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from err


def _decode(f: io.BufferedReader | io.BytesIO) -> torch.Tensor:
    """Decode an open image file: size checked from the header, JPEG structure walked, then pixels (see `load_image`)."""
    from PIL import Image

    _check_before_open(f)
    with Image.open(f, formats=IMAGE_FORMATS) as im:
        check_image_size(*im.size)
        _check_file_size(f, *im.size)
        if im.format == "PNG":
            _check_png(f)
        if im.format not in ("JPEG", "MPO"):
            im.load()
            return to_tensor(im)
        f.seek(0)
        data = f.read()
        end = _check_jpeg(data, im.size[0] * im.size[1])
        if end is None or im.format == "MPO":  # several scans, or several images: decoded as they are
            im.load()
            return to_tensor(im)
    # One scan: decode it with its end marker replaced by a few zero bytes (libjpeg reads up to 25 bits
    # ahead), so that data that stops short of the last row is Pillow's "image file is truncated" instead
    # of rows libjpeg fills with grey once it meets the marker (a warning that Pillow drops). The zeros
    # decode as at most 32 blocks of a truncated file's data, never as a complete file's.
    with Image.open(io.BytesIO(data[:end] + bytes(8)), formats=("JPEG",)) as im:
        try:
            im.load()
        except OSError as err:
            raise ValueError(f"truncated JPEG: its image data ends before its last row ({err})") from None
        return to_tensor(im)


def _file_size(f: io.BufferedReader | io.BytesIO) -> int:
    return len(f.getbuffer()) if isinstance(f, io.BytesIO) else os.fstat(f.fileno()).st_size


def _check_before_open(f: io.BufferedReader | io.BytesIO) -> None:
    """Bound the bytes a decoder may read before it reads them (Pillow's WebP and AVIF openers read the
    whole file): no file above what the pixel limit can need, and a WebP no larger than its own header's
    size needs (the size sits in its first 30 bytes)."""
    max_pixels, _ = image_limits()
    size, limit = _file_size(f), FILE_BYTES_PER_PIXEL * max_pixels + FILE_BYTES_SLACK
    if size > limit:
        raise ValueError(f"the file is {size:,} bytes, more than an image within the pixel limit can need "
                         f"(at most {limit:,}); refused unread")
    head = f.read(30)
    f.seek(0)
    if len(head) == 30 and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        dims = _webp_size(head)
        if dims is not None:
            _check_file_size(f, *dims)


def _webp_size(head: bytes) -> tuple[int, int] | None:
    """`(width, height)` from the first 30 bytes of a WebP file (VP8X, VP8L or VP8 chunk), None if unknown."""
    kind, body = head[12:16], head[20:30]
    if kind == b"VP8X":
        return 1 + int.from_bytes(body[4:7], "little"), 1 + int.from_bytes(body[7:10], "little")
    if kind == b"VP8L" and body[0] == 0x2F:
        bits = int.from_bytes(body[1:5], "little")
        return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    if kind == b"VP8 " and body[3:6] == b"\x9d\x01\x2a":
        return int.from_bytes(body[6:8], "little") & 0x3FFF, int.from_bytes(body[8:10], "little") & 0x3FFF
    return None


def _check_file_size(f: io.BufferedReader | io.BytesIO, width: int, height: int) -> None:
    """Refuse a file far larger than its header's pixels can need, before any of it is read whole.

    A 64x64 JPEG padded to 2 GB (sparse on disk) would otherwise be read into memory by the
    decoder or the JPEG check.
    """
    size = _file_size(f)
    limit = FILE_BYTES_PER_PIXEL * width * height + FILE_BYTES_SLACK
    if size > limit:
        raise ValueError(
            f"the file is {size:,} bytes, more than a {width}x{height} image can need (at most {limit:,}); refused unread"
        )


# PNG colour type -> channels
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))  # x0 y0 dx dy


def _check_png(f: io.BufferedReader | io.BytesIO) -> None:
    """Refuse a PNG whose compressed image data inflates to fewer bytes than its header declares.

    A complete zlib stream of one row behind a header that says 8192x8192 decodes, in Pillow,
    to one row and black below it, with no error. The image data is inflated once more here,
    in chunks, counting bytes and keeping none.
    """
    import zlib

    f.seek(8)
    header = f.read(25)
    if len(header) < 25 or header[4:8] != b"IHDR":
        return  # Pillow has already refused what is not a PNG
    width, height = int.from_bytes(header[8:12], "big"), int.from_bytes(header[12:16], "big")
    depth, colour, interlace = header[16], header[17], header[20]
    bits = depth * _PNG_CHANNELS.get(colour, 4)
    passes = _ADAM7 if interlace else ((0, 0, 1, 1),)
    need = 0
    for x0, y0, dx, dy in passes:
        cols, rows = _ceil_div(max(width - x0, 0), dx), _ceil_div(max(height - y0, 0), dy)
        if cols and rows:
            need += rows * (1 + _ceil_div(cols * bits, 8))
    inflate, have = zlib.decompressobj(), 0
    f.seek(8)  # every chunk by its own length, IHDR included (a padded IHDR must not hide a fake IDAT)
    while have < need:
        head = f.read(8)
        if len(head) < 8:
            break
        length, kind = int.from_bytes(head[:4], "big"), head[4:8]
        if kind == b"IEND":
            break
        if kind != b"IDAT":
            f.seek(length + 4, io.SEEK_CUR)
            continue
        left = length
        while left and have < need:
            chunk = f.read(min(left, 1 << 16))
            if not chunk:
                break
            left -= len(chunk)
            try:
                while chunk and have < need:
                    have += len(inflate.decompress(chunk, 1 << 20))
                    chunk = inflate.unconsumed_tail
            except zlib.error as err:
                raise ValueError(f"corrupt PNG: its image data does not inflate ({err})") from None
            if inflate.eof:
                break
        if inflate.eof:
            break
        f.seek(left + 4, io.SEEK_CUR)
    if have < need:
        raise ValueError(
            f"truncated PNG: its image data inflates to {have:,} bytes, fewer than the {need:,} its "
            f"{width}x{height} header declares (the rest would decode as black)"
        )
    f.seek(0)


def _check_jpeg(data: bytes, pixels: int) -> int | None:
    """Walk a JPEG's marker segments up to its end marker (EOI); where that marker is, for a one-scan file.

    Raises:
        ValueError: more scans than `max_jpeg_scans(pixels)`; no end marker (truncated); less
            than one bit of image data per 8x8 block (truncated, or a header lying about the
            size); arithmetic coding; a malformed segment.
    """
    limit, n = max_jpeg_scans(pixels), len(data)
    pos, scans, coded, blocks, restart = 2, 0, 0, 0, 0  # after SOI
    per_block: dict[int, int] = {}  # component id -> blocks per MCU (h x v)
    truncated = "truncated JPEG: the file ends before its end-of-image marker"
    while True:
        if pos + 2 > n:
            raise ValueError(truncated)
        if data[pos] != 0xFF:
            raise ValueError(f"corrupt JPEG: expected a marker at byte {pos}, got 0x{data[pos]:02x}")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xD9:  # EOI
            break
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # RSTn, TEM: no length
            pos += 2
            continue
        if pos + 4 > n:
            raise ValueError(truncated)
        end = pos + 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        if end > n or end < pos + 4:
            raise ValueError(f"{truncated} (a segment at byte {pos} runs past it)")
        if marker in _ARITHMETIC_SOF:
            raise ValueError(f"arithmetic-coded JPEG (SOF marker 0x{marker:02x}); only Huffman-coded JPEGs are read")
        if marker in _SOF:
            blocks = _jpeg_blocks(data[pos + 4 : end])
            sof = data[pos + 4 : end]
            per_block = {sof[6 + 3 * i]: (sof[7 + 3 * i] >> 4) * (sof[7 + 3 * i] & 15) for i in range(sof[5])}
        elif marker == 0xDD and end - pos >= 6:  # DRI: MCUs per restart interval
            restart = int.from_bytes(data[pos + 4 : pos + 6], "big")
        elif marker == 0xDA:  # SOS, then its entropy-coded data up to the next marker
            scans += 1
            if scans > limit:
                raise ValueError(
                    f"JPEG has more than {limit} scans, the limit for {pixels:,} pixels "
                    f"(vit_vq.data.max_jpeg_scans: each scan is a pass over the whole image)"
                )
            found = _NEXT_MARKER.search(data, end)
            if found is None:
                raise ValueError(truncated)
            segment = data[end : found.start()]
            bounds = [-2, *(m.start() for m in _RESTART.finditer(segment)), len(segment)]
            ids = data[pos + 5 : pos + 5 + 2 * data[pos + 4] : 2]  # the scan's components
            mcu_blocks = sum(per_block.get(c, 1) for c in ids) if len(ids) > 1 else 1
            # a Huffman-coded block takes at least 2 bits (a DC code and an end-of-block code, 1 bit each at best)
            least = max(1, _ceil_div(2 * restart * mcu_blocks, 8))
            if any(b - a - 2 < least for a, b in zip(bounds[:-2], bounds[1:-1], strict=True)) or bounds[-1] - bounds[-2] <= 2:
                raise ValueError(
                    "truncated JPEG: a restart interval holds less than 2 bits per block (libjpeg would fill it with grey)"
                )
            coded += len(segment) - 2 * (len(bounds) - 2)  # restart markers are not image data
            end = found.start()
        pos = end
    if coded * 8 < blocks:
        raise ValueError(
            f"truncated JPEG: its header declares {blocks:,} blocks of 8x8 pixels but it holds {coded:,} bytes "
            "of image data, less than one bit per block"
        )
    return pos if scans == 1 else None


def _jpeg_blocks(sof: bytes) -> int:
    """The number of 8x8 blocks, over all components, that a JPEG frame header (SOF payload) declares."""
    if len(sof) < 6 or len(sof) < 6 + 3 * sof[5] or sof[5] == 0:
        raise ValueError("corrupt JPEG: a malformed frame header")
    height, width = int.from_bytes(sof[1:3], "big"), int.from_bytes(sof[3:5], "big")
    factors = [(sof[7 + 3 * i] >> 4, sof[7 + 3 * i] & 15) for i in range(sof[5])]
    if min(min(h, v) for h, v in factors) == 0:
        raise ValueError("corrupt JPEG: a sampling factor of 0 in the frame header")
    h_max, v_max = max(h for h, _ in factors), max(v for _, v in factors)
    return sum(_ceil_div(_ceil_div(width * h, h_max), 8) * _ceil_div(_ceil_div(height * v, v_max), 8) for h, v in factors)


def _ceil_div(a: int, b: int) -> int:
    return -(a // -b)


def _open_regular_file(path: Path) -> io.BufferedReader:
    """`files.open_regular`, with the reason in the words of an image loader (a folder's reason says why)."""
    try:
        return open_regular(path)
    except NotRegularFileError as err:
        if err.kind == "a folder":
            raise ValueError(_folder_error(path)) from None
        raise ValueError(f"not a regular file: {err.kind}" + (" (through a symbolic link)" if err.via_link else "")) from None


def _folder_error(folder: Path) -> str:
    """What is wrong with loading `folder` as an image: unreadable (and why), or just a folder."""
    try:
        with os.scandir(folder) as entries:
            next(entries, None)
    except OSError as err:
        return f"a folder that cannot be read ({type(err).__name__}: {err.strerror or err}); its files are not listed"
    return "a folder, not an image file"


class ImageFolder(Dataset):
    """Images under a folder (recursive). Items are dicts; unreadable files carry an `error`.

    Raises:
        FileNotFoundError: `root` does not exist. ValueError: a malformed limit in the environment.
    """

    def __init__(self, root: str | Path, transform: Transform | None = None, *, include_all_files: bool = True):
        check_settings()  # now, as the job's error, rather than as every image's
        self.root = Path(root).expanduser()
        self.files = list_images(self.root, include_all_files=include_all_files)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict[str, Any]:
        path = self.files[i]
        key = str(path.relative_to(self.root)) if self.root.is_dir() else path.name
        try:
            img = load_image(path)
            if self.transform is not None:
                img = self.transform(img)
        except ValueError as err:
            return {"pixels": None, "key": key, "label": -1, "error": str(err)}
        except (MemoryError, RuntimeError) as err:  # e.g. an allocation failure: this image's error, not the job's
            reason = f"{key}: cannot be transformed ({type(err).__name__}: {str(err)[:200]})"
            return {"pixels": None, "key": key, "label": -1, "error": reason}
        return {"pixels": img, "key": key, "label": -1, "error": None}


class HFImageDataset(Dataset):
    """A Hugging Face `datasets` dataset (Hub name or local path) viewed through its image column.

    Raises:
        ValueError: no such image or label column; a label column that does not hold integers;
            a malformed limit in the environment.
    """

    def __init__(
        self,
        name_or_path: str,
        *,
        split: str = "train",
        image_column: str = "image",
        label_column: str | None = None,
        transform: Transform | None = None,
    ):
        import datasets

        check_settings()  # now, as the job's error, rather than as every row's
        path = Path(name_or_path).expanduser()
        if _is_saved_dataset(path):
            ds = datasets.load_from_disk(str(path))
            ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        else:
            ds = datasets.load_dataset(name_or_path, split=split)
        if image_column not in ds.column_names:
            raise ValueError(f"dataset has no image column {image_column!r}; its columns are {ds.column_names}")
        if label_column is not None:
            _check_label_column(ds, label_column)
        if isinstance(ds.features.get(image_column), datasets.Image):
            # decode in __getitem__'s try, so one corrupt row is skipped instead of raised
            ds = ds.cast_column(image_column, datasets.Image(decode=False))
        self.ds, self.image_column, self.label_column, self.transform = ds, image_column, label_column, transform

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict[str, Any]:
        label = -1
        try:
            row = self.ds[i]
            label = int(row[self.label_column]) if self.label_column else -1
            value = row[self.image_column]
            img = load_image_cell(value) if isinstance(value, dict) else to_tensor(value)
            if self.transform is not None:
                img = self.transform(img)
        except (ValueError, TypeError, OSError, KeyError) as err:
            return {"pixels": None, "key": str(i), "label": label, "error": f"row {i}: {err}"}
        except (MemoryError, RuntimeError) as err:  # e.g. an allocation failure: this row's error, not the job's
            return {"pixels": None, "key": str(i), "label": label, "error": f"row {i}: {type(err).__name__}: {str(err)[:200]}"}
        return {"pixels": img, "key": str(i), "label": label, "error": None}


def load_image_cell(cell: dict[str, Any]) -> torch.Tensor:
    """An undecoded `datasets.Image` cell `{"bytes": ..., "path": ...}` -> float `[3, H, W]`.

    Its bytes when present (even empty: "empty image bytes"), else the file at its path.
    """
    if cell.get("bytes") is not None:
        return load_image(io.BytesIO(cell["bytes"]))
    if cell.get("path"):
        return load_image(cell["path"])
    raise ValueError("image cell has neither bytes nor a path")


def _check_label_column(ds: Any, column: str) -> None:
    """Raise unless `ds` has an integer (or `ClassLabel`) column `column`."""
    import datasets

    if column not in ds.column_names:
        raise ValueError(f"dataset has no label column {column!r}; its columns are {ds.column_names}")
    feature = ds.features[column]
    dtype = getattr(feature, "dtype", type(feature).__name__)
    if not (isinstance(feature, datasets.ClassLabel) or (isinstance(feature, datasets.Value) and "int" in dtype)):
        raise ValueError(f"label column {column!r} holds {dtype} values; expected integer labels (an int Value or a ClassLabel)")


def open_image_source(
    data: str | Path,
    transform: Transform | None = None,
    *,
    split: str = "train",
    image_column: str = "image",
    label_column: str | None = None,
) -> Dataset:
    """An `ImageFolder` for a local folder/file, else a `datasets` dataset (saved folder or Hub name).

    A value that looks like a path (`vit_vq.hub.looks_local`) and does not exist is an error, never
    a Hub lookup.

    Raises:
        FileNotFoundError: a path-looking value that does not exist.
        ValueError: a `label_column` for a folder of image files (which has no labels); see
            `HFImageDataset` for a `datasets` dataset.
    """
    path = Path(str(data)).expanduser()
    if path.exists() and not _is_saved_dataset(path):
        if label_column is not None:
            raise ValueError(
                f"a label column ({label_column!r}) needs a `datasets` dataset, but {str(data)!r} is "
                "image files, which have no labels"
            )
        return ImageFolder(path, transform)
    if not path.exists() and looks_local(str(data)):
        raise FileNotFoundError(f"no such folder: {str(data)!r}")
    return HFImageDataset(str(data), split=split, image_column=image_column, label_column=label_column, transform=transform)


def _is_saved_dataset(path: Path) -> bool:
    """A folder written by `datasets.Dataset(Dict).save_to_disk`."""
    return path.is_dir() and any((path / f).exists() for f in ("dataset_info.json", "state.json", "dataset_dict.json"))


def collate_images(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack readable items; report the rest under `skipped` as `{"path", "reason"}` dicts.

    Returns `{"pixels": [B, 3, S, S] | None, "keys": [...], "labels": int64 [B], "skipped": [...]}`.
    """
    good = [it for it in items if it["pixels"] is not None]
    skipped = [{"path": it["key"], "reason": it["error"]} for it in items if it["pixels"] is None]
    return {
        "pixels": torch.stack([it["pixels"] for it in good]) if good else None,
        "keys": [it["key"] for it in good],
        "labels": torch.tensor([it["label"] for it in good], dtype=torch.int64),
        "skipped": skipped,
    }
