"""`--resume latest` skips a checkpoint folder without its weights and resumes from the one before (issue 19, 11)."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import load_file
from test_training_trainer import fresh_accelerate_state, make_config  # noqa: F401  (fixture and helper)

from vit_vq.training import Trainer
from vit_vq.training.checkpoint import list_checkpoints, resolve_resume


def test_resume_latest_falls_back_past_a_checkpoint_without_weights(tmp_path, train_photo_dir, caplog):
    first = Trainer(make_config(tmp_path, train_photo_dir, max_steps=4, save_every=2)).train()
    root = tmp_path / "run" / "checkpoints"
    assert [step for step, _ in list_checkpoints(tmp_path / "run")] == [2, 4] and first.step == 4
    (root / "checkpoint-4" / "model.safetensors").unlink()  # trainer_state.json is there, the weights are not
    caplog.set_level(logging.INFO, logger="vit_vq")
    assert resolve_resume(tmp_path / "run", "latest") == root / "checkpoint-2"
    assert any("skipping" in r.getMessage() and "model.safetensors" in r.getMessage() for r in caplog.records)
    with pytest.raises(FileNotFoundError, match=r"checkpoint-4' is not a complete checkpoint \(no model.safetensors\)"):
        resolve_resume(tmp_path / "run", str(root / "checkpoint-4"))
    caplog.clear()
    again = Trainer(make_config(tmp_path, train_photo_dir, max_steps=4, save_every=2, resume="latest")).train()
    assert "resumed from step 2" in [r.getMessage() for r in caplog.records if r.name.startswith("vit_vq")]
    assert again.step == 4
    restored = load_file(root / "checkpoint-4" / "model.safetensors")  # written again by the resumed run
    assert all(torch.isfinite(t).all() for t in restored.values() if t.is_floating_point())
