"""FSQ and LFQ tokenizers through every path: save, load, `vit-vq encode`/`decode`/`tokenize`, and over-fitting real photos."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import photo_crops
from PIL import Image

from vit_vq import ViTVQConfig, ViTVQTokenizer
from vit_vq.cli.main import main
from vit_vq.data import list_images, load_image
from vit_vq.pipeline.codes import load_codes
from vit_vq.pipeline.manifest import iter_shards, load_manifest
from vit_vq.tokens import codes_to_tokens, tokens_to_codes

FAST = ["--num-workers", "0", "--device", "cpu"]
FAMILY = {
    "fsq": dict(quantizer="fsq", fsq_levels=[8, 6, 5]),  # 240 codes of dimension 3
    "lfq": dict(quantizer="lfq", codebook_size=4096),  # 12 bits: codes files need uint16
}


def cli(*argv) -> int:
    return main([*map(str, argv)])


@pytest.mark.parametrize("kind", sorted(FAMILY))
def test_cli_encode_decode_tokenize_round_trip(tmp_path, photo_dir, kind):
    torch.manual_seed(0)
    model = tmp_path / "model"
    ViTVQTokenizer(ViTVQConfig.from_preset("tiny", **FAMILY[kind])).save_pretrained(model)
    tok = ViTVQTokenizer.from_pretrained(model)
    files = list_images(photo_dir)
    expected = tok.encode(tok.preprocess([load_image(f) for f in files]))
    assert int(expected.max()) < tok.config.codebook_size and len(expected.unique()) > 1

    assert cli("encode", photo_dir, "-o", tmp_path / "codes.safetensors", "--model", model, *FAST) == 0
    loaded = load_codes(tmp_path / "codes.safetensors")
    assert torch.equal(loaded.codes, expected) and loaded.codebook_size == tok.config.codebook_size
    assert loaded.model.config_hash == tok.config.config_hash()

    assert cli("decode", tmp_path / "codes.safetensors", "-o", tmp_path / "decoded", "--model", model, *FAST) == 0
    decoded = (tok.decode(expected) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for name, image in zip(loaded.names, decoded, strict=True):
        png = np.asarray(Image.open((tmp_path / "decoded" / name).with_suffix(".png")).convert("RGB"))
        np.testing.assert_array_equal(png, image)

    out = tmp_path / "tokens"
    assert cli("tokenize", "--data", photo_dir, "--out", out, "--model", model, "--num-workers", "0") == 0
    manifest = load_manifest(out)
    by_key = {
        key: codes for shard in iter_shards(out, manifest) for key, codes in zip(shard["keys"], shard["codes"], strict=True)
    }
    assert len(by_key) == len(files)
    for name, codes in zip(loaded.names, expected, strict=True):
        assert torch.equal(torch.as_tensor(by_key[name]).long(), codes)
    # the AR layout reads them like any other codes
    tokens = codes_to_tokens(expected, tok.config.codebook_size, bos=True)
    assert torch.equal(tokens_to_codes(tokens, tok.config.codebook_size, 8, bos=True), expected)


@pytest.mark.parametrize("kind", sorted(FAMILY))
def test_trainer_checkpoints_resumes_and_exports(tmp_path, train_photo_dir, kind):
    from accelerate.state import AcceleratorState, GradientState

    from vit_vq.training import TrainConfig, Trainer

    def run(steps: int, **kw) -> Trainer:
        config = TrainConfig(
            preset="tiny", model_overrides=FAMILY[kind], data=str(train_photo_dir), output=str(tmp_path / "run"),
            batch_size=4, num_workers=0, max_steps=steps, warmup_steps=1, save_every=2, log_every=1, image_every=0,
            trackers="none", progress=False, mixed_precision="no", **kw,
        )  # fmt: skip
        try:
            return Trainer(config).train()
        finally:  # accelerate keeps process-wide singletons
            AcceleratorState._reset_state(reset_partial_state=True)
            GradientState._reset_state()

    first = run(3)
    assert {"codebook", "commit", "perplexity", "usage"} <= set(first.history[-1])
    run(4, resume="latest")
    tok = ViTVQTokenizer.from_pretrained(tmp_path / "run" / "final")
    assert type(tok.quantizer).__name__ == {"fsq": "FiniteScalarQuantizer", "lfq": "LookupFreeQuantizer"}[kind]
    codes = tok.encode(photo_crops(32, 2))
    assert codes.shape == (2, 8, 8) and int(codes.max()) < tok.config.codebook_size


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(FAMILY))
def test_tiny_preset_with_fsq_or_lfq_overfits_eight_real_photos(kind):
    torch.manual_seed(0)
    x = photo_crops(32, 8)
    overrides = {"fsq": FAMILY["fsq"], "lfq": dict(quantizer="lfq", codebook_size=256)}[kind]
    tok = ViTVQTokenizer(ViTVQConfig.from_preset("tiny", **overrides))
    opt = torch.optim.Adam(tok.parameters(), lr=1e-3)
    tok.train()
    for _ in range(400):
        out = tok(x)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    tok.eval()
    rec = tok.decode(tok.encode(x))
    mse = ((rec.double() - x.double()) ** 2).flatten(1).mean(1)
    final = float((10 * torch.log10(1 / mse)).mean())
    assert final >= 24.0, f"{kind}: PSNR {final:.2f} dB after 400 steps"
    assert float(tok(x).metrics["usage"]) > 0.3
