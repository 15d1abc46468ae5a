"""Real-ESRGAN second-order degradation, batched in torch, seeded by an explicit generator.

    from degrade import DegradeConfig, degrade, random_crop_pair_source
    g = torch.Generator().manual_seed(0)
    gt, lr, params = degrade(hr, DegradeConfig(), generator=g)   # hr (B, 3, H, W) in [0, 1]

Follows Real-ESRGAN (Wang et al., ICCVW 2021), x4plus settings, as MFSR §5.1 uses it (GT 512², LR 128²).
Facts, defaults and order of operations: reference/DEGRADATION.md.
Differences from Real-ESRGAN: every random choice is drawn per image (Real-ESRGAN draws the resize,
the second-blur flag and the final order once per batch); JPEG is a real Pillow round-trip at an integer
quality (Real-ESRGAN uses DiffJPEG, a torch simulation, at a float quality); no training-pair queue.
"""
import io
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")
RESIZE_MODES = ("area", "bilinear", "bicubic")

# --------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class StageConfig:
    kernel_prob: tuple = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)  # over KERNEL_TYPES
    sinc_prob: float = 0.1
    blur_sigma: tuple = (0.2, 3.0)
    betag_range: tuple = (0.5, 4.0)     # generalized Gaussian beta
    betap_range: tuple = (1.0, 2.0)     # plateau beta
    blur_prob: float = 1.0
    resize_prob: tuple = (0.2, 0.7, 0.1)  # up, down, keep
    resize_range: tuple = (0.15, 1.5)   # down from [lo, 1], up from [1, hi]
    gaussian_noise_prob: float = 0.5    # else Poisson
    noise_range: tuple = (1.0, 30.0)    # Gaussian sigma on the 0-255 scale
    poisson_scale_range: tuple = (0.05, 3.0)
    gray_noise_prob: float = 0.4
    jpeg_range: tuple = (30, 95)        # integer quality, both ends included


STAGE2 = StageConfig(blur_sigma=(0.2, 1.5), blur_prob=0.8, resize_prob=(0.3, 0.4, 0.3),
                     resize_range=(0.3, 1.2), noise_range=(1.0, 25.0), poisson_scale_range=(0.05, 2.5))


@dataclass(frozen=True)
class DegradeConfig:
    scale: int = 4
    gt_size: int = 512                  # training crop (MFSR §5.1)
    kernel_sizes: tuple = (7, 9, 11, 13, 15, 17, 19, 21)
    stage1: StageConfig = StageConfig()
    stage2: StageConfig = STAGE2
    final_sinc_prob: float = 0.8
    usm_gt: bool = True                 # Real-ESRGAN degrades and supervises with the USM-sharpened GT


# --------------------------------------------------------------------------------------------
# Kernels: (k, k) float32, sum 1, grid x (column), y (row) in [-(k-1)/2, (k-1)/2]


def _grid(k):
    ax = torch.arange(k, dtype=torch.float64) - (k - 1) / 2
    y, x = torch.meshgrid(ax, ax, indexing="ij")
    return x, y


def _quad_form(k, sigma_x, sigma_y, theta):
    """p^T Sigma^-1 p with Sigma = R(theta) diag(sx^2, sy^2) R(theta)^T, evaluated in the rotated frame."""
    x, y = _grid(k)
    c, s = math.cos(theta), math.sin(theta)
    u, v = c * x + s * y, -s * x + c * y  # R^T p
    return (u / sigma_x) ** 2 + (v / sigma_y) ** 2


def _normalise(kernel):
    return (kernel / kernel.sum()).float()


def gaussian_kernel(k, sigma_x, sigma_y=None, theta=0.0):
    sigma_y = sigma_x if sigma_y is None else sigma_y
    return _normalise(torch.exp(-0.5 * _quad_form(k, sigma_x, sigma_y, theta)))


def generalized_gaussian_kernel(k, sigma_x, sigma_y, theta, beta):
    return _normalise(torch.exp(-0.5 * _quad_form(k, sigma_x, sigma_y, theta) ** beta))


def plateau_kernel(k, sigma_x, sigma_y, theta, beta):
    return _normalise(1 / (1 + _quad_form(k, sigma_x, sigma_y, theta) ** beta))


def sinc_kernel(k, omega_c):
    """Circular low-pass: omega_c J1(omega_c r) / (2 pi r); its limit at r = 0 is omega_c^2 / (4 pi)."""
    x, y = _grid(k)
    r = torch.sqrt(x ** 2 + y ** 2)
    safe = torch.where(r > 0, r, torch.ones_like(r))
    kernel = omega_c * torch.special.bessel_j1(omega_c * safe) / (2 * math.pi * safe)
    kernel = torch.where(r > 0, kernel, torch.full_like(r, omega_c ** 2 / (4 * math.pi)))
    return _normalise(kernel)


def kernel_from_params(p):
    """Rebuild the (k, k) kernel from its `params` record, so the record alone reproduces the blur."""
    t, k = p["type"], p["size"]
    if t == "pulse":
        return torch.ones(1, 1)
    if t == "sinc":
        return sinc_kernel(k, p["omega_c"])
    if t.startswith("generalized"):
        return generalized_gaussian_kernel(k, p["sigma_x"], p["sigma_y"], p["theta"], p["beta"])
    if t.startswith("plateau"):
        return plateau_kernel(k, p["sigma_x"], p["sigma_y"], p["theta"], p["beta"])
    return gaussian_kernel(k, p["sigma_x"], p["sigma_y"], p["theta"])


# --------------------------------------------------------------------------------------------
# Random draws, all from one torch.Generator (None: torch's global one)


def _rand(g):
    return torch.rand((), generator=g, dtype=torch.float64).item()


def _uniform(g, lo, hi):
    return lo + (hi - lo) * _rand(g)


def _choice(g, items, probs=None):
    probs = [1.0] * len(items) if probs is None else probs
    u, acc = _rand(g) * sum(probs), 0.0
    for item, p in zip(items, probs):
        acc += p
        if u < acc:
            return item
    return items[-1]


def _beta(g, lo, hi):
    # as BasicSR: half below 1, half above (so plateau's [1, 2] gives beta = 1 half the time)
    return _uniform(g, lo, 1.0) if _rand(g) < 0.5 else _uniform(g, 1.0, hi)


def random_kernel_params(st, sizes, g):
    """The mixed-kernel draw of one stage: size, then sinc (prob. sinc_prob) or one of KERNEL_TYPES."""
    k = _choice(g, sizes)
    if _rand(g) < st.sinc_prob:
        lo = math.pi / 3 if k < 13 else math.pi / 5
        return {"type": "sinc", "size": k, "omega_c": _uniform(g, lo, math.pi)}
    t = _choice(g, KERNEL_TYPES, st.kernel_prob)
    sx = _uniform(g, *st.blur_sigma)
    p = {"type": t, "size": k, "sigma_x": sx, "sigma_y": sx, "theta": 0.0}
    if t.endswith("aniso"):
        p["sigma_y"], p["theta"] = _uniform(g, *st.blur_sigma), _uniform(g, -math.pi, math.pi)
    if t.startswith("generalized"):
        p["beta"] = _beta(g, *st.betag_range)
    if t.startswith("plateau"):
        p["beta"] = _beta(g, *st.betap_range)
    return p


def _stage_params(st, sizes, g):
    p = {"kernel": random_kernel_params(st, sizes, g) if _rand(g) < st.blur_prob else None}
    direction = _choice(g, ("up", "down", "keep"), st.resize_prob)
    s = {"up": lambda: _uniform(g, 1.0, st.resize_range[1]),
         "down": lambda: _uniform(g, st.resize_range[0], 1.0), "keep": lambda: 1.0}[direction]()
    p["resize"] = {"direction": direction, "scale": s, "mode": _choice(g, RESIZE_MODES)}
    if _rand(g) < st.gaussian_noise_prob:
        p["noise"] = {"kind": "gaussian", "sigma": _uniform(g, *st.noise_range)}
    else:
        p["noise"] = {"kind": "poisson", "scale": _uniform(g, *st.poisson_scale_range)}
    p["noise"]["gray"] = _rand(g) < st.gray_noise_prob
    lo, hi = st.jpeg_range
    p["jpeg"] = int(torch.randint(lo, hi + 1, (), generator=g))
    return p


def draw_params(cfg, g):
    """Everything one image's degradation needs, as a plain nested dict (the `params` record)."""
    p = {"stage1": _stage_params(cfg.stage1, cfg.kernel_sizes, g),
         "stage2": _stage_params(cfg.stage2, cfg.kernel_sizes, g)}
    p["final_order"] = _choice(g, ("resize_sinc_jpeg", "jpeg_resize_sinc"))
    p["final_mode"] = _choice(g, RESIZE_MODES)
    if _rand(g) < cfg.final_sinc_prob:
        p["sinc"] = {"type": "sinc", "size": _choice(g, cfg.kernel_sizes), "omega_c": _uniform(g, math.pi / 3, math.pi)}
    else:
        p["sinc"] = {"type": "pulse", "size": 1}
    return p


# --------------------------------------------------------------------------------------------
# Image operations


def _pad(x, p):
    # reflect as Real-ESRGAN; tiny images (strong downscale of a small test input) fall back to replicate
    mode = "reflect" if p < min(x.shape[-2:]) else "replicate"
    return F.pad(x, (p, p, p, p), mode=mode)


def filter2d(x, kernels):
    """Per-image correlation with reflect padding: x (B, C, H, W), kernels: B odd square tensors."""
    B, C, H, W = x.shape
    K = max(k.shape[-1] for k in kernels)  # zero-pad to the largest, not to 21: conv cost is K^2
    w = torch.stack([F.pad(k, [(K - k.shape[-1]) // 2] * 4) for k in kernels]).to(x.dtype)  # (B, K, K)
    w = w.repeat_interleave(C, 0).unsqueeze(1)                                             # (B*C, 1, K, K)
    xp = _pad(x, K // 2).reshape(1, B * C, H + K - 1, W + K - 1)
    return F.conv2d(xp, w, groups=B * C).reshape(B, C, H, W)  # one grouped conv for the batch


def _filter_list(imgs, kernels):
    """filter2d over a list of (3, h, w) images of mixed sizes: one grouped conv per size."""
    out, groups = list(imgs), {}
    for i, im in enumerate(imgs):
        if kernels[i] is not None:
            groups.setdefault(tuple(im.shape), []).append(i)
    for idx in groups.values():
        res = filter2d(torch.stack([imgs[i] for i in idx]), [kernels[i] for i in idx])
        for i, r in zip(idx, res):
            out[i] = r
    return out


def _separable_blur(x, g1):
    B, C, H, W = x.shape
    k = g1.numel()
    n = B * C  # depthwise (grouped) convs: much faster on CPU than one-channel convs over B*C images
    xp = _pad(x, k // 2).reshape(1, n, H + k - 1, W + k - 1)
    xp = F.conv2d(xp, g1.view(1, 1, 1, k).to(x.dtype).expand(n, 1, 1, k), groups=n)  # (1, n, H+k-1, W)
    return F.conv2d(xp, g1.view(1, 1, k, 1).to(x.dtype).expand(n, 1, k, 1), groups=n).reshape(B, C, H, W)


def usm_sharpen(img, weight=0.5, radius=50, threshold=10):
    """Unsharp masking as Real-ESRGAN's USMSharp: img (B, C, H, W) in [0, 1]."""
    k = radius + 1 if radius % 2 == 0 else radius
    sigma = 0.3 * ((k - 1) * 0.5 - 1) + 0.8  # OpenCV's sigma for sigma=0, which USMSharp relies on
    ax = torch.arange(k, dtype=torch.float64) - (k - 1) / 2
    g1 = _normalise(torch.exp(-0.5 * (ax / sigma) ** 2))   # a Gaussian is separable: 2k taps instead of k^2
    residual = img - _separable_blur(img, g1)
    mask = (residual.abs() * 255 > threshold).to(img.dtype)
    soft = _separable_blur(mask, g1)         # softened mask avoids halos at the threshold
    sharp = (img + weight * residual).clamp(0, 1)
    return soft * sharp + (1 - soft) * img


def _resize(x, mode, size=None, scale=None):
    return F.interpolate(x[None], size=size, scale_factor=scale, mode=mode)[0]  # no antialias, as Real-ESRGAN


def add_noise(x, p, g):
    """Gaussian or Poisson noise on one (3, h, w) image; gray noise is one map shared by the channels."""
    h, w = x.shape[-2:]
    if p["kind"] == "gaussian":
        noise = torch.randn((1 if p["gray"] else 3, h, w), generator=g) * p["sigma"] / 255
    else:
        src = (0.2989 * x[0] + 0.587 * x[1] + 0.114 * x[2])[None] if p["gray"] else x   # torchvision's gray
        q = (src * 255).round().clamp(0, 255)
        # BasicSR's intensity: distinct 8-bit levels, rounded up to a power of two (bincount, not unique)
        levels = int(torch.bincount(q.flatten().long(), minlength=256).count_nonzero())
        vals = 2.0 ** math.ceil(math.log2(levels))
        q = q / 255
        noise = (torch.poisson(q * vals, generator=g) / vals - q) * p["scale"]
    return (x + noise).clamp(0, 1)


def jpeg(x, quality):
    """Real JPEG round-trip through Pillow (libjpeg, IJG quality scale, 4:2:0 chroma as DiffJPEG)."""
    arr = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=int(quality), subsampling=2)
    out = np.array(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    return torch.from_numpy(out).permute(2, 0, 1).float() / 255  # (3, h, w)


# --------------------------------------------------------------------------------------------
# The pipeline


def _stage(x, ps, key, out_hw, g):
    """blur -> resize -> noise for every image; out_hw None: resize by scale (stage 1)."""
    kernels = [None if p[key]["kernel"] is None else kernel_from_params(p[key]["kernel"]) for p in ps]
    x = _filter_list(x, kernels)
    for i, p in enumerate(ps):
        r = p[key]["resize"]
        size = None if out_hw is None else (int(out_hw[0] * r["scale"]), int(out_hw[1] * r["scale"]))
        x[i] = _resize(x[i], r["mode"], size=size, scale=r["scale"] if size is None else None)
    return [add_noise(xi, p[key]["noise"], g) for xi, p in zip(x, ps)]


def _final(x, ps, lr_hw):
    """[resize to LR + sinc] and JPEG, in each image's drawn order."""
    x = [jpeg(xi, p["stage2"]["jpeg"]) if p["final_order"] == "jpeg_resize_sinc" else xi for xi, p in zip(x, ps)]
    x = torch.stack([_resize(xi, p["final_mode"], size=lr_hw) for xi, p in zip(x, ps)])  # (B, 3, h, w)
    x = filter2d(x, [kernel_from_params(p["sinc"]) for p in ps])
    return torch.stack([jpeg(xi.clamp(0, 1), p["stage2"]["jpeg"]) if p["final_order"] == "resize_sinc_jpeg"
                        else xi for xi, p in zip(x, ps)])


@torch.no_grad()
def degrade(hr, cfg=DegradeConfig(), generator=None):
    """hr (B, 3, H, W) in [0, 1], H and W divisible by cfg.scale -> (gt, lr, params): gt USM-sharpened
    if cfg.usm_gt; lr (B, 3, H/scale, W/scale) on the 8-bit grid; params: per image, everything drawn."""
    assert hr.ndim == 4 and hr.shape[1] == 3, f"expected (B, 3, H, W), got {tuple(hr.shape)}"
    B, _, H, W = hr.shape
    if H % cfg.scale or W % cfg.scale:
        raise ValueError(f"H={H}, W={W} must be divisible by scale={cfg.scale}")
    ps = [draw_params(cfg, generator) for _ in range(B)]
    gt = usm_sharpen(hr.float()) if cfg.usm_gt else hr.float()
    lr_hw = (H // cfg.scale, W // cfg.scale)
    x = _stage(list(gt.unbind(0)), ps, "stage1", None, generator)
    x = [jpeg(xi, p["stage1"]["jpeg"]) for xi, p in zip(x, ps)]
    x = _stage(x, ps, "stage2", lr_hw, generator)
    lr = _final(x, ps, lr_hw)
    lr = (lr * 255).round().clamp(0, 255) / 255  # (B, 3, H/4, W/4)
    return gt, lr, ps


def bicubic_down(hr, scale=4):
    """The clean degradation: hr (B, 3, H, W) in [0, 1] -> (B, 3, H/scale, W/scale), antialiased
    bicubic (as PIL's or MATLAB's imresize) on the 8-bit grid. What most users feed a super-resolver."""
    B, _, H, W = hr.shape
    if H % scale or W % scale:
        raise ValueError(f"H={H}, W={W} must be divisible by scale={scale}")
    lr = F.interpolate(hr.float(), size=(H // scale, W // scale), mode="bicubic", antialias=True, align_corners=False)
    return (lr.clamp(0, 1) * 255).round() / 255


# --------------------------------------------------------------------------------------------
# Crops


def random_crop_pair_source(img, size=512, generator=None):
    """Random size x size crop of img (3, H, W); images smaller than size are upscaled first (bicubic)."""
    _, H, W = img.shape
    f = max(1.0, size / min(H, W))
    if f > 1:
        hw = (max(size, round(H * f)), max(size, round(W * f)))
        img = F.interpolate(img[None], size=hw, mode="bicubic", align_corners=False)[0].clamp(0, 1)
    _, H2, W2 = img.shape
    top = int(torch.randint(0, H2 - size + 1, (), generator=generator))
    left = int(torch.randint(0, W2 - size + 1, (), generator=generator))
    return img[:, top:top + size, left:left + size], {"upscale": f, "top": top, "left": left}
