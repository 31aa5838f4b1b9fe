"""benchmarks/bench_codecs.py and the blockiness metric: checked against independent computations."""

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vit_vq import ViTVQConfig, ViTVQTokenizer
from vit_vq.metrics import blockiness, psnr

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_codecs  # noqa: E402


def blockiness_loops(img: np.ndarray, block: int) -> float:
    """float64 reference with explicit loops: img `[C, H, W]`."""
    C, H, W = img.shape
    ratios = []
    for horizontal in (True, False):
        edge, inside = [], []
        for c in range(C):
            for i in range(H if horizontal else H - 1):
                for j in range(W - 1 if horizontal else W):
                    a = img[c, i, j]
                    b = img[c, i, j + 1] if horizontal else img[c, i + 1, j]
                    k = j if horizontal else i
                    (edge if (k + 1) % block == 0 else inside).append(abs(b - a))
        ratios.append(np.mean(edge) / np.mean(inside))
    return float(np.mean(ratios))


@pytest.mark.parametrize("block", [4, 8])
def test_blockiness_matches_a_loop_reference(block):
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 24, 20, generator=gen, dtype=torch.float64)
    x[:, :, :, ::block] += 0.5  # a seam every block columns
    got = blockiness(x, block=block)
    for k in range(2):
        assert got[k].item() == pytest.approx(blockiness_loops(x[k].numpy(), block), rel=1e-5)
    assert (got > 1.05).all()


def test_blockiness_is_one_on_a_ramp_and_large_on_flat_blocks():
    i, j = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    ramp = ((i + 2 * j) / 100).expand(1, 3, 32, 32)
    assert blockiness(ramp).item() == pytest.approx(1.0, abs=1e-6)  # every step alike
    flat = torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(1)).repeat_interleave(8, 2).repeat_interleave(8, 3)
    flat = flat + ramp * 0.01  # tiny slope inside blocks
    assert blockiness(flat).item() > 50


def test_budget_search_brackets_the_budget_and_interpolates(photos):
    ref = Image.fromarray(photos[1]).resize((96, 96), Image.Resampling.LANCZOS)
    budget = 400
    r = bench_codecs.at_budget(ref, "WebP", True, budget, 8)
    assert r is not None and r["bytes"] == budget
    q = r["fitting_quality"]

    def size(quality: int) -> int:  # Pillow directly, at half resolution
        buf = io.BytesIO()
        ref.resize((48, 48), Image.Resampling.LANCZOS).save(buf, "WEBP", quality=quality, method=6)
        return len(buf.getvalue())

    assert size(q) == r["fitting_bytes"] <= budget < size(q + 1)
    assert q <= r["quality"] <= q + 1
    target = bench_codecs.from_pil(ref)[None]
    lo = bench_codecs.encode(ref, "WebP", q, True).image[None]
    hi = bench_codecs.encode(ref, "WebP", q + 1, True).image[None]
    a, b = psnr(lo, target).item(), psnr(hi, target).item()
    assert min(a, b) - 1e-6 <= r["psnr"] <= max(a, b) + 1e-6
    assert bench_codecs.at_budget(ref, "JPEG", False, 200, 8) is None  # no 96 px JPEG fits 200 bytes


def test_bench_codecs_end_to_end_on_a_small_tokenizer(tmp_path, photos):
    torch.manual_seed(0)
    cfg = ViTVQConfig.from_preset("tiny", image_size=64)  # 16x16 codes of 8 bits: 256 bytes
    ViTVQTokenizer(cfg).save_pretrained(tmp_path / "model")
    pics = tmp_path / "photos"
    pics.mkdir()
    for k in range(3):
        Image.fromarray(photos[k]).save(pics / f"p{k}.png")
    bench_codecs.main(["--out", str(tmp_path / "out"), "--model", f"tiny={tmp_path / 'model'}", "--photos", str(pics)])
    record = json.loads((tmp_path / "out" / "bench_codecs.json").read_text())
    assert record["budget_bytes"] == 256 and record["num_photos"] == 3
    assert set(record["rows"]) >= {"original", "tokenizer (tiny)", "WebP half res, bicubic up", "AVIF full res"}
    webp = record["per_photo"]["WebP half res, bicubic up"]
    assert all(v is None or v["fitting_bytes"] <= 256 for v in webp.values())
    assert record["rows"]["original"]["blockiness"] == pytest.approx(
        float(np.mean([blockiness(bench_codecs.from_pil(
            bench_codecs.read_photos([pics / f"p{k}.png"], 64)[f"p{k}"])[None], block=4).item() for k in range(3)])), rel=1e-6)
    assert "| tokenizer (tiny) | 3/3 |" in (tmp_path / "out" / "bench_codecs.md").read_text()
    with Image.open(tmp_path / "out" / "bench_codecs.png") as im:
        assert im.width == 64 * 2 * (3 if webp and any(webp.values()) else 2)
