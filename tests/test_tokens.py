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
        (lambda L: L.to_codes(torch.zeros(1, 3, dtype=torch.long)), ValueError,
         r"L in \[4, 5, 6\] \(BOS \+ 4 codes \+ EOS, the same without EOS, or the codes alone\), got \(1, 3\)"),
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


@pytest.mark.parametrize("eos", [False, True])
@pytest.mark.parametrize("conditional", [False, True])
def test_bos_plus_codes_with_or_without_eos_and_conditions(eos, conditional):
    K, g, offset = 16, 2, 5
    kw = dict(num_conditions=10, condition_len=2) if conditional else {}
    layout = TokenLayout(K, g, bos=True, eos=eos, offset=offset, **kw)
    codes = torch.tensor([[[0, 1], [2, 15]], [[3, 3], [9, 4]]])
    conditions = torch.tensor([[1, 9], [0, 4]]) if conditional else None
    tokens = layout.to_tokens(codes, conditions)
    bos, first_cond = offset + K, offset + K + 1 + int(eos)  # ids counted by hand
    rows = conditions.tolist() if conditional else [[], []]
    expected_prefix = [[bos] + [first_cond + c for c in row] for row in rows]
    assert tokens[:, : layout.prefix_len].tolist() == expected_prefix
    assert tokens.shape[1] == 1 + (2 if conditional else 0) + 4 + int(eos) == layout.seq_len
    assert torch.equal(layout.to_codes(tokens), codes)
    assert torch.equal(layout.to_codes(torch.cat([layout.prompt(conditions, batch_size=2), codes.flatten(1) + offset], 1)), codes)
    if eos:
        assert torch.equal(layout.to_codes(tokens[:, :-1]), codes)  # BOS + codes, no EOS
    assert torch.equal(layout.to_codes(tokens[:, layout.prefix_len : layout.prefix_len + 4]), codes)  # bare codes
    assert layout.vocab_size == offset + K + 1 + int(eos) + (10 if conditional else 0)
    assert set(layout.non_code_ids) == set(range(layout.vocab_size)) - set(range(offset, offset + K))


def test_conditioning_errors_teach():
    layout = TokenLayout(16, 2, bos=True, eos=True, num_conditions=3, condition_len=1)
    codes = torch.zeros(2, 2, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="pass conditions"):
        layout.to_tokens(codes)
    with pytest.raises(ValueError, match=r"conditions must be in \[0, 3\), got values in \[0, 3\]"):
        layout.to_tokens(codes, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="expected conditions for each of the 2 code grids, got 1"):
        layout.to_tokens(codes, torch.tensor([1]))
    with pytest.raises(ValueError, match=r"expected conditioning ids in \[18, 21\) at positions 1..1"):
        layout.to_codes(torch.tensor([[16, 0, 1, 2, 3, 4, 17]]))
    with pytest.raises(ValueError, match="no conditioning tokens"):
        TokenLayout(16, 2).prompt([1])
    with pytest.raises(ValueError, match="condition_len=1 needs num_conditions >= 1"):
        TokenLayout(16, 2, condition_len=1)


@pytest.mark.parametrize("conditional", [False, True])
def test_a_bos_prefixed_generate_output_decodes_through_to_codes(tiny_tokenizer_dir, conditional, single_thread):
    """`generate` returns the prompt (BOS, conditions) followed by the new tokens; `to_codes` takes it whole."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from vit_vq import ViTVQTokenizer

    tok = ViTVQTokenizer.from_pretrained(tiny_tokenizer_dir).eval()
    kw = dict(num_conditions=4, condition_len=1) if conditional else {}
    layout = TokenLayout.for_config(tok.config, bos=True, eos=True, **kw)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(
        vocab_size=layout.vocab_size, n_positions=layout.seq_len, n_embd=32, n_layer=1, n_head=2,
        bos_token_id=layout.bos_id, eos_token_id=layout.eos_id, pad_token_id=layout.eos_id,
    )).eval()
    prompt = layout.prompt(torch.tensor([1, 3]) if conditional else None, batch_size=2)  # (2, prefix_len)
    out = model.generate(
        input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=True, max_new_tokens=layout.num_codes,
        min_new_tokens=layout.num_codes, suppress_tokens=layout.non_code_ids, pad_token_id=layout.eos_id,
    )
    assert out.shape == (2, layout.prefix_len + layout.num_codes) and (out[:, 0] == layout.bos_id).all()
    codes = layout.to_codes(out)  # (2, 8, 8)
    by_hand = out[:, layout.prefix_len :].reshape(2, 8, 8)  # offset 0: code ids are the codes
    assert torch.equal(codes, by_hand)
    with torch.no_grad():
        torch.testing.assert_close(tok.decode(codes), tok.decode(by_hand))
