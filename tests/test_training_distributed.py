"""Two processes (gloo, CPU) launched by `accelerate launch` keep identical codebooks and weights.

The ranks see different images (the loader shards the data), so identical codebooks come from the
all-reduced EMA statistics and broadcast restarts, not from identical inputs. The run includes the
discriminator (with its adaptive weight) and gradient accumulation, the parts most likely to desync.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

WORKER = textwrap.dedent(
    """
    import sys
    import torch
    from safetensors.torch import save_file
    from vit_vq.training import TrainConfig, Trainer

    data, out = sys.argv[1], sys.argv[2]
    cfg = TrainConfig(
        preset="tiny", data=data, output=out, batch_size=2, grad_accum_steps=2, num_workers=0, max_steps=3,
        warmup_steps=1, lr=1e-3, log_every=1, image_every=3, save_every=2, trackers="none", progress=False,
        mixed_precision="no", adversarial_weight=0.1, disc_start_step=1, disc_channels=8,
        model_overrides={"dead_code_threshold": 0.5},
    )
    trainer = Trainer(cfg)
    rank = trainer.accelerator.process_index
    result = trainer.train()
    model = trainer.unwrapped
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    disc = trainer.accelerator.unwrap_model(trainer.discriminator)
    state.update({f"disc.{k}": v.detach().contiguous() for k, v in disc.state_dict().items()})
    state["recent"] = model.quantizer.restart_pool.contiguous()  # this rank's own encoder outputs
    state["world"] = torch.tensor(trainer.accelerator.num_processes)
    state["step"] = torch.tensor(result.step)
    save_file(state, f"{out}/rank{rank}.safetensors")
    """
)


@pytest.mark.slow
def test_two_processes_keep_identical_codebooks_and_weights(tmp_path, train_photo_dir):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
        str(script), str(train_photo_dir), str(out),
    ]
    # without GPUs, accelerate needs ACCELERATE_USE_CPU to set up gloo (its --cpu flag would start mpirun)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true", "ACCELERATE_LOG_LEVEL": "warning"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "broadcast_buffers" not in proc.stderr  # torch >= 2.13 deprecates it; the Trainer passes forward_sync_buffers
    r0, r1 = load_file(out / "rank0.safetensors"), load_file(out / "rank1.safetensors")
    assert int(r0["world"]) == 2 and int(r0["step"]) == 3
    assert not torch.equal(r0["recent"], r1["recent"])  # the ranks saw different images
    for key in r0:
        if key != "recent":
            assert torch.equal(r0[key], r1[key]), key
    from vit_vq import ViTVQConfig, ViTVQTokenizer

    torch.manual_seed(0)
    init = ViTVQTokenizer(ViTVQConfig.from_preset("tiny")).state_dict()
    assert not torch.equal(init["quantizer.embed"], r0["quantizer.embed"])  # the codebook did move
    exported = load_file(out / "final" / "model.safetensors")
    assert torch.equal(exported["quantizer.embed"], r0["quantizer.embed"])
    assert (out / "samples" / "step-0000003.png").is_file()  # the eval-mode grid ran on rank 0 only, no hang
