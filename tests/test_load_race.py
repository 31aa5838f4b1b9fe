"""A load racing saves into the same folder sees one save: never one save's config with another's weights."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import torch

from vit_vq import ViTVQConfig, ViTVQTokenizer

# Two models of one architecture that differ in a config field (commitment_beta) and in their codebook.
SAVER = textwrap.dedent(
    """
    import sys, torch
    from pathlib import Path
    from vit_vq import ViTVQConfig, ViTVQTokenizer
    folder, stop = Path(sys.argv[1]), Path(sys.argv[2])
    models = []
    for beta, value in ((0.25, 1.0), (0.5, 2.0)):
        tok = ViTVQTokenizer(ViTVQConfig.from_preset("tiny", commitment_beta=beta))
        with torch.no_grad():
            tok.quantizer.embed.fill_(value)
        models.append(tok)
    models[0].save_pretrained(folder)
    print("READY", flush=True)
    i = 0
    while not stop.exists():
        i += 1
        models[i % 2].save_pretrained(folder)
    """
)
EXPECTED = {0.25: 1.0, 0.5: 2.0}  # commitment_beta -> the codebook value saved with it


def test_two_hundred_loads_during_saves_never_mix_two_saves(tmp_path):
    folder, stop = tmp_path / "model", tmp_path / "stop"
    saver = subprocess.Popen([sys.executable, "-c", SAVER, str(folder), str(stop)], stdout=subprocess.PIPE, text=True)
    seen: dict[float, int] = {}
    mixed = []
    try:
        assert saver.stdout.readline().strip() == "READY"
        for _ in range(200):
            tok = ViTVQTokenizer.from_pretrained(folder)
            beta, values = tok.config.commitment_beta, tok.quantizer.embed.unique().tolist()
            seen[beta] = seen.get(beta, 0) + 1
            if values != [EXPECTED[beta]]:
                mixed.append((beta, values))
    finally:
        stop.touch()
        saver.wait(timeout=120)
    assert saver.returncode == 0
    assert set(seen) == {0.25, 0.5}, seen  # both saves were loaded: the race happened
    assert mixed == [], f"{len(mixed)} of 200 loads mixed two saves: {mixed[:3]}"


def test_a_hub_style_snapshot_of_links_still_loads(tmp_path):
    """Files that are symlinks (the Hugging Face cache layout) are followed."""
    tok = ViTVQTokenizer(ViTVQConfig.from_preset("tiny"))
    tok.save_pretrained(tmp_path / "blobs_src")
    snap = tmp_path / "snap"
    snap.mkdir()
    for name in ("config.json", "model.safetensors"):
        (snap / name).symlink_to(tmp_path / "blobs_src" / name)
    loaded = ViTVQTokenizer.from_pretrained(snap)
    assert torch.equal(loaded.quantizer.embed, tok.quantizer.embed)
