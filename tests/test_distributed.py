"""Two gloo processes training on different data keep bitwise-identical codebooks."""

import os
import subprocess
import sys
import textwrap

import torch
from safetensors.torch import load_file

WORKER = textwrap.dedent(
    """
    import sys, datetime
    import torch, torch.distributed as dist
    from safetensors.torch import save_file
    from torch.nn.parallel import DistributedDataParallel as DDP
    from vit_vq import ViTVQConfig, ViTVQTokenizer

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
    torch.manual_seed(0)
    tok = ViTVQTokenizer(ViTVQConfig.from_preset("tiny", dead_code_threshold=0.5, ema_decay=0.9))
    q = tok.quantizer
    q.auto_update = False
    restarted = []
    original = q._restart_dead_codes
    def counting():
        restarted.append(int(q.dead_mask().sum()))
        original()
    q._restart_dead_codes = counting
    model = DDP(tok, broadcast_buffers=False)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(100 + rank)  # different data on every rank
    for step in range(5):
        x = torch.rand(4, 3, 32, 32, generator=gen) ** (1 + rank)
        out = model(x)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        q.update_codebook()
    # eval runs no collectives: only rank 0 encodes, then both meet at a barrier
    tok.eval()
    if rank == 0:
        tok.encode(torch.rand(2, 3, 32, 32))
        tok(torch.rand(2, 3, 32, 32))
    dist.barrier()
    state = {k: v.contiguous() for k, v in tok.state_dict().items()}
    state["restarted"] = torch.tensor(sum(restarted))
    save_file(state, f"{sys.argv[1]}/rank{rank}.safetensors")
    dist.destroy_process_group()
    """
)


def test_two_gloo_processes_keep_bitwise_identical_codebooks(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1))
    assert int(r0["restarted"]) > 0  # restarts happened, so their broadcast was exercised
    for key in ("quantizer.embed", "quantizer.ema_count", "quantizer.ema_sum"):
        assert torch.equal(r0[key], r1[key]), key
    for key in r0:
        assert torch.equal(r0[key], r1[key]), key  # DDP keeps the weights identical too
