"""The library's main downstream use, chained the way a user chains it.

Encode real photos -> train a small autoregressive model on the codes (with backward) -> edit
codes in place (masking) -> decode -> use the decoded images as a loss target. Every hand-off
between steps is a place where the first release broke (inference tensors out of `encode`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vit_vq import ViTVQTokenizer


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_encode_train_ar_edit_decode_loss(photos, single_thread):
    tok = ViTVQTokenizer.default()
    before = _state(tok)
    images = tok.preprocess(photos[:4])  # (4, 3, S, S)
    codes = tok.encode(images)  # (4, h, w) int64
    K = tok.config.codebook_size
    assert not codes.is_inference() and not codes.requires_grad

    # A tiny autoregressive model: predict token t+1 from token t (embedding + linear).
    torch.manual_seed(0)
    embed, head = nn.Embedding(K + 1, 16), nn.Linear(16, K)  # K is the [MASK] id
    opt = torch.optim.SGD([*embed.parameters(), *head.parameters()], lr=0.5)
    flat = codes.flatten(1)  # (B, h*w)
    losses = []
    for _ in range(2):
        logits = head(embed(flat[:, :-1]))  # (B, T-1, K)
        loss = F.cross_entropy(logits.reshape(-1, K), flat[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        assert embed.weight.grad is not None and float(embed.weight.grad.abs().sum()) > 0
        opt.step()
        losses.append(loss.item())
    assert losses[1] < losses[0]

    # Edit codes in place, as masked-token training does, then decode.
    masked = codes.clone()
    masked[:, ::2] = K
    assert int((masked == K).sum()) == masked[:, ::2].numel()
    codes[0, 0, 0] = (codes[0, 0, 0] + 1) % K  # in-place edit of encode's own output

    decoded = tok.decode(codes)  # (4, 3, S, S) in [0, 1]
    assert not decoded.is_inference()
    # Decoded images as a loss target, and as a leaf that takes gradients.
    pred = torch.zeros_like(decoded, requires_grad=True)
    F.mse_loss(pred, decoded).backward()
    torch.testing.assert_close(pred.grad, -2 * decoded / decoded.numel())
    decoded.requires_grad_()
    (decoded * 2).sum().backward()
    assert torch.equal(decoded.grad, torch.full_like(decoded, 2.0))

    # Nothing in eval mode changed the model's state (codebook statistics included).
    after = _state(tok)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_decoded_images_round_trip_through_a_second_encode(photos, single_thread):
    """decode -> encode again: the decoded batch is an ordinary float tensor the tokenizer accepts."""
    tok = ViTVQTokenizer.default()
    codes = tok.encode(tok.preprocess(photos[:2]))
    again = tok.encode(tok.decode(codes))
    assert again.shape == codes.shape
    # A trained tokenizer maps its own reconstructions mostly back to the same codes.
    assert float((again == codes).float().mean()) > 0.5
