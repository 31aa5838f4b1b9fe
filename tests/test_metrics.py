"""`vit_vq.metrics` against independent computations: numpy float64, scikit-image, scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import photo_crops

from vit_vq.metrics import (
    CodebookUsage,
    FeatureStatistics,
    InceptionFeatures,
    MeanAccumulator,
    MetricUnavailable,
    PublishedFID,
    frechet_distance,
    lpips_network,
    psnr,
    ssim,
)


def noisy_pair(size: int, count: int, noise: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    x = photo_crops(size, count, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    y = (x + noise * torch.randn(x.shape, generator=gen)).clamp(0, 1)
    return x, y


@pytest.mark.parametrize("noise", [0.01, 0.1, 0.3])
def test_psnr_matches_numpy_float64(noise):
    x, y = noisy_pair(32, 5, noise)
    xd, yd = x.double().numpy(), y.double().numpy()
    mse = ((xd - yd) ** 2).reshape(5, -1).mean(1)
    expected = 10 * np.log10(1.0 / mse)
    np.testing.assert_allclose(psnr(x, y).numpy(), expected, rtol=0, atol=1e-4)


def test_psnr_identical_images_are_capped():
    x = photo_crops(16, 2)
    assert psnr(x, x).tolist() == [100.0, 100.0]


@pytest.mark.parametrize("shape", [(32, 32), (45, 61)])
@pytest.mark.parametrize("noise", [0.02, 0.2])
def test_ssim_matches_skimage(shape, noise):
    from skimage.metrics import structural_similarity

    x = torch.nn.functional.interpolate(photo_crops(64, 3), size=shape, mode="bilinear", align_corners=False).clamp(0, 1)
    y = (x + noise * torch.randn(x.shape, generator=torch.Generator().manual_seed(3))).clamp(0, 1)
    ours = ssim(x, y)
    for i in range(3):
        ref = structural_similarity(
            x[i].double().permute(1, 2, 0).numpy(), y[i].double().permute(1, 2, 0).numpy(),
            data_range=1.0, channel_axis=-1, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
        )
        assert abs(float(ours[i]) - ref) < 1e-5, (i, float(ours[i]), ref)
    assert float(ours.min()) < 0.99  # the noise made a difference: the comparison is not trivial


def test_ssim_identical_and_errors():
    x = photo_crops(16, 2)
    torch.testing.assert_close(ssim(x, x), torch.ones(2))
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(x[..., :8, :8], x[..., :8, :8])
    with pytest.raises(ValueError, match="same shape"):
        psnr(x, x[:1])


def test_codebook_usage_matches_numpy():
    K = 50
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 20, (4, 3, 3), generator=gen) for _ in range(3)] + [torch.tensor([[[49]]])]
    acc = CodebookUsage(K)
    for b in batches:
        acc.update(b)
    flat = np.concatenate([b.numpy().ravel() for b in batches])
    counts = np.bincount(flat, minlength=K)
    p = counts[counts > 0] / counts.sum()
    assert acc.total == flat.size
    assert acc.usage == pytest.approx(np.count_nonzero(counts) / K)
    assert acc.perplexity == pytest.approx(float(np.exp(-(p * np.log(p)).sum())), rel=1e-12)
    assert 1 <= acc.perplexity <= np.count_nonzero(counts)
    with pytest.raises(ValueError, match=r"\[0, 50\)"):
        acc.update(torch.tensor([50]))


def test_empty_accumulators():
    assert CodebookUsage(4).usage == 0.0 and math.isnan(CodebookUsage(4).perplexity)
    assert math.isnan(MeanAccumulator().mean)


def test_frechet_distance_matches_scipy_sqrtm():
    from scipy.linalg import sqrtm

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(40, 6, generator=gen, dtype=torch.float64)
    b = torch.randn(30, 6, generator=gen, dtype=torch.float64) * 1.5 + 0.3
    stats = []
    for feats in (a, b):
        s = FeatureStatistics()
        s.update(feats[:17])
        s.update(feats[17:])
        mu, cov = s.mean_cov()
        np.testing.assert_allclose(cov.numpy(), np.cov(feats.numpy(), rowvar=False), atol=1e-12)
        stats.append((mu, cov))
    (m1, c1), (m2, c2) = stats
    covmean = sqrtm(c1.numpy() @ c2.numpy()).real
    expected = float(((m1 - m2) ** 2).sum()) + np.trace(c1.numpy() + c2.numpy() - 2 * covmean)
    assert frechet_distance(m1, c1, m2, c2) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(m1, c1, m1, c1) == pytest.approx(0.0, abs=1e-9)


def test_network_metrics_need_local_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(MetricUnavailable, match="no Inception-v3 weights at .*inception_v3_google"):
        InceptionFeatures()
    bad = tmp_path / "bad.pth"
    torch.save({"nothing": torch.zeros(1)}, bad)
    with pytest.raises(MetricUnavailable, match="does not hold torchvision Inception-v3 weights"):
        InceptionFeatures(bad)
    with pytest.raises(MetricUnavailable, match="(?i)lpips"):
        lpips_network("alex")


def test_inception_features_from_local_file(tmp_path, single_thread):
    from torchvision.models import inception_v3

    path = tmp_path / "inception.pth"
    torch.save(inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict(), path)
    feats = InceptionFeatures(path)(photo_crops(32, 2))
    assert feats.shape == (2, 2048) and torch.isfinite(feats).all()


def test_published_fid_matches_an_independent_frechet_distance_on_the_same_network(tf_inception_file, single_thread):
    """The 64-feature tap of the same network keeps the matrices small (the 2048-d default costs minutes of
    eigen-solving on a CPU); the code path is the same."""
    from scipy.linalg import sqrtm
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    real = photo_crops(32, 4, seed=0)  # few images: every one costs an Inception pass at 299 px
    fake = (real + 0.1 * torch.randn(real.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    fid = PublishedFID(tf_inception_file, features=64)
    fid.update(real, fake)
    assert fid.n == 4
    value = fid.compute()

    net = FeatureExtractorInceptionV3("inception-v3-compat", ["64"], feature_extractor_weights_path=str(tf_inception_file))
    with torch.no_grad():  # the network takes 8-bit images, rounded from [0, 1]
        a, b = (net((x * 255).round().to(torch.uint8))[0].double().numpy() for x in (real, fake))  # (4, 64)
    assert np.abs(a).mean() > 0.1  # features of a usable size, so the comparison means something
    # what was fed: each side's images, rounded to 8 bits (feature sums agree to float32 precision)
    np.testing.assert_allclose(fid.metric.real_features_sum.numpy(), a.sum(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fid.metric.fake_features_sum.numpy(), b.sum(0), rtol=1e-5, atol=1e-5)
    c1, c2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(c1 + c2 - 2 * sqrtm(c1 @ c2).real)
    # torchmetrics takes the square root through the eigenvalues of a rank-deficient product (4 images,
    # 64 features): a fraction of a percent from SciPy's sqrtm here
    assert value == pytest.approx(expected, rel=1e-2) and value > 0.1


def test_published_fid_needs_its_weights_and_refuses_pickled_objects(tmp_path, monkeypatch):
    import threading

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # an empty torch hub cache
    pytest.importorskip("torchmetrics")
    pytest.importorskip("torch_fidelity")
    with pytest.raises(MetricUnavailable, match=r"no TF-Inception FID weights at .*weights-inception-2015-12-05.*download https"):
        PublishedFID()
    evil = tmp_path / "evil.pth"
    torch.save({"x": torch.zeros(1), "lock": threading.Lock}, evil)
    with pytest.raises(MetricUnavailable, match=r"weights_only=True"):
        PublishedFID(evil)
