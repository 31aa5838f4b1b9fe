"""`vit_vq.tokens`: code grids <-> flat token ids, checked against a layout built by hand."""

from __future__ import annotations

import pytest
import torch

from vit_vq import ViTVQConfig
from vit_vq.tokens import TokenLayout, codes_to_tokens, tokens_to_codes


def by_hand(codes: torch.Tensor, K: int, bos: bool, eos: bool, offset: int) -> list[list[int]]:
    """The expected sequences, built element by element."""
    rows = []
    for grid in codes.tolist():
        seq = [offset + K] if bos else []
        seq += [offset + c for row in grid for c in row]
        if eos:
            seq.append(offset + K + int(bos))
        rows.append(seq)
    return rows


@pytest.mark.parametrize("bos", [False, True])
@pytest.mark.parametrize("eos", [False, True])
@pytest.mark.parametrize("offset", [0, 7])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8])
def test_round_trip_matches_hand_layout(bos, eos, offset, dtype):
    K, g = 200, 4
    codes = torch.randint(0, K, (3, g, g), generator=torch.Generator().manual_seed(1)).to(dtype)
    layout = TokenLayout(K, g, bos=bos, eos=eos, offset=offset)
    tokens = layout.to_tokens(codes)
    assert tokens.dtype == torch.int64 and tokens.shape == (3, layout.seq_len)
    assert tokens.tolist() == by_hand(codes, K, bos, eos, offset)
    assert torch.equal(layout.to_codes(tokens), codes.long())
    assert int(tokens.max()) < layout.vocab_size
    # flat grids and functional forms agree
    assert torch.equal(layout.to_tokens(codes.reshape(3, -1)), tokens)
    assert torch.equal(codes_to_tokens(codes, K, bos=bos, eos=eos, offset=offset), tokens)
    assert torch.equal(tokens_to_codes(tokens, K, g, bos=bos, eos=eos, offset=offset), codes.long())


def test_ids_and_vocab():
    layout = TokenLayout(256, 8, bos=True, eos=True, offset=10)
    assert (layout.bos_id, layout.eos_id, layout.vocab_size, layout.seq_len) == (266, 267, 268, 66)
    assert layout.special_ids == [266, 267]
    assert TokenLayout(256, 8, eos=True).eos_id == 256
    assert TokenLayout(256, 8).special_ids == []
    cfg = ViTVQConfig.from_preset("tiny")
    assert TokenLayout.for_config(cfg, bos=True).vocab_size == cfg.codebook_size + 1


def test_bare_code_tokens_are_accepted():
    layout = TokenLayout(16, 2, bos=True, eos=True, offset=3)
    tokens = torch.tensor([[3, 4, 5, 18]])  # codes only, as a sampler's new tokens
    assert layout.to_codes(tokens).tolist() == [[[0, 1], [2, 15]]]


def test_sampled_special_in_code_position_is_named():
    layout = TokenLayout(16, 2, bos=True, eos=True)
    tokens = torch.tensor([[16, 1, 17, 2, 3, 17]])  # EOS sampled at code position 1
    with pytest.raises(ValueError, match=r"token id 17 at sequence 0, code position 1 .*suppress ids \[16, 17\]"):
        layout.to_codes(tokens)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda L: L.to_tokens(torch.tensor([[[0, 1], [2, 16]]])), ValueError, r"codes must be in \[0, 16\)"),
        (lambda L: L.to_tokens(torch.zeros(1, 3, 3, dtype=torch.long)), ValueError, r"\[B, 2, 2\] or \[B, 4\]"),
        (lambda L: L.to_tokens(torch.zeros(1, 2, 2)), TypeError, "integer codes"),
        (lambda L: L.to_codes(torch.zeros(1, 5, dtype=torch.long)), ValueError, r"\[B, 6\] \(with BOS/EOS\) or \[B, 4\]"),
        (lambda L: L.to_codes(torch.tensor([[0, 1, 2, 3, 4, 17]])), ValueError, "expected BOS id 16"),
        (lambda L: L.to_codes(torch.tensor([[16, 1, 2, 3, 4, 16]])), ValueError, "expected EOS id 17"),
        (lambda L: L.to_codes([[16, 0, 0, 0, 0, 17]]), TypeError, "torch.Tensor"),
    ],
)
def test_errors_teach(call, error, match):
    with pytest.raises(error, match=match):
        call(TokenLayout(16, 2, bos=True, eos=True))


@pytest.mark.parametrize("kwargs", [dict(codebook_size=0, grid_size=2), dict(codebook_size=4, grid_size=2, offset=-1)])
def test_invalid_layout(kwargs):
    with pytest.raises(ValueError):
        TokenLayout(**kwargs)
