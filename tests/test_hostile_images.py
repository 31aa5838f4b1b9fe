"""Hostile images (issue 19): JPEG scan bombs, truncated or lying JPEGs, oversized in-memory images,
integers in the environment. Every hostile file is generated here, never committed."""

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

import vit_vq.data
from vit_vq.data import ImageFolder, load_image, max_jpeg_scans
from vit_vq.preprocess import preprocess, to_tensor


def _photo() -> np.ndarray:
    from skimage import data

    return data.astronaut()  # (512, 512, 3) uint8, a real photo


def _jpeg(image: Image.Image, **save) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", **save)
    return out.getvalue()


def _pillow(raw: bytes) -> torch.Tensor:
    with Image.open(io.BytesIO(raw)) as im:
        return to_tensor(im)


@pytest.mark.parametrize(
    "save",
    [
        {"quality": 90},
        {"quality": 95, "subsampling": 0},
        {"quality": 75, "progressive": True},
        {"quality": 85, "restart_marker_blocks": 7},
        {"quality": 85, "grey": True},
    ],
    ids=["baseline", "444", "progressive", "restart-markers", "grey"],
)
def test_complete_jpegs_load_exactly_as_pillow_decodes_them(save):
    save = dict(save)
    image = Image.fromarray(_photo()[:200, :136])
    if save.pop("grey", False):
        image = image.convert("L")
    raw = _jpeg(image, **save)
    assert torch.equal(load_image(io.BytesIO(raw)), _pillow(raw))


def test_a_jpeg_scan_bomb_is_refused_before_decoding():
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).resize((256, 256))
    raw = _jpeg(noise, quality=80, progressive=True)
    scans = raw.count(b"\xff\xda")
    assert 2 <= scans <= 16  # a normal progressive file loads
    assert load_image(io.BytesIO(raw)).shape == (3, 256, 256)
    limit = max_jpeg_scans(256 * 256)
    last = raw.rindex(b"\xff\xda")
    bomb = raw[:-2] + raw[last:-2] * limit + b"\xff\xd9"  # the last scan repeated: scans + limit - 1 > limit
    assert bomb.count(b"\xff\xda") > limit
    with pytest.raises(ValueError, match=f"JPEG has more than {limit} scans, the limit for 65,536 pixels"):
        load_image(io.BytesIO(bomb))


def test_the_scan_limit_shrinks_with_the_pixel_count_within_its_bounds():
    assert max_jpeg_scans(64 * 64) == vit_vq.data.MAX_JPEG_SCANS
    assert max_jpeg_scans(2**22) == 2**30 // 2**22 == 256
    assert max_jpeg_scans(8192 * 8192) == vit_vq.data.MIN_JPEG_SCANS


def test_a_photo_cut_to_a_tenth_with_its_end_marker_added_back_is_refused():
    raw = _jpeg(Image.fromarray(_photo()), quality=90)
    cut = raw[: len(raw) // 10] + b"\xff\xd9"
    _pillow(cut)  # Pillow alone pads the missing rows with grey, without a word
    with pytest.raises(ValueError, match="truncated JPEG: its image data ends before its last row"):
        load_image(io.BytesIO(cut))


def test_a_jpeg_without_its_end_marker_is_refused():
    raw = _jpeg(Image.fromarray(_photo()), quality=90)
    with pytest.raises(ValueError, match="truncated JPEG: the file ends before its end-of-image marker"):
        load_image(io.BytesIO(raw[: len(raw) // 2]))


def test_a_header_claiming_8192_squared_over_64_squared_of_data_is_refused_before_decoding(monkeypatch):
    raw = bytearray(_jpeg(Image.fromarray(_photo()[:64, :64]), quality=90))
    sof = raw.index(b"\xff\xc0")
    raw[sof + 5 : sof + 9] = (8192).to_bytes(2, "big") * 2  # height, width
    with Image.open(io.BytesIO(bytes(raw))) as im:
        assert im.size == (8192, 8192)
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("decoded a lying JPEG"))
    with pytest.raises(ValueError, match="declares 1,572,864 blocks of 8x8 pixels but it holds"):
        load_image(io.BytesIO(bytes(raw)))


def test_a_refused_jpeg_in_a_folder_is_skipped_with_its_reason(tmp_path):
    raw = _jpeg(Image.fromarray(_photo()), quality=90)
    (tmp_path / "cut.jpg").write_bytes(raw[: len(raw) // 10] + b"\xff\xd9")
    (tmp_path / "ok.jpg").write_bytes(raw)
    items = ImageFolder(tmp_path)
    assert items[1]["error"] is None
    assert items[0]["pixels"] is None and "cut.jpg: truncated JPEG" in items[0]["error"]


def test_arithmetic_coded_jpegs_are_refused():
    raw = bytearray(_jpeg(Image.fromarray(_photo()[:64, :64]), quality=90))
    raw[raw.index(b"\xff\xc0") + 1] = 0xC9  # SOF9: arithmetic coding
    with pytest.raises(ValueError, match="arithmetic-coded JPEG"):
        load_image(io.BytesIO(bytes(raw)))


def test_load_truncated_images_is_refused_as_the_callers_error(tmp_path, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(ValueError, match="LOAD_TRUNCATED_IMAGES is True"):
        ImageFolder(tmp_path)


def test_a_5000_digit_limit_in_the_environment_names_the_variable(monkeypatch):
    monkeypatch.setenv("VIT_VQ_MAX_IMAGE_PIXELS", "9" * 5000)
    with pytest.raises(ValueError) as caught:
        load_image(io.BytesIO(b"x"))
    message = str(caught.value)
    assert "VIT_VQ_MAX_IMAGE_PIXELS" in message and "5000 digits" in message and "\n" not in message
    assert "Exceeds the limit" not in message


@pytest.mark.parametrize(
    "image, reason",
    [
        (np.zeros((60000, 1, 3), dtype=np.uint8), "1x60000 px, an aspect ratio above the limit of 32:1"),
        (torch.zeros(3, 2, 20000), "20000x2 px, an aspect ratio above"),
        (Image.new("RGB", (20000, 2)), "20000x2 px, an aspect ratio above"),
        (np.zeros((300, 300), dtype=np.uint8), "300x300 px = 90,000 pixels, above the limit of 80,000"),
    ],
    ids=["array-strip", "tensor-strip", "pil-strip", "too-many-pixels"],
)
def test_in_memory_images_have_the_file_limits(image, reason, monkeypatch):
    monkeypatch.setenv("VIT_VQ_MAX_IMAGE_PIXELS", "80000")
    with pytest.raises(ValueError, match=reason):
        preprocess(image, 32)


def test_tokenize_batch_reports_oversized_in_memory_images_per_row(tiny_tokenizer_dir):
    from vit_vq.pipeline import TokenizeBatch

    ok = np.zeros((40, 40, 3), dtype=np.uint8)
    rows = [ok, np.zeros((60000, 1, 3), np.uint8), Image.new("RGB", (20000, 2))]
    out = TokenizeBatch(str(tiny_tokenizer_dir), device="cpu")({"image": rows})
    assert out["ok"].tolist() == [True, False, False]
    assert "aspect ratio above the limit of 32:1" in out["error"][1] and "20000x2 px" in out["error"][2]


def test_a_signed_8_bit_tiff_is_read_as_signed():
    tifffile = pytest.importorskip("tifffile")
    out = io.BytesIO()
    tifffile.imwrite(out, np.array([[-5, 100], [3, 127]], dtype=np.int8))
    with pytest.raises(ValueError, match="non-negative pixels in a signed 8-bit image, got a minimum of -5"):
        load_image(io.BytesIO(out.getvalue()))
    out = io.BytesIO()
    tifffile.imwrite(out, np.array([[0, 127]], dtype=np.int8))
    assert load_image(io.BytesIO(out.getvalue()))[0].tolist() == [[0.0, 1.0]]


def test_an_image_that_decodes_too_long_is_that_images_error(tmp_path, monkeypatch):
    """Any format that finds a way to be slow: the alarm turns it into a ValueError (issue 19, point 1)."""
    import time

    import vit_vq.data as data

    path = tmp_path / "slow.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path)

    def slow_decode(f):
        time.sleep(30)  # interrupted by the alarm long before it ends
        raise AssertionError("the alarm did not fire")

    monkeypatch.setattr(data, "_decode", slow_decode)
    monkeypatch.setattr(data, "DECODE_TIMEOUT_S", 1)
    with pytest.raises(ValueError, match=r"slow.png: took more than 1 s to decode \(vit_vq.data.DECODE_TIMEOUT_S"):
        data.load_image(path)
    monkeypatch.setattr(data, "_decode", lambda f: torch.zeros(3, 8, 8))
    assert data.load_image(path).shape == (3, 8, 8)  # the alarm is off again: no stray SIGALRM later
    time.sleep(1.2)


def test_a_malformed_decode_timeout_names_the_variable(tmp_path, monkeypatch):
    import vit_vq.data as data

    path = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path)
    monkeypatch.setenv("VIT_VQ_DECODE_TIMEOUT_S", "9" * 5000)
    with pytest.raises(ValueError, match="VIT_VQ_DECODE_TIMEOUT_S"):
        data.load_image(path)


def test_float_pixels_within_round_off_of_one_are_clamped_not_a_job_error(tmp_path, tiny_tokenizer_dir, capsys):
    """A float TIFF at the model's exact size with a pixel at 1.0005 (attacker review): coded, not fatal."""
    from vit_vq.cli.main import main

    a = np.full((32, 32), 0.5, np.float32)
    a[0, 0] = 1.0005
    Image.fromarray(a, "F").save(tmp_path / "float.tif")
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "ok.png")
    pixels = load_image(tmp_path / "float.tif")
    assert float(pixels.max()) == 1.0 and float(pixels.min()) == 0.5
    out = tmp_path / "c.safetensors"
    assert main(["encode", str(tmp_path), "-o", str(out), "--model", str(tiny_tokenizer_dir), "--num-workers", "0",
                 "--device", "cpu"]) == 0
    assert "skipped" not in capsys.readouterr().err


def _png(width: int, height: int, raw: bytes) -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def test_a_png_whose_data_ends_early_is_refused_not_black_filled(tmp_path):
    """A complete zlib stream of one row behind an 8192x8192 header (attacker review): Pillow gives black rows."""
    row = b"\x00" + bytes(range(256)) * 3 * 32  # filter byte + 8192 RGB pixels
    lying = tmp_path / "lying.png"
    lying.write_bytes(_png(8192, 8192, row))
    with pytest.raises(ValueError, match=r"truncated PNG: its image data inflates to 24,577 bytes, fewer than the"):
        load_image(lying)
    short = tmp_path / "short.png"
    short.write_bytes(_png(64, 64, (b"\x00" + bytes(64 * 3)) * 6))  # 6 of 64 rows
    with pytest.raises(ValueError, match="truncated PNG"):
        load_image(short)
    whole = tmp_path / "whole.png"
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    whole.write_bytes(_png(64, 64, b"".join(b"\x00" + r.tobytes() for r in pixels)))
    assert torch.equal((load_image(whole) * 255).round().to(torch.uint8), torch.from_numpy(pixels).permute(2, 0, 1))


def test_a_small_image_in_a_huge_file_is_refused_unread(tmp_path):
    """64x64 pixels padded to 64 MB (sparse: no disk used): never read into memory (attacker review)."""
    for fmt in ("JPEG", "WEBP", "PNG"):
        path = tmp_path / f"padded.{fmt.lower()}"
        Image.new("RGB", (64, 64)).save(path, fmt)
        with open(path, "r+b") as f:
            f.truncate(64 << 20)
        with pytest.raises(ValueError, match=r"more than a 64x64 image can need"):
            load_image(path)


def test_empty_restart_intervals_are_refused(tmp_path):
    """A JPEG with restart markers whose intervals were dropped: libjpeg fills them grey and only warns."""
    import re

    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(data.astronaut()).save(buf, "JPEG", restart_marker_blocks=1)
    whole = buf.getvalue()
    (tmp_path / "whole.jpg").write_bytes(whole)
    assert load_image(tmp_path / "whole.jpg").shape == (3, 512, 512)
    sos = whole.index(b"\xff\xda")
    start = sos + 2 + int.from_bytes(whole[sos + 2 : sos + 4], "big")
    parts = re.split(rb"(\xff[\xd0-\xd7])", whole[start : whole.rindex(b"\xff\xd9")])
    kept = b"".join(p for i, p in enumerate(parts) if i % 2 == 1 or i < len(parts) // 10)  # 10% of the intervals
    (tmp_path / "cut.jpg").write_bytes(whole[:start] + kept + b"\xff\xd9")
    with pytest.raises(ValueError, match="a restart interval holds less than 2 bits per block"):
        load_image(tmp_path / "cut.jpg")


def test_restart_intervals_of_one_junk_byte_are_refused(tmp_path):
    """Second attack pass: one byte per dropped interval passed the 'not empty' rule with 95% grey."""
    import re

    buf = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buf, "JPEG", restart_marker_blocks=1)
    whole = buf.getvalue()
    sos = whole.index(b"\xff\xda")
    start = sos + 2 + int.from_bytes(whole[sos + 2 : sos + 4], "big")
    parts = re.split(rb"(\xff[\xd0-\xd7])", whole[start : whole.rindex(b"\xff\xd9")])
    junk = b"".join(p if i % 2 == 1 or i < 20 or i == len(parts) - 1 else b"\x00" for i, p in enumerate(parts))
    (tmp_path / "junk.jpg").write_bytes(whole[:start] + junk + b"\xff\xd9")
    with pytest.raises(ValueError, match="less than 2 bits per block"):
        load_image(tmp_path / "junk.jpg")


def test_a_padded_ihdr_cannot_hide_a_fake_idat(tmp_path):
    """Second attack pass: chunks are walked by their own lengths from the signature on."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    rows = (b"\x00" + bytes(64 * 3)) * 64
    fake = chunk(b"IDAT", zlib.compress(rows))  # a whole image's data, hidden inside IHDR
    ihdr = struct.pack(">IIBBBBB", 64, 64, 8, 2, 0, 0, 0) + bytes(4) + fake
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows[: 1 + 64 * 3])) + chunk(b"IEND", b"")
    (tmp_path / "padded.png").write_bytes(png)
    with pytest.raises(ValueError):
        load_image(tmp_path / "padded.png")


def test_many_identical_names_get_distinct_outputs():
    from vit_vq.cli.common import output_names

    out = output_names(["a"] * 3000 + ["a-1"])
    assert len(set(out)) == 3001 and out[0].name == "a.png" and out[2999].name == "a-2999.png"
