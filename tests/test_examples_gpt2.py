"""`examples/generate_with_gpt2.py` end to end on CPU: tokenize, train a tiny GPT-2, sample, decode."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vit_vq import ViTVQTokenizer

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "generate_with_gpt2.py"


def load_example():
    spec = importlib.util.spec_from_file_location("generate_with_gpt2", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generate_with_gpt2(tmp_path, tiny_tokenizer_dir, capsys, single_thread):
    example = load_example()
    result = example.main([
        "--model", str(tiny_tokenizer_dir), "--out", str(tmp_path), "--images", "12", "--steps", "40",
        "--batch-size", "8", "--width", "64", "--layers", "2", "--heads", "2", "--samples", "3", "--device", "cpu",
    ])
    losses = result["losses"]
    assert len(losses) == 40
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5  # it learned something
    codes = result["codes"]
    assert codes.shape == (3, 8, 8) and codes.dtype == torch.int64
    assert int(codes.min()) >= 0 and int(codes.max()) < 256  # only code tokens were sampled
    tok = ViTVQTokenizer.from_pretrained(tiny_tokenizer_dir)
    torch.testing.assert_close(result["images"], tok.decode(codes))
    grid = np.asarray(Image.open(result["png"]))
    assert grid.shape == (2 + 2 * 34, 2 + 3 * 34, 3)
    assert "sequences of 66 tokens, vocabulary 258" in capsys.readouterr().out


def test_the_example_uses_only_public_api():
    import ast

    tree = ast.parse(EXAMPLE.read_text())
    modules = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    modules |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    ours = sorted(m for m in modules if m and m.startswith("vit_vq"))
    assert ours and not [m for m in ours if m.startswith("vit_vq.cli") or "._" in m or m.startswith("_")], ours
