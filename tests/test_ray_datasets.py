"""The data-engine paths against the real libraries, with one corrupt file among real photos.

Ray Data: `examples/tokenize_with_ray.py` end to end (bytes read by Ray, decoded by
`TokenizeBatch` in Ray actors, Parquet written, read back as `[N, h, w]`). `datasets`: an
`Image()` column with a corrupt row through `TokenizeBatch.map_dataset`, and the on-disk
`map` cache invalidated when the weights in the model folder change.
"""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vit_vq import ViTVQConfig, ViTVQTokenizer
from vit_vq.data import load_image
from vit_vq.pipeline import TokenizeBatch

CORRUPT = b"\xff\xd8\xff\xe0 a truncated jpeg"


@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray", reason="ray[data] is not installed")
    # two logical CPUs: one for the read task, one for the TokenizeBatch actor (with one they wait on each other)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


def load_example():
    path = Path(__file__).resolve().parents[1] / "examples" / "tokenize_with_ray.py"
    spec = importlib.util.spec_from_file_location("tokenize_with_ray", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def api_codes(tok: ViTVQTokenizer, images: list) -> torch.Tensor:
    return tok.encode(tok.preprocess(images))


@pytest.mark.slow
def test_ray_example_reports_a_corrupt_file_and_reads_back_grids(ray_session, tmp_path, photo_dir, tiny_tokenizer_dir):
    import pyarrow.dataset as pads

    (photo_dir / "sub" / "corrupt.jpg").write_bytes(CORRUPT)
    example = load_example()
    out = tmp_path / "codes"
    argv = ["--data", str(photo_dir), "--out", str(out), "--model", str(tiny_tokenizer_dir), "--batch-size", "3",
            "--workers", "1", "--gpus-per-worker", "0", "--precision", "fp32"]
    assert example.main(argv) == 0

    table = pads.dataset(str(out), format="parquet").to_table(columns=["path", "ok", "error"]).to_pylist()
    assert len(table) == 7  # six photos and the corrupt file: every input has a row
    bad = [row for row in table if not row["ok"]]
    assert [Path(row["path"]).name for row in bad] == ["corrupt.jpg"]
    assert "not a readable image" in bad[0]["error"]

    codes, paths = example.read_codes(str(out))
    assert codes.shape == (6, 8, 8) and codes.dtype == np.uint8
    tok = ViTVQTokenizer.from_pretrained(tiny_tokenizer_dir)
    expected = api_codes(tok, [load_image(p) for p in paths])
    assert sorted(Path(p).name for p in paths) == sorted(p.name for p in photo_dir.rglob("*.png"))
    assert torch.equal(torch.from_numpy(codes.astype(np.int64)), expected)


def image_rows(photos, corrupt_at: int) -> list[dict]:
    rows = []
    for i, p in enumerate(photos[:5]):
        buf = io.BytesIO()
        Image.fromarray(p).resize((40, 36)).save(buf, format="PNG")
        rows.append({"bytes": CORRUPT if i == corrupt_at else buf.getvalue(), "path": f"img{i}.png"})
    return rows


def test_datasets_image_column_with_a_corrupt_row(tmp_path, photos, tiny_tokenizer_dir):
    import datasets

    ds = datasets.Dataset.from_dict({"image": image_rows(photos, corrupt_at=2), "label": list(range(5))})
    ds = ds.cast_column("image", datasets.Image())  # decoded on access: plain `map` dies on the corrupt row
    with pytest.raises(OSError):  # PIL's error, raised by datasets before the function sees the row
        ds.map(TokenizeBatch(str(tiny_tokenizer_dir), device="cpu"), batched=True, batch_size=2)

    out = TokenizeBatch(str(tiny_tokenizer_dir), device="cpu").map_dataset(ds, batch_size=2)
    assert out["ok"] == [True, True, False, True, True]
    assert "not a readable image" in out["error"][2] and out["error"][0] == ""
    assert out.features["image"] == datasets.Image()  # the column is given back as it came
    tok = ViTVQTokenizer.from_pretrained(tiny_tokenizer_dir)
    good = [0, 1, 3, 4]
    expected = api_codes(tok, [out[i]["image"] for i in good])
    assert torch.equal(torch.tensor(np.array([out[i]["codes"] for i in good])).long(), expected)

    # The documented follow-up: filter on `ok` alone (whole-row functions would decode the corrupt image again).
    kept = out.filter(lambda ok: ok, input_columns="ok")
    assert len(kept) == 4 and kept["error"] == [""] * 4
    assert out.filter(lambda ok: not ok, input_columns="ok")["error"][0] == out["error"][2]

    splits = TokenizeBatch(str(tiny_tokenizer_dir), device="cpu").map_dataset(datasets.DatasetDict(train=ds), batch_size=2)
    assert splits["train"]["ok"] == out["ok"]


def test_datasets_cache_follows_the_weights(tmp_path, photos):
    """`map` on a dataset on disk caches by fingerprint: new weights in the same folder must not hit that cache."""
    import datasets

    model_dir = tmp_path / "model"
    tokenizers = []
    for seed in (0, 1):
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            tokenizers.append(ViTVQTokenizer(ViTVQConfig.from_preset("tiny")))
    tokenizers[0].save_pretrained(model_dir)
    rows = image_rows(photos, corrupt_at=-1)
    datasets.Dataset.from_dict({"image": rows}).cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "ds"))
    ds = datasets.load_from_disk(str(tmp_path / "ds"))
    images = [load_image(io.BytesIO(r["bytes"])) for r in rows]

    first = TokenizeBatch(str(model_dir), device="cpu").map_dataset(ds, batch_size=2)
    again = TokenizeBatch(str(model_dir), device="cpu").map_dataset(ds, batch_size=2)
    assert again._fingerprint == first._fingerprint and first.cache_files  # unchanged weights: the cache serves
    assert torch.equal(torch.tensor(np.array(first["codes"])).long(), api_codes(tokenizers[0], images))

    tokenizers[1].save_pretrained(model_dir)  # same folder, same config, other weights
    second = TokenizeBatch(str(model_dir), device="cpu").map_dataset(ds, batch_size=2)
    assert second._fingerprint != first._fingerprint
    expected = api_codes(tokenizers[1], images)
    assert not torch.equal(expected, api_codes(tokenizers[0], images))
    assert torch.equal(torch.tensor(np.array(second["codes"])).long(), expected)


def test_default_model_by_name_pickles_without_weights(photos):
    import pickle

    fn = TokenizeBatch("vit_vq:default", device="cpu")
    blob = pickle.dumps(fn)
    assert len(blob) < 2000  # the name, settings and a weights fingerprint; not the weights
    batch = {"image": [Image.fromarray(p) for p in photos[:2]] + [CORRUPT]}
    out = pickle.loads(blob)(batch)
    tok = ViTVQTokenizer.default()
    assert out["ok"].tolist() == [True, True, False]
    assert torch.equal(torch.from_numpy(out["codes"][:2].astype(np.int64)), api_codes(tok, batch["image"][:2]))
