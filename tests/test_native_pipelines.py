"""Grids of many shapes through every pipeline (issue 20, part 3; issue 19, point 5).

A folder of real photos at five aspect ratios (one of them over the tiny model's token budget at
its short side) goes through `vit-vq encode --resize native` / `decode`, `vit-vq tokenize` with two
torchrun processes, `TokenizeBatch` under `datasets` and Ray. Each image's grid is checked against
the public API on that image alone (`tok.preprocess(..., resize="native")` then `tok.encode`), by
name, so both shapes and order are checked; decoded PNGs against `tok.decode` of that grid.
Hostile format-3 codes files are refused with one line naming the file and the key.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import save_file

from vit_vq import ViTVQTokenizer
from vit_vq.cli.main import main
from vit_vq.data import load_image
from vit_vq.pipeline import TokenizeBatch, iter_shards, load_codes, load_manifest, save_codes
from vit_vq.pipeline.batching import DEFAULT_BATCH_TOKENS, decode_grids, images_per_pass, shape_chunks
from vit_vq.pipeline.runtime import ModelInfo

FAST = ["--num-workers", "0", "--device", "cpu"]
# (width, height) of each photo: 3:2, 2:3, 2:1, 1:1, nearly square, and a 20:1 strip whose native grid at short
# side 32 px (8 x 160 = 1280 tokens) is over the tiny model's budget of 1024
SIZES = [(48, 32), (32, 48), (64, 32), (40, 40), (36, 32), (400, 20)]
OVER_BUDGET = "strip.png"


@pytest.fixture
def mixed_dir(tmp_path, photos):
    root = tmp_path / "mixed"
    (root / "sub").mkdir(parents=True)
    for i, (w, h) in enumerate(SIZES):
        name = OVER_BUDGET if (w, h) == (400, 20) else f"photo{i}.png"
        folder = root / "sub" if i % 2 and name != OVER_BUDGET else root
        Image.fromarray(photos[i % len(photos)]).resize((w, h)).save(folder / name)
    return root


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    return ViTVQTokenizer.from_pretrained(tiny_tokenizer_dir)


def reference(tok: ViTVQTokenizer, path: Path, resize: str = "native") -> torch.Tensor:
    """The grid of one image through the public API alone."""
    pixels = tok.preprocess(load_image(path), resize=resize)
    return tok.encode(pixels)[0]


def by_name(root: Path) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in sorted(root.rglob("*.png"))}


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = main([*map(str, argv)])
    return code, capsys.readouterr().err


# -- batching ---------------------------------------------------------------------------
def test_shape_chunks_keep_one_shape_within_the_budget_and_every_position_once():
    shapes = [(8, 12), (12, 8), (8, 12), (8, 8), (8, 12), (12, 8), (8, 12)]
    chunks = shape_chunks(shapes, batch_size=64, batch_tokens=200)  # two 8x12 grids (192 tokens) per pass
    assert sorted(i for c in chunks for i in c) == list(range(len(shapes)))
    for chunk in chunks:
        assert len({shapes[i] for i in chunk}) == 1 and chunk == sorted(chunk)
        assert len(chunk) == 1 or sum(shapes[i][0] * shapes[i][1] for i in chunk) <= 200
    assert chunks[0] == [0, 2] and chunks[1] == [4, 6]
    # a model whose one image is 2**16 tokens (a 256x256 grid) decodes one image per pass whatever --batch-size says
    assert images_per_pass(256 * 256, batch_size=64) == 1 and DEFAULT_BATCH_TOKENS == 256 * 256
    assert images_per_pass(16 * 16, batch_size=64) == 64  # the default model at its own grid: unchanged


def test_decode_lowers_its_batch_for_large_grids(tok, monkeypatch):
    seen = []
    real = ViTVQTokenizer.decode
    monkeypatch.setattr(ViTVQTokenizer, "decode", lambda self, x, **kw: seen.append(tuple(x.shape)) or real(self, x, **kw))
    grids = [torch.randint(0, 256, s) for s in [(8, 8)] * 5 + [(16, 32)] * 3]
    images = decode_grids(tok, grids, batch_size=64, batch_tokens=1024)
    assert seen == [(5, 8, 8), (2, 16, 32), (1, 16, 32)]  # 512-token grids: two per 1024-token pass
    for grid, image in zip(grids, images, strict=True):
        assert image.shape == (3, grid.shape[0] * 4, grid.shape[1] * 4)
        torch.testing.assert_close(image, real(tok, grid[None])[0])


# -- CLI ----------------------------------------------------------------------------------
def test_cli_encode_decode_keeps_each_images_shape(capsys, tmp_path, mixed_dir, tiny_tokenizer_dir, tok):
    codes_path = tmp_path / "codes.safetensors"
    code, err = run_cli(capsys, "encode", mixed_dir, "-o", codes_path, "--model", tiny_tokenizer_dir, "--resize", "native",
                        "--batch-size", "2", *FAST)
    assert code == 0, err
    assert f"skipped {OVER_BUDGET}" in err and "1280 tokens, above the model's budget of 1024" in err

    codes = load_codes(codes_path)
    assert codes.format_version == 3 and not codes.uniform and codes.token_budget == tok.config.token_budget
    files = {k: p for k, p in by_name(mixed_dir).items() if k != OVER_BUDGET}
    assert sorted(codes.names) == sorted(files)
    assert set(codes.grid_shapes) == {(8, 12), (12, 8), (8, 16), (8, 8), (8, 9)}
    for name, grid in zip(codes.names, codes.grids, strict=True):
        assert torch.equal(grid, reference(tok, files[name])), name

    out = tmp_path / "decoded"
    code, err = run_cli(capsys, "decode", codes_path, "-o", out, "--model", tiny_tokenizer_dir, "--batch-tokens", "100",
                        *FAST)
    assert code == 0, err
    for name, grid in zip(codes.names, codes.grids, strict=True):
        image = np.asarray(Image.open((out / name).with_suffix(".png")).convert("RGB"))
        expected = (tok.decode(grid[None])[0].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        assert image.shape == (grid.shape[0] * 4, grid.shape[1] * 4, 3)
        assert np.abs(image.astype(int) - expected.astype(int)).max() <= 1

    # budget: the strip too, within the budget; short side 64 px doubles the grids
    code, err = run_cli(capsys, "encode", mixed_dir / OVER_BUDGET, "-o", tmp_path / "b.safetensors", "--model",
                        tiny_tokenizer_dir, "--resize", "budget", *FAST)
    assert code == 0, err
    strip = load_codes(tmp_path / "b.safetensors")
    assert strip.format_version == 2 and strip.grid[0] * strip.grid[1] <= 1024 and strip.grid[1] > 10 * strip.grid[0]
    assert torch.equal(strip.grids[0], reference(tok, mixed_dir / OVER_BUDGET, "budget"))
    code, err = run_cli(capsys, "encode", mixed_dir / "photo0.png", "-o", tmp_path / "s.safetensors", "--model",
                        tiny_tokenizer_dir, "--resize", "native", "--short-side", "64", *FAST)
    assert code == 0 and load_codes(tmp_path / "s.safetensors").grid == (16, 24)


def test_reconstruct_writes_side_by_sides_at_native_shape(capsys, tmp_path, mixed_dir, tiny_tokenizer_dir):
    out = tmp_path / "pairs"
    code, err = run_cli(capsys, "reconstruct", mixed_dir, "-o", out, "--model", tiny_tokenizer_dir, "--resize", "native",
                        *FAST)
    assert code == 0, err
    assert np.asarray(Image.open(out / "photo0.png")).shape == (32, 2 * 48, 3)
    assert np.asarray(Image.open(out / "sub" / "photo1.png")).shape == (48, 2 * 32, 3)


def test_square_runs_keep_writing_format_2(capsys, tmp_path, photo_dir, tiny_tokenizer_dir):
    path = tmp_path / "c.safetensors"
    code, err = run_cli(capsys, "encode", photo_dir, "-o", path, "--model", tiny_tokenizer_dir, "--resize", "native",
                        *FAST)
    assert code == 0, err  # 96x96 photos: one shape, so the layout older vit_vq versions read
    codes = load_codes(path)
    assert codes.format_version == 2 and codes.codes.shape == (6, 8, 8) and codes.uniform


# -- codes files: format 3 refused when hostile --------------------------------------------
def format3(path: Path, *, codes: np.ndarray, shapes: np.ndarray | None, names: list[str], **meta) -> Path:
    info = ModelInfo("m", None, "abc", "d" * 16, "torch", "exact", "fp32")
    header = {"format": "vit_vq.codes", "format_version": "3", "names": json.dumps(names), "codebook_size": "256",
              "image_size": "32", "token_budget": "1024", "vit_vq_version": "0",
              **{k: json.dumps(v) for k, v in info.to_dict().items()}}
    header.update({k: v for k, v in meta.items() if v is not None})
    for k in [k for k, v in meta.items() if v is None]:
        header.pop(k)
    tensors = {"codes": codes} if shapes is None else {"codes": codes, "shapes": shapes}
    save_file(tensors, str(path), metadata=header)
    return path


def test_codes_file_round_trip_and_old_readers(tmp_path):
    info = ModelInfo("m", None, "abc", "d" * 16, "torch", "exact", "fp32")
    grids = [torch.randint(0, 256, s) for s in [(8, 12), (12, 8), (8, 12), (3, 5)]]
    path = save_codes(tmp_path / "a.safetensors", grids, ["a", "b", "c", "d"], info=info, codebook_size=256,
                      image_size=32, token_budget=1024)
    codes = load_codes(path)
    assert codes.format_version == 3 and [tuple(g.shape) for g in codes.grids] == [(8, 12), (12, 8), (8, 12), (3, 5)]
    assert all(torch.equal(a, b) for a, b in zip(codes.grids, grids, strict=True))
    with pytest.raises(ValueError, match="grids of 3 shapes"):
        codes.grid  # noqa: B018
    # one shape: format 2, tensor [N, h, w], as older versions wrote and read it
    same = save_codes(tmp_path / "b.safetensors", grids[:1] * 2, ["a", "b"], info=info, codebook_size=256, image_size=32)
    old = load_codes(same)
    assert old.format_version == 2 and old.shapes is None and old.codes.shape == (2, 8, 12) and old.grid == (8, 12)
    assert [tuple(g.shape) for g in old.grids] == [(8, 12)] * 2


HOSTILE = {
    "shapes that add up to more than the codes": (np.zeros(95, np.uint8), np.array([[8, 12]]), {}, "adds up to 96"),
    "a negative side": (np.zeros(8, np.uint8), np.array([[-1, -8]]), {}, "'shapes' holds sides in \\[-8, -1\\]"),
    "a huge side": (np.zeros(8, np.uint8), np.array([[1 << 40, 1]]), {}, "outside|each side must be in"),
    "a grid over the token budget": (np.zeros(2048, np.uint8), np.array([[32, 64]]), {}, "2048 tokens, over"),
    "shapes [N, 3]": (np.zeros(8, np.uint8), np.array([[2, 2, 2]]), {}, "'shapes' is \\[1, 3\\]"),
    "float shapes": (np.zeros(8, np.uint8), np.array([[2.0, 4.0]], np.float32), {}, "'shapes' must hold integers"),
    "codes not flat": (np.zeros((1, 8), np.uint8), np.array([[1, 8]]), {}, "flat \\[T\\]"),
    "no shapes tensor": (np.zeros(8, np.uint8), None, {}, "needs a 'shapes' tensor"),
    "no token_budget": (np.zeros(8, np.uint8), np.array([[2, 4]]), {"token_budget": None}, "no 'token_budget'"),
    "a budget above any model's": (np.zeros(8, np.uint8), np.array([[2, 4]]), {"token_budget": str(1 << 20)},
                                   "'token_budget'"),
    "a 5000-digit budget": (np.zeros(8, np.uint8), np.array([[2, 4]]), {"token_budget": "9" * 5000}, "'token_budget'"),
    "shapes in a format-2 file": (np.zeros((1, 2, 4), np.uint8), np.array([[2, 4]]), {"format_version": "2"},
                                  "has no 'shapes' tensor"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_format_3_files_are_refused_in_one_line(tmp_path, case):
    codes, shapes, meta, message = HOSTILE[case]
    path = format3(tmp_path / "h.safetensors", codes=codes, shapes=shapes, names=["a.png"], **meta)
    with pytest.raises(ValueError, match=message) as err:
        load_codes(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_decode_refuses_grids_over_the_models_budget(capsys, tmp_path, tiny_tokenizer_dir, tok):
    """A file whose own token_budget is larger than the model's: refused before anything is decoded."""
    from vit_vq.pipeline.runtime import prepare_for_inference

    _, info = prepare_for_inference(tok, model_id=str(tiny_tokenizer_dir), revision=None, device="cpu", precision="fp32")
    grids = [torch.zeros(8, 8, dtype=torch.int64), torch.zeros(32, 64, dtype=torch.int64)]
    path = save_codes(tmp_path / "big.safetensors", grids, ["a", "b"], info=info, codebook_size=256, image_size=32,
                      token_budget=4096)
    out = tmp_path / "out"
    code = main(["decode", str(path), "-o", str(out), "--model", str(tiny_tokenizer_dir), *FAST])
    err = capsys.readouterr().err
    assert code != 0 and "grid 1 (b) is 32x64 = 2048 tokens, above" in err and "budget of 1024" in err
    assert not list(out.glob("*.png")) if out.exists() else True


# -- tokenize, datasets, Ray -------------------------------------------------------------
@pytest.mark.slow
def test_tokenize_two_processes_keeps_shapes_and_order(tmp_path, mixed_dir, tiny_tokenizer_dir, tok):
    from test_tokenize import torchrun

    out = tmp_path / "tokens"
    proc = torchrun("--data", mixed_dir, "--out", out, "--model", tiny_tokenizer_dir, "--shard-size", "2",
                    "--resize", "native", "--format", "npy", "--batch-size", "2")
    assert proc.returncode == 0, proc.stderr
    manifest = load_manifest(out)
    assert manifest["format_version"] == 3 and manifest["grid"] is None and manifest["token_budget"] == 1024
    assert manifest["world_size"] == 2 and manifest["num_images"] == 5 and manifest["num_skipped"] == 1
    assert OVER_BUDGET in manifest["skipped"][0]["path"] and "budget of 1024" in manifest["skipped"][0]["reason"]
    files = by_name(mixed_dir)
    seen = []
    for shard in iter_shards(out):
        assert shard["shapes"].tolist() == [list(g.shape) for g in shard["grids"]]
        for key, index, grid in zip(shard["keys"], shard["indices"].tolist(), shard["grids"], strict=True):
            assert torch.equal(grid, reference(tok, files[key])), key
            seen.append(index)
    assert seen == sorted(seen) and len(seen) == 5  # input order, across the two ranks' shards

    # a hostile shard: shapes that no longer add up to the codes
    shapes_file = next(out.glob("*.shapes.npy"))
    shapes = np.load(shapes_file)
    shapes[0, 0] += 1
    np.save(shapes_file, shapes)
    with pytest.raises(ValueError, match="'shapes' adds up to"):
        list(iter_shards(out))


def encoded_rows(photos, sizes) -> list[dict]:
    rows = []
    for i, (w, h) in enumerate(sizes):
        buf = io.BytesIO()
        Image.fromarray(photos[i % len(photos)]).resize((w, h)).save(buf, format="PNG")
        rows.append({"bytes": buf.getvalue(), "path": f"img{i}.png"})
    return rows


def test_datasets_rows_keep_their_grids(tiny_tokenizer_dir, tok, photos):
    import datasets

    rows = encoded_rows(photos, SIZES)
    ds = datasets.Dataset.from_dict({"image": rows}).cast_column("image", datasets.Image())
    out = TokenizeBatch(str(tiny_tokenizer_dir), device="cpu", resize="native").map_dataset(ds, batch_size=4)
    assert out["ok"] == [True] * 5 + [False] and "1280 tokens" in out["error"][5]
    for i in range(5):
        image = load_image(io.BytesIO(rows[i]["bytes"]))
        expected = tok.encode(tok.preprocess(image, resize="native"))[0]
        assert out[i]["shape"] == list(expected.shape)
        assert torch.equal(torch.tensor(out[i]["codes"]).long(), expected), i
    assert out[5]["shape"] == [0, 0]


@pytest.mark.slow
def test_ray_example_keeps_each_grid_and_reads_it_back(tmp_path, mixed_dir, tiny_tokenizer_dir, tok):
    """`examples/tokenize_with_ray.py --resize native`: Ray reads bytes, TokenizeBatch actors code whole images,
    Parquet is written, and `read_codes` (pyarrow only) gives each image's grid back with its shape."""
    import importlib.util

    ray = pytest.importorskip("ray", reason="ray[data] is not installed")
    path = Path(__file__).resolve().parents[1] / "examples" / "tokenize_with_ray.py"
    spec = importlib.util.spec_from_file_location("tokenize_with_ray", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        out = tmp_path / "codes"
        assert example.main(["--data", str(mixed_dir), "--out", str(out), "--model", str(tiny_tokenizer_dir),
                             "--batch-size", "3", "--workers", "1", "--gpus-per-worker", "0", "--precision", "fp32",
                             "--resize", "native"]) == 0
    finally:
        ray.shutdown()
    grids, paths = example.read_codes(str(out))
    assert sorted(Path(p).name for p in paths) == sorted(p.name for p in mixed_dir.rglob("*.png") if p.name != OVER_BUDGET)
    assert len({g.shape for g in grids}) == 5
    for grid, p in zip(grids, paths, strict=True):
        assert torch.equal(torch.from_numpy(grid.astype(np.int64)), reference(tok, Path(p))), p


# -- the AR example -------------------------------------------------------------------------
def test_gpt2_example_on_mixed_shapes(tmp_path, tiny_tokenizer_dir, tok, capsys, single_thread):
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "examples" / "generate_with_gpt2.py"
    spec = importlib.util.spec_from_file_location("generate_with_gpt2", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    result = example.main([
        "--model", str(tiny_tokenizer_dir), "--out", str(tmp_path), "--images", "6", "--steps", "30", "--resize", "native",
        "--batch-size", "6", "--width", "32", "--layers", "1", "--heads", "2", "--samples", "3", "--device", "cpu",
    ])
    assert result["shapes"] == [(8, 8), (8, 12), (12, 8)]  # 1:1, 3:2 and 2:3 crops at short side 32 px
    assert "3 grid shapes, each a conditioning token" in capsys.readouterr().out
    assert np.mean(result["losses"][-5:]) < np.mean(result["losses"][:5])
    for k, (grid, image) in enumerate(zip(result["codes"], result["images"], strict=True)):
        assert tuple(grid.shape) == result["shapes"][k] and int(grid.max()) < 256 and int(grid.min()) >= 0
        torch.testing.assert_close(image, tok.decode(grid[None])[0])

    layout = example.shape_layout(tok.config, result["shapes"])
    grids = [torch.randint(0, 256, s) for s in [(8, 12), (8, 8)]]
    tokens, labels = example.to_sequences(grids, result["shapes"], layout)
    assert tokens.shape == (2, 1 + 1 + 96 + 1)
    assert tokens[1, 1].item() == layout.condition_offset + 0 and tokens[0, 1].item() == layout.condition_offset + 1
    assert torch.equal(tokens[0, 2:98], grids[0].flatten()) and (labels[1, 67:] == -100).all()


def test_eval_on_mixed_shapes_scores_every_image(capsys, tmp_path, mixed_dir, tiny_tokenizer_dir, tok):
    report = tmp_path / "r.json"
    code, err = run_cli(capsys, "eval", "--data", mixed_dir, "--model", tiny_tokenizer_dir, "--resize", "native",
                        "--json", report, "--batch-size", "2", *FAST)
    assert code == 0, err
    metrics = json.loads(report.read_text())
    assert metrics["images"] == 5  # the strip over the budget is skipped
    from vit_vq.metrics import psnr

    files = [p for k, p in by_name(mixed_dir).items() if k != OVER_BUDGET]
    values = []
    for f in files:
        x = tok.preprocess(load_image(f), resize="native")
        values.append(float(psnr(tok.decode(tok.encode(x)), x)))
    assert metrics["psnr"] == pytest.approx(np.mean(values), abs=1e-3)
