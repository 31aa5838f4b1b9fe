"""Perceptual loss, VGG16 weight loading, the missing-weights error, discriminator losses."""

from __future__ import annotations

import copy
import socket
import threading

import pytest
import torch
import torch.nn.functional as F

from vit_vq.training import losses as L
from vit_vq.training.discriminator import PatchDiscriminator, adaptive_weight, hinge_d_loss, hinge_g_loss


@pytest.fixture(scope="module")
def vgg_features():
    torch.manual_seed(0)
    return L.vgg16_features()


@pytest.fixture
def empty_torch_hub(tmp_path, monkeypatch):
    """An empty torch hub cache, so nothing pretrained can be found on disk."""
    import torch.hub

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_perceptual_loss_matches_an_independent_lpips_computation(vgg_features):
    loss_fn = L.PerceptualLoss(vgg_features)
    gen = torch.Generator().manual_seed(0)
    a, b = torch.rand(2, 3, 32, 32, generator=gen), torch.rand(2, 3, 32, 32, generator=gen)
    # reference: torchvision's own Sequential, fed ImageNet-normalised images, layers tapped by index
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    net = copy.deepcopy(vgg_features).double()

    def feats(x):
        out, h = [], (x.double() - mean.double()) / std.double()
        for i in range(30):
            h = F.relu(h) if isinstance(net[i], torch.nn.ReLU) else net[i](h)
            if i in (3, 8, 15, 22, 29):
                out.append(h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
        return out

    expected = sum(((fa - fb) ** 2).sum(1).mean() for fa, fb in zip(feats(a), feats(b), strict=True))
    assert torch.allclose(loss_fn(a, b).double(), expected, rtol=1e-4)
    assert loss_fn(a, a).item() == pytest.approx(0.0, abs=1e-6)


def test_perceptual_loss_feeds_vgg_the_imagenet_range_and_grads_reach_only_the_reconstruction(vgg_features):
    loss_fn = L.PerceptualLoss(vgg_features)
    seen = []
    handle = loss_fn.net.features[0].register_forward_hook(lambda m, inp, out: seen.append(inp[0].detach()))
    white = torch.ones(1, 3, 16, 16, requires_grad=True)
    target = torch.zeros(1, 3, 16, 16, requires_grad=True)
    loss_fn(white, target).backward()
    handle.remove()
    expected = (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(seen[-1][0, :, 0, 0], expected, atol=1e-6)  # not [0,1], not [-1,1]
    assert white.grad is not None and white.grad.abs().sum() > 0
    assert target.grad is None
    assert all(p.grad is None and not p.requires_grad for p in loss_fn.parameters())
    assert not loss_fn.train().training  # stays in eval mode


def test_perceptual_loss_is_finite_where_features_vanish():
    """ReLU features can be all zero at a position: the distance and its gradient must stay finite."""
    layers = [torch.nn.Conv2d(3, 3, 1) for _ in range(30)]
    for conv in layers:
        torch.nn.init.zeros_(conv.weight)
        torch.nn.init.zeros_(conv.bias)
    loss_fn = L.PerceptualLoss(torch.nn.Sequential(*layers))
    recon = torch.rand(2, 3, 8, 8, requires_grad=True)
    loss = loss_fn(recon, torch.rand(2, 3, 8, 8))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(recon.grad).all()


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_vgg_weights_load_from_a_local_file(vgg_features, tmp_path, suffix, empty_torch_hub):
    from safetensors.torch import save_file

    # torchvision's vgg16().state_dict() layout: features.* plus classifier.* (ignored)
    full = {f"features.{k}": v for k, v in L.vgg16_features().state_dict().items()}
    full["classifier.0.weight"] = torch.zeros(4, 4)
    path = tmp_path / f"vgg16{suffix}"
    save_file(full, path) if suffix == ".safetensors" else torch.save(full, path)
    loss_fn = L.build_perceptual_loss(path, download_timeout=0, kind="vgg")
    assert torch.equal(loss_fn.net.features[28].weight, full["features.28.weight"])
    assert torch.equal(loss_fn.net.features[0].bias, full["features.0.bias"])


def test_vgg_weights_file_that_is_not_vgg_is_named(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match="not a VGG16 state dict"):
        L.build_perceptual_loss(path)
    with pytest.raises(FileNotFoundError, match="no VGG16 weights file"):
        L.build_perceptual_loss(tmp_path / "missing.pth")


def test_pickled_objects_in_a_weights_file_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"features.0.weight": torch.zeros(1), "extra": threading.Lock}, path)  # a class: needs unpickling
    with pytest.raises(ValueError, match="weights_only=True"):
        L.load_vgg16_file(path)


def test_missing_weights_error_says_how_to_provide_them(empty_torch_hub):
    with pytest.raises(L.PerceptualWeightsUnavailable) as info:
        L.build_perceptual_loss(None, download_timeout=0, weight=0.5)
    message = str(info.value)
    assert "perceptual_weight=0.5" in message
    assert "TrainConfig.perceptual_weights_path=FILE" in message and "TrainConfig.perceptual_weight=0" in message
    assert "vgg16-397923af.pth" in message and str(empty_torch_hub) in message


@pytest.mark.timeout(300)  # a guard against a hang, not a speed assertion
def test_a_download_that_never_answers_gives_up_within_the_timeout(empty_torch_hub, monkeypatch):
    """A black-hole server accepts the connection and then says nothing: the download must not hang."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    port = server.getsockname()[1]
    accepted = []
    threading.Thread(target=lambda: accepted.append(server.accept()), daemon=True).start()
    monkeypatch.setattr(L, "vgg16_url", lambda: f"http://127.0.0.1:{port}/vgg16-397923af.pth")
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(L.PerceptualWeightsUnavailable, match="TrainConfig.perceptual_weight=0") as info:
        L.build_perceptual_loss(None, download_timeout=1.0, weight=1.0)
    # The socket timeout fired (not some other failure); a hang is caught by the timeout marker.
    assert "timed out" in str(info.value), str(info.value)
    assert accepted, "the test server was never contacted, so the timeout was not exercised"
    server.close()


def test_random_init_is_allowed_only_when_asked(empty_torch_hub):
    loss_fn = L.build_perceptual_loss(None, download_timeout=0, allow_random_init=True, kind="vgg")
    assert isinstance(loss_fn, L.PerceptualLoss)


def test_pixel_losses_compute_only_weighted_parts():
    a, b = torch.zeros(1, 3, 4, 4), torch.full((1, 3, 4, 4), 0.5)
    assert L.pixel_losses(a, b, 1.0, 0.0) == {"l2": pytest.approx(0.25)}
    parts = L.pixel_losses(a, b, 0.0, 2.0)
    assert set(parts) == {"l1"} and parts["l1"].item() == pytest.approx(0.5)


def test_hinge_losses_against_hand_values():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.0])
    # relu(1 - real) = [0, .5, 2] -> mean 5/6; relu(1 + fake) = [0, 1, 2] -> mean 1
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (5 / 6 + 1))
    assert hinge_g_loss(fake).item() == pytest.approx(1 / 3)


def test_patch_discriminator_shapes_and_no_buffers():
    disc = PatchDiscriminator(channels=8, layers=3)
    assert disc(torch.rand(2, 3, 32, 32)).shape == (2, 1, 2, 2)
    assert disc(torch.rand(1, 3, 64, 64)).shape == (1, 1, 6, 6)
    assert list(disc.buffers()) == []  # nothing to keep in sync across ranks


def test_adaptive_weight_is_the_ratio_of_gradient_norms():
    layer = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    nll = (layer * torch.tensor([3.0, 4.0])).sum()  # grad [3, 4], norm 5
    g = (layer * torch.tensor([0.0, 0.5])).sum()  # grad [0, .5], norm .5
    w = adaptive_weight(nll, g, layer)
    assert w.item() == pytest.approx(5 / (0.5 + 1e-4))
    assert not w.requires_grad
    assert adaptive_weight((layer * 1e9).sum(), (layer * 0).sum(), layer, max_weight=10.0).item() == 10.0


@pytest.mark.parametrize("channels", [36, 100])
def test_discriminator_accepts_any_width(channels):
    from vit_vq.training.discriminator import _group_norm

    assert _group_norm(channels).num_channels == channels


# -- LPIPS through the `lpips` package (its learned linear weights ship in its wheel; the VGG16
# backbone is not available offline, so these tests build one locally with random weights) --------
def _random_vgg16_file(tmp_path):
    torch.manual_seed(1)
    path = tmp_path / "vgg16-local.pth"
    torch.save({f"features.{k}": v for k, v in L.vgg16_features().state_dict().items()}, path)
    return path


def test_lpips_loss_is_the_lpips_package_with_its_learned_weights_on_a_local_backbone(tmp_path):
    import importlib.resources

    lpips = pytest.importorskip("lpips")
    path = _random_vgg16_file(tmp_path)
    loss_fn = L.build_perceptual_loss(path, download_timeout=0, kind="lpips")
    assert isinstance(loss_fn, L.LPIPSLoss) and loss_fn.kind == "lpips" and "LPIPS-VGG" in loss_fn.description

    # the learned per-channel weights are the ones in the wheel, and they are not uniform
    shipped = torch.load(importlib.resources.files("lpips") / "weights/v0.1/vgg.pth", map_location="cpu", weights_only=True)
    lin0 = loss_fn.lpips.lin0.model[1].weight
    assert torch.equal(lin0, shipped["lin0.model.1.weight"]) and lin0.std() > 0

    # an independent LPIPS: the package's module, its backbone loaded layer by layer from the file
    state = torch.load(path, weights_only=True)
    ref = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False).eval()
    for part in (ref.net.slice1, ref.net.slice2, ref.net.slice3, ref.net.slice4, ref.net.slice5):
        for name, layer in part.named_children():
            layer.load_state_dict({k: state[f"features.{name}.{k}"] for k in layer.state_dict()})
    gen = torch.Generator().manual_seed(0)
    target, recon = torch.rand(3, 3, 48, 48, generator=gen), torch.rand(3, 3, 48, 48, generator=gen)
    recon.requires_grad_(True)
    value = loss_fn(recon, target)
    with torch.no_grad():
        expected = ref(recon * 2 - 1, target * 2 - 1).mean()  # LPIPS takes [-1, 1]
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
    value.backward()
    assert recon.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in loss_fn.parameters())
    assert float(loss_fn(target, target)) == pytest.approx(0.0, abs=1e-6)


def test_auto_picks_lpips_when_the_package_is_installed_else_the_vgg_loss(tmp_path, monkeypatch):
    import importlib.util

    pytest.importorskip("lpips")
    assert L.perceptual_kind("auto") == "lpips" and L.perceptual_kind("vgg") == "vgg"
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lpips" else real(name, *a))
    assert L.perceptual_kind("auto") == "vgg"
    assert isinstance(L.build_perceptual_loss(_random_vgg16_file(tmp_path), download_timeout=0), L.PerceptualLoss)
    with pytest.raises(ModuleNotFoundError, match=r"needs the `lpips` package \(pip install lpips\)"):
        L.perceptual_kind("lpips")
