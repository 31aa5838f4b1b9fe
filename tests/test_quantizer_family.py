"""FSQ and LFQ beside VQ: float64 references, straight-through gradients, low precision, the config field, hashes."""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from vit_vq import FiniteScalarQuantizer, LookupFreeQuantizer, ViTVQConfig, ViTVQTokenizer
from vit_vq.fingerprint import decoder_hash
from vit_vq.fsq import BOUND_EPS
from vit_vq.lfq import EXACT_ENTROPY_BITS, bit_groups, entropy_terms

LEVELS = [8, 6, 5]  # even and odd levels: 240 codes


# -- FSQ -------------------------------------------------------------------------------
def fsq_reference(z: np.ndarray, levels: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """The paper's FSQ in float64: `(code values [N, D], mixed-radix indices [N], first channel least significant)`."""
    L = np.array(levels, dtype=np.float64)
    half = (L - 1) * (1 + BOUND_EPS) / 2
    offset = np.where(np.array(levels) % 2 == 0, 0.5, 0.0)
    bounded = np.tanh(z + np.arctanh(offset / half)) * half - offset
    rounded = np.round(bounded)
    width = np.array(levels) // 2
    digits = (rounded + width).astype(np.int64)
    basis = np.cumprod([1] + levels[:-1])
    return rounded / width, (digits * basis).sum(-1)


def test_fsq_every_code_round_trips_value_and_index():
    q = FiniteScalarQuantizer(levels=LEVELS)
    indices = torch.arange(math.prod(LEVELS))
    values = q.embed_codes(indices).double()  # (240, 3)
    assert len({tuple(v) for v in values.tolist()}) == 240 and values.abs().max() <= 1
    # a latent inside each code's cell: invert the bound at the code's centre, in float64
    L = torch.tensor(LEVELS, dtype=torch.float64)
    half, offset = (L - 1) * (1 + BOUND_EPS) / 2, (L % 2 == 0).double() * 0.5
    centre = values * (L // 2)  # the rounded bounded values
    z = torch.atanh((centre + offset) / half) - torch.atanh(offset / half)
    assert torch.equal(q.lookup(z.float()), indices)
    ref_values, ref_indices = fsq_reference(z.numpy(), LEVELS)
    np.testing.assert_array_equal(ref_indices, indices.numpy())
    np.testing.assert_allclose(ref_values, values.numpy(), rtol=0, atol=1e-7)  # float32 code values
    # mixed radix, the first channel least significant: digits (1, 2, 3) -> 1 + 8 * 2 + 48 * 3
    assert torch.equal(q.indices_to_digits(torch.tensor([1 + 8 * 2 + 48 * 3])), torch.tensor([[1, 2, 3]]))


def test_fsq_forward_matches_float64_reference_and_is_straight_through():
    q = FiniteScalarQuantizer(levels=LEVELS)
    z = (torch.randn(500, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2).float().requires_grad_()
    out = q(z)
    ref_values, ref_indices = fsq_reference(z.detach().double().numpy(), LEVELS)
    np.testing.assert_array_equal(out.indices.numpy(), ref_indices)
    np.testing.assert_allclose(out.quantized.detach().double().numpy(), ref_values, atol=1e-6)
    assert torch.equal(out.quantized.detach(), q.embed_codes(out.indices))  # forward values: exactly the codes
    assert (
        float(out.codebook_loss.detach()) == 0 and float(out.commit_loss.detach()) == 0 and float(out.metrics["dead_codes"]) == 0
    )
    out.quantized.sum().backward()
    L = torch.tensor(LEVELS, dtype=torch.float64)
    half, offset = (L - 1) * (1 + BOUND_EPS) / 2, (L % 2 == 0).double() * 0.5
    expected = (1 - torch.tanh(z.detach().double() + torch.atanh(offset / half)) ** 2) * half / (L // 2)
    torch.testing.assert_close(z.grad.double(), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fsq_low_precision_indices_in_range_and_equal_away_from_boundaries(dtype):
    q = FiniteScalarQuantizer(levels=LEVELS)
    z = torch.randn(4000, 3, generator=torch.Generator().manual_seed(1)) * 3
    extreme = torch.tensor([[1e4, -1e4, 0.0], [-6e4, 6e4, 1e-8], [float("inf"), -float("inf"), 5.0]])
    low = torch.cat([z, extreme]).to(dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(low)
    assert out.indices.dtype == torch.int64 and 0 <= int(out.indices.min()) and int(out.indices.max()) < 240
    assert torch.equal(out.indices, q.lookup(low))
    # away from a rounding edge (by more than the input's rounding moves the bounded value), the same codes as fp32
    bounded = q.bound(z)
    err = (low[: len(z)].float() - z).abs() * (q._half + 0.01)  # |d bound / dz| <= half
    safe = ((bounded - bounded.floor() - 0.5).abs() > err + 1e-5).all(1)
    assert 2000 < int(safe.sum()) < len(z)  # the comparison covers most latents, and some were excluded
    assert torch.equal(out.indices[: len(z)][safe], q.lookup(z)[safe])


def test_fsq_large_implicit_codebook_builds_no_table():
    q = FiniteScalarQuantizer(levels=[16] * 5 + [4])  # 4M codes: a table would be 4M x 6 floats
    assert all(b.numel() <= 6 for b in q.buffers())
    indices = torch.tensor([0, 1, 12345, 2**22 - 1])
    assert torch.equal(q.lookup(_fsq_latent(q, q.embed_codes(indices))), indices)


def _fsq_latent(q: FiniteScalarQuantizer, values: torch.Tensor) -> torch.Tensor:
    centre = values.double() * q.half_width.double()
    return (torch.atanh((centre + q._offset.double()) / q._half.double()) - q._shift.double()).float()


# -- LFQ -------------------------------------------------------------------------------
def lfq_brute_force(z: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`(H_sample, H_batch)` in float64 from all 2^d codes: softmax(-|z - c|^2 / temperature)."""
    d = z.shape[1]
    codes = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=d)), dtype=torch.float64)  # (2^d, d)
    logits = -(torch.cdist(z.double(), codes) ** 2) / temperature  # (N, 2^d)
    p = logits.softmax(1)
    sample = -(p * p.clamp(min=1e-300).log()).sum(1).mean()
    mean = p.mean(0)
    return sample, -(mean * mean.clamp(min=1e-300).log()).sum()


@pytest.mark.parametrize("temperature", [1.0, 0.1])
def test_lfq_entropy_terms_equal_brute_force_at_8_bits_values_and_gradients(temperature):
    z = torch.randn(64, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 0.5
    z32 = z.float().requires_grad_()
    z64 = z.clone().requires_grad_()
    sample, batch = entropy_terms(z32, temperature)
    ref_sample, ref_batch = lfq_brute_force(z64, temperature)
    assert float(ref_batch.detach()) > 1.0 and float(ref_sample.detach()) > 0.1  # non-trivial distributions
    torch.testing.assert_close(sample.double(), ref_sample, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(batch.double(), ref_batch, rtol=1e-5, atol=1e-6)
    (sample - 0.7 * batch).backward()
    (ref_sample - 0.7 * ref_batch).backward()
    torch.testing.assert_close(z32.grad.double(), z64.grad, rtol=1e-4, atol=1e-6)


def test_lfq_batch_entropy_above_the_exact_bound_is_the_sum_of_exact_group_entropies():
    bits = EXACT_ENTROPY_BITS + 1
    assert bit_groups(bits) == [(0, 8), (8, 17)]
    z = torch.randn(32, bits, generator=torch.Generator().manual_seed(3)) * 0.3
    _, batch = entropy_terms(z, 1.0)
    parts = [lfq_brute_force(z[:, a:b], 1.0)[1] for a, b in bit_groups(bits)]
    torch.testing.assert_close(batch.double(), sum(parts), rtol=1e-5, atol=1e-5)
    _, exact = lfq_brute_force(z, 1.0)  # 2^17 codes in float64: the bound holds
    assert float(batch) >= float(exact) - 1e-4


def test_lfq_forward_codes_losses_and_straight_through():
    q = LookupFreeQuantizer(bits=6, commitment_beta=0.5, entropy_weight=0.0)
    z = torch.randn(10, 7, 6, generator=torch.Generator().manual_seed(4)).requires_grad_()
    out = q(z)
    signs = torch.where(z.detach() > 0, 1.0, -1.0)
    assert torch.equal(out.quantized.detach(), signs) and torch.equal(q.embed_codes(out.indices), signs)
    expected = ((z.detach() > 0).long() * 2 ** torch.arange(6)).sum(-1)  # the first channel least significant
    assert torch.equal(out.indices, expected) and torch.equal(q.lookup(z), expected)
    torch.testing.assert_close(out.commit_loss, 0.5 * ((z.detach() - signs) ** 2).mean())
    (grad,) = torch.autograd.grad(out.quantized.sum(), z)
    assert torch.equal(grad, torch.ones_like(grad))  # straight through
    assert torch.equal(q.embed_codes(torch.arange(64)), q.embed_codes(q.lookup(q.embed_codes(torch.arange(64))))[:64])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lfq_low_precision_is_finite_and_in_range(dtype):
    q = LookupFreeQuantizer(bits=12).train()
    z = torch.cat([torch.randn(300, 12), torch.full((2, 12), 6e4), torch.full((2, 12), -6e4)]).to(dtype).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(z)
    assert 0 <= int(out.indices.min()) and int(out.indices.max()) < 4096
    assert torch.equal(out.indices, q.lookup(z.float()))  # signs survive any rounding
    assert torch.isfinite(out.codebook_loss) and torch.isfinite(out.commit_loss)
    (out.codebook_loss + out.commit_loss).backward()
    assert torch.isfinite(z.grad).all()


# -- the config field, the tokenizer, hashes --------------------------------------------
def test_config_field_derivation_errors_and_hashes():
    fsq = ViTVQConfig.from_preset("tiny", quantizer="fsq", fsq_levels=[8, 6, 5])
    assert (fsq.codebook_size, fsq.codebook_dim) == (240, 3)
    lfq = ViTVQConfig.from_preset("tiny", quantizer="lfq", codebook_size=4096)
    assert (lfq.codebook_size, lfq.codebook_dim) == (4096, 12)
    assert ViTVQConfig.from_preset("small", quantizer="lfq").codebook_dim == 13
    # every existing config keeps its hash: the new fields at their defaults are left out
    assert ViTVQConfig().config_hash() == "fb5fffd6938db672"
    assert ViTVQConfig.from_preset("tiny").config_hash() == "cf6d8e1603914702"
    hashes = {c.config_hash() for c in (ViTVQConfig.from_preset("tiny"), fsq, lfq)}
    assert len(hashes) == 3
    assert ViTVQConfig.from_preset("tiny", quantizer="fsq", fsq_levels=[5, 6, 8]).config_hash() != fsq.config_hash()
    # the entropy weights are training only
    assert ViTVQConfig.from_preset("tiny", quantizer="lfq", codebook_size=4096, lfq_entropy_weight=0.5,
                                   lfq_temperature=1.0).config_hash() == lfq.config_hash()  # fmt: skip
    for config in (fsq, lfq):
        assert ViTVQConfig.from_dict(config.to_dict()) == config
    errors = [
        (dict(quantizer="fsq", fsq_levels=[8, 5, 5, 5]), "codebook_size = prod(fsq_levels) = 1000"),
        (dict(quantizer="fsq", fsq_levels=[8, 1], codebook_size=8, codebook_dim=2), "ints >= 2"),
        (dict(quantizer="fsq"), "needs fsq_levels"),
        (dict(fsq_levels=[8, 8]), "fsq_levels is for quantizer 'fsq'"),
        (dict(quantizer="lfq", codebook_size=200, codebook_dim=8), "codebook_size must be 2 ** codebook_dim"),
        (dict(quantizer="lfq", codebook_size=256, codebook_dim=9), "codebook_size must be 2 ** codebook_dim"),
        (dict(quantizer="rvq"), "quantizer must be one of"),
        (dict(quantizer="lfq", codebook_size=256, codebook_dim=8, lfq_temperature=0.0), "lfq_temperature must be in"),
    ]
    for kwargs, message in errors:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("*", r"\*")):
            ViTVQConfig(**kwargs)


@pytest.mark.parametrize("overrides", [dict(quantizer="fsq", fsq_levels=[8, 6, 5]), dict(quantizer="lfq", codebook_size=256)])
def test_tokenizer_save_load_and_decoder_hash(tmp_path, overrides):
    torch.manual_seed(0)
    tok = ViTVQTokenizer(ViTVQConfig.from_preset("tiny", **overrides)).eval()
    assert list(tok.quantizer.state_dict()) == []  # nothing stored: the codebook is implicit
    x = torch.rand(3, 3, 32, 32)
    codes = tok.encode(x)
    assert codes.dtype == torch.int64 and codes.shape == (3, 8, 8) and int(codes.max()) < tok.config.codebook_size
    tok.save_pretrained(tmp_path / "m")
    loaded = ViTVQTokenizer.from_pretrained(tmp_path / "m")
    assert loaded.config == tok.config and type(loaded.quantizer) is type(tok.quantizer)
    assert torch.equal(loaded.encode(x), codes) and torch.equal(loaded.decode(codes), tok.decode(codes))
    assert decoder_hash(loaded) == decoder_hash(tok)
    if overrides["quantizer"] == "fsq":  # the same decoder weights under other levels decode codes differently
        other = ViTVQTokenizer(ViTVQConfig.from_preset("tiny", quantizer="fsq", fsq_levels=[5, 6, 8]))
        other.decoder.load_state_dict(tok.decoder.state_dict())
        assert decoder_hash(other) != decoder_hash(tok)
    out = tok.train()(x)  # training forward: a loss with a gradient to the encoder
    out.loss.backward()
    assert tok.encoder.to_code.weight.grad.abs().sum() > 0


# -- distributed: LFQ's batch entropy over the global batch -----------------------------
WORKER = textwrap.dedent(
    """
    import sys, datetime
    import torch, torch.distributed as dist
    from safetensors.torch import save_file
    from torch.nn.parallel import DistributedDataParallel as DDP
    from vit_vq import FiniteScalarQuantizer, LookupFreeQuantizer

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
    x = torch.load(sys.argv[2])  # the global batch; this rank takes its half
    out = {}
    for name, quantizer in (("lfq", LookupFreeQuantizer(bits=8, entropy_weight=1.0, temperature=1.0)),
                            ("fsq", FiniteScalarQuantizer(levels=[8, 6, 5, 5, 5, 5, 5, 5]))):
        torch.manual_seed(0)
        model = DDP(torch.nn.Linear(16, 8))
        q = quantizer.train()
        res = q(model(x.chunk(2)[rank]))
        (res.codebook_loss + res.commit_loss + res.quantized.square().mean()).backward()
        out[f"{name}_codebook_loss"] = res.codebook_loss.detach()
        out[f"{name}_grad"] = model.module.weight.grad
    if rank == 0:  # eval mode runs no collectives: rank 0 alone, then both meet at a barrier
        LookupFreeQuantizer(bits=8).eval()(torch.randn(5, 8))
    dist.barrier()
    save_file(out, f"{sys.argv[1]}/rank{rank}.safetensors")
    dist.destroy_process_group()
    """
)


def test_lfq_batch_entropy_over_two_gloo_ranks_equals_one_process_on_the_concatenated_batch(tmp_path):
    from safetensors.torch import load_file

    x = torch.randn(2 * 48, 16, generator=torch.Generator().manual_seed(5))
    torch.save(x, tmp_path / "x.pt")
    (tmp_path / "worker.py").write_text(WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(tmp_path / "worker.py"), str(tmp_path), str(tmp_path / "x.pt")]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1)]
    for name, quantizer in (("lfq", LookupFreeQuantizer(bits=8, entropy_weight=1.0, temperature=1.0)),
                            ("fsq", FiniteScalarQuantizer(levels=[8, 6, 5, 5, 5, 5, 5, 5]))):  # fmt: skip
        torch.manual_seed(0)
        model = torch.nn.Linear(16, 8)
        res = quantizer.train()(model(x))
        (res.codebook_loss + res.commit_loss + res.quantized.square().mean()).backward()
        # DDP averaged the ranks' gradients; the per-latent entropy is each rank's mean, the batch entropy global
        torch.testing.assert_close(ranks[0][f"{name}_grad"], model.weight.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(ranks[1][f"{name}_grad"], model.weight.grad, rtol=1e-4, atol=1e-6)
        mean_loss = (ranks[0][f"{name}_codebook_loss"] + ranks[1][f"{name}_codebook_loss"]) / 2
        torch.testing.assert_close(mean_loss, res.codebook_loss.detach(), rtol=1e-5, atol=1e-6)
    # the local batch entropy differs from the global one, so the test could tell them apart
    torch.manual_seed(0)
    z = torch.nn.Linear(16, 8)(x).detach()
    _, local = entropy_terms(z[:48], 1.0)
    _, whole = entropy_terms(z, 1.0)
    assert abs(float(local) - float(whole)) > 1e-3
