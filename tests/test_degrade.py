"""Tests of degrade.py: the Real-ESRGAN degradations' kernels, noise and choices, against closed forms and BasicSR."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

import degrade as D


def _deg_j1(x):
    """Bessel J1 by its integral (1/pi) int_0^pi cos(t - x sin t) dt: independent of torch.special."""
    t = np.linspace(0, math.pi, 4001)
    return np.trapezoid(np.cos(t - x * np.sin(t)), t) / math.pi


def _deg_quad(k, sx, sy, th, i, j):
    """p^T Sigma^-1 p at row i, column j, with Sigma built as a matrix and inverted by NumPy."""
    R = np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
    S = R @ np.diag([sx ** 2, sy ** 2]) @ R.T
    p = np.array([j - (k - 1) / 2, i - (k - 1) / 2])
    return p @ np.linalg.inv(S) @ p


def test_deg_kernels_closed_form():
    k, sx, sy, th, beta = 15, 1.7, 0.8, 0.6, 1.6
    cases = [(D.gaussian_kernel(k, sx, sy, th), lambda q: math.exp(-0.5 * q)),
             (D.generalized_gaussian_kernel(k, sx, sy, th, beta), lambda q: math.exp(-0.5 * q ** beta)),
             (D.plateau_kernel(k, sx, sy, th, beta), lambda q: 1 / (1 + q ** beta))]
    for ker, f in cases:
        assert abs(ker.sum().item() - 1) < 1e-5
        ref = np.array([[f(_deg_quad(k, sx, sy, th, i, j)) for j in range(k)] for i in range(k)])
        ref /= ref.sum()
        assert np.abs(ker.numpy() - ref).max() < 1e-6
    wc = 1.3
    s = D.sinc_kernel(13, wc)
    assert abs(s.sum().item() - 1) < 1e-5
    unnorm = {(6, 6): wc ** 2 / (4 * math.pi)}
    for (i, j) in [(6, 9), (2, 3), (0, 0)]:
        r = math.hypot(i - 6, j - 6)
        unnorm[(i, j)] = wc * _deg_j1(wc * r) / (2 * math.pi * r)
    # ratios to the centre do not depend on the normalisation
    for (i, j), v in unnorm.items():
        assert abs(s[i, j].item() / s[6, 6].item() - v / unnorm[(6, 6)]) < 1e-5


def test_deg_sinc_frequency_response():
    wc, n = math.pi / 2, 256
    H = torch.fft.fft2(D.sinc_kernel(21, wc).double(), s=(n, n)).abs()
    w = torch.fft.fftfreq(n, dtype=torch.float64) * 2 * math.pi
    r = torch.sqrt(w[:, None] ** 2 + w[None, :] ** 2)
    # truncation to 21 taps leaves a Gibbs ripple: tolerance 0.15 in the pass band, 0.1 in the stop band
    assert (H[r < 0.6 * wc] - 1).abs().max() < 0.15
    assert H[(r > 1.5 * wc) & (r < math.pi)].max() < 0.1


def test_deg_aniso_rotates_with_theta():
    a = D.gaussian_kernel(21, 3.0, 1.0, 0.0)
    b = D.gaussian_kernel(21, 3.0, 1.0, math.pi / 2)
    assert torch.allclose(b, a.T, atol=1e-7)          # 90 degrees swaps the axes
    th = 0.7
    k = D.gaussian_kernel(21, 3.0, 1.0, th).double()
    x, y = D._grid(21)  # x: column, y: row
    cov = torch.tensor([[(k * x * x).sum(), (k * x * y).sum()], [(k * x * y).sum(), (k * y * y).sum()]])
    evals, evecs = torch.linalg.eigh(cov)
    major = evecs[:, 1]
    ang = math.atan2(major[1].item(), major[0].item()) % math.pi
    assert abs(ang - th) < 0.02                        # long axis points along theta


def test_deg_kernel_type_frequencies_and_ranges():
    g = torch.Generator().manual_seed(0)
    st, n = D.StageConfig(), 12000
    draws = [D.random_kernel_params(st, D.DegradeConfig().kernel_sizes, g) for _ in range(n)]
    types = ("sinc",) + D.KERNEL_TYPES
    probs = np.array([st.sinc_prob] + [(1 - st.sinc_prob) * p for p in st.kernel_prob])
    counts = np.array([sum(d["type"] == t for d in draws) for t in types])
    chi2 = (((counts - n * probs) ** 2) / (n * probs)).sum()
    assert chi2 < 22.46                                 # chi^2 with 6 dof at p = 0.001
    sizes = np.array([sum(d["size"] == s for d in draws) for s in range(7, 22, 2)])
    assert (((sizes - n / 8) ** 2) / (n / 8)).sum() < 24.32  # 7 dof, p = 0.001
    for d in draws:
        if d["type"] == "sinc":
            lo = math.pi / 3 if d["size"] < 13 else math.pi / 5
            assert lo <= d["omega_c"] <= math.pi
            continue
        assert 0.2 <= d["sigma_x"] <= 3 and 0.2 <= d["sigma_y"] <= 3 and -math.pi <= d["theta"] <= math.pi
        if d["type"].startswith("generalized"):
            assert 0.5 <= d["beta"] <= 4
        if d["type"].startswith("plateau"):
            assert 1 <= d["beta"] <= 2


def test_deg_pipeline_choice_frequencies():
    g, n, cfg = torch.Generator().manual_seed(1), 3000, D.DegradeConfig()
    ps = [D.draw_params(cfg, g) for _ in range(n)]
    def frac(f):
        return sum(map(f, ps)) / n
    checks = [(frac(lambda p: p["stage1"]["resize"]["direction"] == "down"), 0.7),
              (frac(lambda p: p["stage2"]["resize"]["direction"] == "keep"), 0.3),
              (frac(lambda p: p["stage2"]["kernel"] is not None), 0.8),
              (frac(lambda p: p["sinc"]["type"] == "sinc"), 0.8),
              (frac(lambda p: p["stage1"]["noise"]["kind"] == "gaussian"), 0.5),
              (frac(lambda p: p["stage1"]["noise"]["gray"]), 0.4),
              (frac(lambda p: p["final_order"] == "resize_sinc_jpeg"), 0.5)]
    for got, want in checks:
        assert abs(got - want) < 4.5 * math.sqrt(want * (1 - want) / n)  # 4.5 binomial sigmas
    q = [p["stage1"]["jpeg"] for p in ps]
    assert min(q) == 30 and max(q) == 95
    s = [p["stage1"]["resize"]["scale"] for p in ps if p["stage1"]["resize"]["direction"] == "down"]
    assert 0.15 <= min(s) and max(s) <= 1


def test_deg_determinism_shape_and_grid():
    torch.manual_seed(0)
    hr = torch.rand(3, 3, 64, 96)
    out = [D.degrade(hr, generator=torch.Generator().manual_seed(s)) for s in (5, 5, 6)]
    (gt, lr, p), (gt2, lr2, p2), (_, lr3, p3) = out
    assert torch.equal(lr, lr2) and torch.equal(gt, gt2) and p == p2
    assert not torch.equal(lr, lr3) and p != p3
    assert lr.shape == (3, 3, 16, 24) and gt.shape == hr.shape
    assert (lr * 255 - (lr * 255).round()).abs().max() < 1e-4
    assert lr.min() >= 0 and lr.max() <= 1


def test_deg_jpeg_quality_monotone():
    torch.manual_seed(0)
    x = torch.nn.functional.interpolate(torch.rand(1, 3, 16, 16), size=(64, 64), mode="bicubic")[0].clamp(0, 1)
    err = [(D.jpeg(x, q) - x).pow(2).mean().item() for q in (30, 60, 95)]
    assert err[0] > err[1] > err[2] > 0


def test_deg_grouped_filter_equals_per_image():
    torch.manual_seed(0)
    x = torch.rand(3, 3, 20, 24)
    ks = [D.gaussian_kernel(7, 1.0), D.sinc_kernel(11, 2.0), torch.ones(1, 1)]
    both = D.filter2d(x, ks)
    for i in range(3):
        assert torch.allclose(both[i], D.filter2d(x[i:i + 1], [ks[i]])[0], atol=1e-6)
    assert torch.equal(both[2], x[2])                   # the pulse is the identity


def test_deg_crop_source():
    g = torch.Generator().manual_seed(0)
    small = torch.rand(3, 40, 30)
    c, info = D.random_crop_pair_source(small, 64, g)
    assert c.shape == (3, 64, 64) and info["upscale"] > 2
    big = torch.rand(3, 100, 90)
    c, info = D.random_crop_pair_source(big, 64, g)
    assert torch.equal(c, big[:, info["top"]:info["top"] + 64, info["left"]:info["left"] + 64])


def _deg_load_basicsr():
    """BasicSR's degradations.py and img_process_util.py (basicsr_ref.py); skipped without BasicSR."""
    import basicsr_ref
    try:
        return basicsr_ref.degradations()
    except ImportError as e:
        pytest.skip(str(e))


def test_deg_matches_basicsr_kernels_and_usm():
    bdeg, bipu = _deg_load_basicsr()
    k, sx, sy, th, beta = 17, 2.1, 0.9, -1.1, 1.4
    pairs = [(D.gaussian_kernel(k, sx, sy, th), bdeg.bivariate_Gaussian(k, sx, sy, th, isotropic=False)),
             (D.gaussian_kernel(k, sx), bdeg.bivariate_Gaussian(k, sx, sx, 0, isotropic=True)),
             (D.generalized_gaussian_kernel(k, sx, sy, th, beta),
              bdeg.bivariate_generalized_Gaussian(k, sx, sy, th, beta, isotropic=False)),
             (D.plateau_kernel(k, sx, sy, th, beta), bdeg.bivariate_plateau(k, sx, sy, th, beta, isotropic=False)),
             (D.sinc_kernel(k, 1.7), bdeg.circular_lowpass_kernel(1.7, k))]
    for ours, ref in pairs:
        assert np.abs(ours.numpy() - ref).max() < 1e-6
    torch.manual_seed(0)
    img = torch.nn.functional.interpolate(torch.rand(2, 3, 12, 12), size=(64, 64), mode="bicubic").clamp(0, 1)
    ref = bipu.USMSharp()(img)
    assert (D.usm_sharpen(img) - ref).abs().max() < 1e-5
    assert (D.usm_sharpen(img) - img).abs().max() > 0.01  # it did sharpen
    kern = D.gaussian_kernel(21, 2.0, 1.0, 0.4)
    assert (D.filter2d(img, [kern, kern]) - bipu.filter2D(img, kern[None])).abs().max() < 1e-5


def test_deg_noise_statistics_match_basicsr():
    bdeg, _ = _deg_load_basicsr()
    torch.manual_seed(0)
    img = torch.nn.functional.interpolate(torch.rand(1, 3, 8, 8), size=(128, 128), mode="bilinear")
    img = img * 0.8 + 0.1  # away from the clamp, so the std is the noise's own
    g = torch.Generator().manual_seed(0)
    for gray in (False, True):
        ours = D.add_noise(img[0], {"kind": "poisson", "scale": 2.0, "gray": gray}, g) - img[0]
        ref = bdeg.add_poisson_noise_pt(img, scale=2.0, gray_noise=float(gray), clip=True)[0] - img[0]
        assert abs(ours.std().item() / ref.std().item() - 1) < 0.05  # 49k samples: std error ~0.5%
    ours = D.add_noise(img[0], {"kind": "gaussian", "sigma": 20.0, "gray": False}, g) - img[0]
    assert abs(ours.std().item() * 255 / 20.0 - 1) < 0.03


def test_bicubic_down_matches_pil_and_stays_on_the_8_bit_grid():
    import degrade
    rng = np.random.default_rng(0)
    smooth = np.kron(rng.random((8, 8, 3)), np.ones((8, 8, 1)))           # 64^2 blocks: no clipping ringing
    img = (smooth * 200 + 20).round().astype(np.uint8)
    hr = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    lr = degrade.bicubic_down(hr)
    assert lr.shape == (1, 3, 16, 16)
    assert torch.equal(lr, (lr * 255).round() / 255)
    ref = np.asarray(Image.fromarray(img).resize((16, 16), Image.BICUBIC), np.float32) / 255
    err = (lr[0].permute(1, 2, 0).numpy() - ref)
    assert np.abs(err).max() <= 3 / 255 and np.abs(err).mean() < 0.5 / 255   # PIL rounds its own way
    flat = torch.full((1, 3, 32, 32), 0.4)
    assert torch.allclose(degrade.bicubic_down(flat), torch.full((1, 3, 8, 8), round(0.4 * 255) / 255))
    with pytest.raises(ValueError, match="divisible"):
        degrade.bicubic_down(torch.zeros(1, 3, 30, 32))
