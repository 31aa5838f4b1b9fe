"""`TokenizeBatch` in `datasets.Dataset.map(batched=True)`, pickled, and with Ray-style numpy batches.

The real Ray pipeline of `examples/tokenize_with_ray.py` is tested in `test_ray_datasets.py`.
"""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from vit_vq import ViTVQTokenizer
from vit_vq.pipeline import TokenizeBatch


@pytest.fixture
def tok(tiny_tokenizer_dir) -> ViTVQTokenizer:
    return ViTVQTokenizer.from_pretrained(tiny_tokenizer_dir)


def test_datasets_map_batched(tmp_path, photos, tiny_tokenizer_dir, tok):
    import datasets

    images = [Image.fromarray(p).resize((40, 36)) for p in photos[:5]]
    encoded = []
    for im in images:
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        encoded.append({"bytes": buf.getvalue(), "path": None})
    encoded[2] = {"bytes": b"not an image", "path": "photos/broken.png"}
    ds = datasets.Dataset.from_dict({"image": encoded, "label": list(range(5))})
    ds = ds.cast_column("image", datasets.Image(decode=False))

    fn = TokenizeBatch(str(tiny_tokenizer_dir), device="cpu")
    out = ds.map(fn, batched=True, batch_size=2)
    assert set(out.column_names) == {"image", "label", "codes", "ok", "error"}
    assert out["ok"] == [True, True, False, True, True]
    assert "not a readable image (UnidentifiedImageError" in out["error"][2] and out["error"][0] == ""
    assert out["error"][2].startswith("batch row 0 (photos/broken.png): ")  # row 2 is the first of the second batch
    indexed = TokenizeBatch(str(tiny_tokenizer_dir), device="cpu").map_dataset(ds, batch_size=2)
    assert indexed["error"][2].startswith("row 2 (photos/broken.png): image bytes")
    assert indexed["ok"] == out["ok"] and indexed["codes"] == out["codes"]
    expected = tok.encode(tok.preprocess([images[i] for i in (0, 1, 3, 4)]))
    got = torch.tensor(np.array([out[i]["codes"] for i in (0, 1, 3, 4)]))
    assert torch.equal(got.long(), expected)
    assert fn.info.config_hash == tok.config.config_hash() and fn.info.precision == "fp32"


def test_pickle_drops_the_loaded_model(tiny_tokenizer_dir, photos, tok):
    fn = TokenizeBatch(str(tiny_tokenizer_dir), device="cpu")
    batch = {"image": [Image.fromarray(p) for p in photos[:2]]}
    first = fn(batch)
    blob = pickle.dumps(fn)
    assert len(blob) < 2000  # the id and settings, not the weights
    again = pickle.loads(blob)(batch)
    np.testing.assert_array_equal(first["codes"], again["codes"])
    assert first["codes"].dtype == np.uint8 and first["codes"].shape == (2, 8, 8)


def test_ray_style_numpy_batch(tiny_tokenizer_dir, photos, tok):
    stack = np.stack([np.asarray(Image.fromarray(p).resize((32, 32))) for p in photos[:3]])  # (3, 32, 32, 3) uint8
    batch = {"image": stack, "path": np.array(["a.png", "b.png", "c.png"])}
    fn = TokenizeBatch(str(tiny_tokenizer_dir), passthrough=("path",), device="cpu", resize="none")
    out = fn(batch)
    assert set(out) == {"path", "codes", "ok", "error"}
    assert out["ok"].tolist() == [True, True, True]
    np.testing.assert_array_equal(out["path"], batch["path"])
    expected = tok.encode(torch.from_numpy(stack).permute(0, 3, 1, 2).contiguous())  # uint8 [B, 3, 32, 32]
    assert torch.equal(torch.from_numpy(out["codes"].astype(np.int64)), expected)

    wrong_size = {"image": [np.zeros((20, 30, 3), np.uint8)], "path": ["d.png"]}
    res = fn(wrong_size)
    assert res["ok"].tolist() == [False] and "30x20 px but the model takes 32x32" in res["error"][0]
    with pytest.raises(KeyError, match="no column 'pixels'"):
        TokenizeBatch(str(tiny_tokenizer_dir), image_column="pixels", device="cpu")(batch)


def test_in_memory_tokenizer(tok, photos):
    fn = TokenizeBatch(tok, device="cpu")
    out = fn({"image": [torch.from_numpy(photos[0]).permute(2, 0, 1)]})
    assert out["ok"].tolist() == [True] and fn.info.model_id == "<in-memory>"


def test_empty_bytes_are_an_empty_image_not_a_path_lookup(tmp_path, monkeypatch, tok, photos):
    """`{"bytes": b"", "path": "x.png"}` must not fall back to reading `x.png` (it exists here, and is fine)."""
    monkeypatch.chdir(tmp_path)
    Image.fromarray(photos[0]).resize((40, 36)).save(tmp_path / "x.png")
    out = TokenizeBatch(tok)({"image": [{"bytes": b"", "path": "x.png"}, {"bytes": None, "path": "x.png"}]})
    assert list(out["ok"]) == [False, True]
    assert out["error"][0].startswith("batch row 0 (x.png): ") and "empty image bytes" in out["error"][0]
