"""codebook_statistics against a one-hot reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vit_vq.ops import codebook_statistics


def one_hot_reference(indices, vectors, k):
    onehot = F.one_hot(indices, k).double()  # (N, K): fine at test sizes
    return onehot.sum(0), onehot.T @ vectors.double()


@pytest.mark.parametrize(("n", "k", "d"), [(0, 5, 3), (1, 1, 1), (500, 37, 5), (2000, 8, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_one_hot(n, k, d, dtype):
    gen = torch.Generator().manual_seed(n + k)
    used = max(1, k // 2)
    indices = torch.randint(0, used, (n,), generator=gen)  # codes from `used` on never occur
    vectors = torch.randn(n, d, generator=gen).to(dtype)
    counts, sums = codebook_statistics(indices, vectors, k)
    ref_counts, ref_sums = one_hot_reference(indices, vectors, k)
    assert counts.dtype == sums.dtype == torch.float32
    assert counts.shape == (k,) and sums.shape == (k, d)
    assert torch.equal(counts.double(), ref_counts)
    torch.testing.assert_close(sums.double(), ref_sums, rtol=1e-5, atol=1e-4)
    assert (counts[used:] == 0).all() and (sums[used:] == 0).all()


def test_16bit_blocks_give_the_same_sums():
    gen = torch.Generator().manual_seed(0)
    indices = torch.randint(0, 10, (1000,), generator=gen)
    vectors = torch.randn(1000, 6, generator=gen).bfloat16()
    whole = codebook_statistics(indices, vectors, 10)
    blocked = codebook_statistics(indices, vectors, 10, max_temp_bytes=100)  # 4-row blocks
    torch.testing.assert_close(blocked, whole, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize(
    ("indices", "vectors", "k", "error"),
    [
        (torch.zeros(3, dtype=torch.int64), torch.zeros(4, 2), 5, ValueError),
        (torch.zeros(3, 1, dtype=torch.int64), torch.zeros(3, 2), 5, ValueError),
        (torch.zeros(3, dtype=torch.int32), torch.zeros(3, 2), 5, TypeError),
        (torch.zeros(3, dtype=torch.int64), torch.zeros(3, 2), 0, ValueError),
    ],
)
def test_bad_arguments_raise(indices, vectors, k, error):
    with pytest.raises(error):
        codebook_statistics(indices, vectors, k)
