"""Pixels are read exactly from every common format, and layouts that read two ways are refused."""

import numpy as np
import pytest
import torch
from PIL import Image

from vit_vq.data import load_image
from vit_vq.preprocess import preprocess, to_tensor


def _gradient(dtype, peak: float, shape=(48, 80)) -> np.ndarray:
    return np.linspace(0, peak, shape[0] * shape[1]).reshape(shape).astype(dtype)


@pytest.mark.parametrize("suffix, dtype", [(".png", "<u2"), (".tif", "<u2"), (".tif", ">u2"), (".pgm", "<u2")])
def test_sixteen_bit_grey_images_are_divided_by_65535(tmp_path, suffix, dtype):
    grey = _gradient(dtype, 65535)
    Image.fromarray(grey).save(tmp_path / f"g{suffix}")  # opens as I;16, I;16B, or I (PGM)
    pixels = load_image(tmp_path / f"g{suffix}")
    expected = torch.from_numpy(grey.astype(np.float64) / 65535)
    assert pixels.shape == (3, *grey.shape) and pixels.dtype == torch.float32
    for c in range(3):
        torch.testing.assert_close(pixels[c].double(), expected, rtol=0, atol=1e-7)
    assert float(pixels.max()) == 1.0 and 0.4 < float(pixels.mean()) < 0.6  # not clipped to white


def test_thirty_two_bit_images_are_divided_by_their_range(tmp_path):
    signed = _gradient(np.int32, 2**31 - 1)
    Image.fromarray(signed).save(tmp_path / "i32.tif")  # Pillow writes signed 32-bit TIFFs
    expected = torch.from_numpy(signed / (2**31 - 1))
    torch.testing.assert_close(load_image(tmp_path / "i32.tif")[0].double(), expected, rtol=0, atol=1e-7)
    unsigned = _gradient(np.uint32, 2**32 - 1)  # mode I keeps these bits in int32 storage
    expected = torch.from_numpy(unsigned / (2**32 - 1))
    torch.testing.assert_close(to_tensor(Image.fromarray(unsigned))[1].double(), expected, rtol=0, atol=1e-7)
    torch.testing.assert_close(to_tensor(unsigned)[2].double(), expected, rtol=0, atol=1e-7)


def test_float_tiffs_are_taken_as_zero_to_one_and_refused_outside(tmp_path):
    values = _gradient(np.float32, 1.0)
    Image.fromarray(values).save(tmp_path / "f.tif")  # mode F
    pixels = load_image(tmp_path / "f.tif")
    assert torch.equal(pixels, torch.from_numpy(values).expand(3, -1, -1))
    Image.fromarray(values * 300).save(tmp_path / "hdr.tif")
    with pytest.raises(ValueError, match=r"hdr\.tif: expected float pixels in \[0, 1\], got values in \[0, 300\]"):
        load_image(tmp_path / "hdr.tif")


def test_exif_orientation_is_applied(tmp_path, photos):
    photo = np.ascontiguousarray(photos[0][:48, :80])  # (48, 80, 3): not square, not symmetric
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(photo).save(tmp_path / "phone.jpg", quality=95, exif=exif)
    with Image.open(tmp_path / "phone.jpg") as im:
        stored = np.asarray(im)  # the pixels as stored, on their side
    expected = torch.from_numpy(np.rot90(stored, k=-1).copy()).permute(2, 0, 1).float() / 255
    pixels = load_image(tmp_path / "phone.jpg")
    assert pixels.shape == (3, 80, 48)
    assert torch.equal(pixels, expected)
    with Image.open(tmp_path / "phone.jpg") as im:  # a PIL image given directly is turned too
        assert torch.equal(to_tensor(im), expected)


def test_palette_and_grey_alpha_images_give_their_colours(photos):
    palette_image = Image.fromarray(photos[1]).quantize(colors=16)
    palette = np.array(palette_image.getpalette()[: 16 * 3], dtype=np.uint8).reshape(16, 3)
    expected = torch.from_numpy(palette[np.asarray(palette_image)]).permute(2, 0, 1).float() / 255
    assert torch.equal(to_tensor(palette_image), expected)
    grey = photos[2][..., 0]
    grey_alpha = Image.fromarray(np.stack([grey, np.full_like(grey, 7)], -1), mode="LA")
    assert torch.equal(to_tensor(grey_alpha), torch.from_numpy(grey).float().div(255).expand(3, -1, -1))


def test_uint16_arrays_and_unambiguous_layouts():
    rgb16 = _gradient(np.uint16, 65535, (50, 40 * 3)).reshape(50, 40, 3)
    expected = torch.from_numpy(rgb16.astype(np.float64) / 65535).permute(2, 0, 1)
    torch.testing.assert_close(to_tensor(rgb16).double(), expected, rtol=0, atol=1e-7)
    hwc = torch.rand(50, 40, 3)
    assert torch.equal(to_tensor(hwc), hwc.permute(2, 0, 1))
    assert torch.equal(to_tensor(hwc.permute(2, 0, 1)), hwc.permute(2, 0, 1))


@pytest.mark.parametrize("shape", [(4, 50, 3), (3, 50, 3), (4, 50, 4), (1, 20, 3)])
def test_ambiguous_layouts_are_refused_naming_the_accepted_ones(shape):
    with pytest.raises(ValueError, match=r"ambiguous image shape .*accepted layouts are \[H, W\], \[C, H, W\] or \[H, W, C\]"):
        to_tensor(torch.rand(shape))
    with pytest.raises(ValueError, match="ambiguous image shape"):
        preprocess(np.random.rand(*shape).astype(np.float32), 32)


def test_a_shape_with_no_channel_axis_is_refused():
    with pytest.raises(ValueError, match=r"expected 1, 3 or 4 channels .* got \(5, 50, 6\)"):
        to_tensor(torch.rand(5, 50, 6))
    with pytest.raises(TypeError, match="expected uint8, uint16, uint32 or float pixels, got numpy dtype int64"):
        to_tensor(np.zeros((8, 8, 3), dtype=np.int64))
