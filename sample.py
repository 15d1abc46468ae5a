"""Super-resolve real images x4 in one step with an MFSR student (or with the 40-step teacher).

    python sample.py in.png                               # -> in_mfsr.png, 4x the size (shipped tiny model)
    python sample.py photos/ "more/*.jpg" -o out/ --steps 2
    python sample.py in.png --ckpt runs/mfsr/ckpt-0012000/student.safetensors --vae sd3.5_medium.safetensors
    python sample.py in.png --teacher --ckpt dit4sr_q/ --vae sd3.5_medium.safetensors --steps 40 --cfg 8

    from sample import upscale
    y = upscale(x, net, vae, cond, steps=1)               # x (1, 3, H, W) in [0, 1] -> (1, 3, 4H, 4W)

The pipeline (MFSR Alg. 2; DiT4SR's inference recipe, ARCHITECTURE §3.7, for the rest):
1. the LR image is bicubic-upsampled x4 (as train.py's pairs are made), padded by reflection to a
   multiple of VAE factor x patch, and VAE-encoded to z_lr (the posterior mean);
2. z_0 ~ N(0, I) is drawn once for the whole latent, then N uniform steps z <- z + (s - t) u(z, t, s)
   with the student (or the teacher's Euler steps with CFG against the negative prompt);
   above one latent tile the network runs on overlapping tiles (64 x 64, overlap 24, as DiT4SR)
   whose outputs are blended with Gaussian weights at every step;
3. decode (the VAE tiles itself above a size, vae.py), crop the padding, colour-fix against the
   upsampled LR (AdaIN by default, or wavelet), clamp to [0, 1].
Gray images come out gray, alpha is upscaled apart (bicubic), 16-bit files are written at 16 bits.
"""
import argparse
import contextlib
import glob
import importlib.util
import math
import os
import sys
import time
import warnings
import zlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

import model
import mfsr
import vae as vae_lib
from model import CheckpointError, SafetensorsFiles

SCALE = 4
SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "mfsr-tiny")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PROGRESS_AFTER = 2.0     # seconds an image may take before its progress is shown

# --------------------------------------------------------------------------------------------
# Latent tiles (ARCHITECTURE §3.7 step 6)


def gaussian_weights(h, w, var=0.01):
    """DiT4SR's blending weight of an h x w tile: a separable Gaussian of variance `var` in
    tile-normalised coordinates, peaked at the centre, tiny but never zero at the edges."""
    def g(n):
        x = (torch.arange(n, dtype=torch.float64) - (n - 1) / 2) / n
        return torch.exp(-x * x / (2 * var))
    return (g(h)[:, None] * g(w)[None, :]).float()                              # (h, w)


class TiledNet:
    """Calls a transformer on overlapping latent tiles and blends the outputs, so any latent size
    runs in bounded memory and within the model's position grid. Same signature as MMDiT.forward;
    the prompt goes to every tile whole, the LR latent is cropped like x. A latent that fits in one
    tile runs untiled (bit-identical to net). The network's outputs are linear in what the samplers
    combine (CFG, Euler steps), so blending the outputs is blending the velocities."""

    def __init__(self, net, tile=64, overlap=24, on_tile=None):
        p, most = net.cfg.patch, net.cfg.pos_grid * net.cfg.patch
        if tile % p or overlap % p or not 0 <= overlap < tile:
            raise ValueError(f"--tile {tile} / --tile-overlap {overlap}: need multiples of the patch {p} "
                             f"and 0 <= overlap < tile")
        if tile > most:
            raise ValueError(f"--tile {tile}: this model's position grid allows latent tiles up to {most}")
        self.net, self.tile, self.overlap, self.cfg = net, tile, overlap, net.cfg
        self.on_tile = on_tile or (lambda: None)      # called after every tile's network call

    def tiles(self, H, W):
        """The (rows, cols) slices of every tile of an H x W latent."""
        T = self.tile
        return [(slice(y, y + min(T, H)), slice(x, x + min(T, W)))
                for y in vae_lib.tile_starts(H, T, self.overlap) for x in vae_lib.tile_starts(W, T, self.overlap)]

    def __call__(self, x, sigma, pooled, context, lr=None, sigma_s=None):
        tiles = self.tiles(*x.shape[-2:])
        if len(tiles) == 1:
            y = self.net(x, sigma, pooled, context, lr=lr, sigma_s=sigma_s)
            self.on_tile()
            return y
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)           # (B, C, H, W)
        total = torch.zeros(x.shape[-2:], dtype=torch.float32, device=x.device)   # (H, W)
        for rows, cols in tiles:
            crop = (..., rows, cols)
            y = self.net(x[crop], sigma, pooled, context,
                         lr=None if lr is None else lr[crop], sigma_s=sigma_s)    # (B, C, th, tw)
            w = gaussian_weights(y.shape[-2], y.shape[-1]).to(x.device)
            out[crop] += y.float() * w
            total[rows, cols] += w
            self.on_tile()
        return (out / total).to(x.dtype)


# --------------------------------------------------------------------------------------------
# Colour fix (ARCHITECTURE §3.7 step 8): keep the LR's colours, take the model's details


def adain_color_fix(y, ref, eps=1e-5):
    """Per-image, per-channel mean and standard deviation of y set to those of ref. (B, 3, H, W)."""
    my, sy = y.mean((2, 3), keepdim=True), y.std((2, 3), keepdim=True)
    mr, sr = ref.mean((2, 3), keepdim=True), ref.std((2, 3), keepdim=True)
    return (y - my) / (sy + eps) * sr + mr


def wavelet_low(x, levels=5):
    """x blurred `levels` times by the a-trous (dilated) 3x3 binomial kernel, dilations 1, 2, 4, ...,
    replicate-padded: the low frequencies of a `levels`-level wavelet split."""
    k = torch.tensor([[1, 2, 1], [2, 4, 2], [1, 2, 1]], dtype=x.dtype, device=x.device) / 16
    k = k.expand(x.shape[1], 1, 3, 3)                                          # depthwise
    for i in range(levels):
        x = F.conv2d(F.pad(x, (2 ** i,) * 4, mode="replicate"), k, dilation=2 ** i, groups=x.shape[1])
    return x


def wavelet_color_fix(y, ref, levels=5):
    """y's high frequencies on ref's low frequencies (5-level a-trous wavelet, as DiT4SR / StableSR)."""
    return y - wavelet_low(y, levels) + wavelet_low(ref, levels)


COLOR_FIXES = {"adain": adain_color_fix, "wavelet": wavelet_color_fix, "none": lambda y, ref: y}
# DiT4SR's sampler settings, for checkpoints that record none
DEFAULTS = {"tile": 64, "tile_overlap": 24, "cfg": mfsr.DIT4SR_CFG, "shift": mfsr.SD35_SHIFT}


def sampling_settings(net):
    """tile, tile_overlap, cfg and shift for `upscale`: those recorded in the checkpoint, else DEFAULTS."""
    return {k: getattr(net, "sampling", {}).get(k, v) for k, v in DEFAULTS.items()}


# --------------------------------------------------------------------------------------------
# One image


def pad_to(x, multiple):
    """Pad (B, C, H, W) at the bottom and right to multiples of `multiple`: reflection where the
    image is big enough, else edge replication (a 4 x 4 image cannot reflect 4 pixels)."""
    H, W = x.shape[-2:]
    ph, pw = -H % multiple, -W % multiple
    mode = "reflect" if ph < H and pw < W else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode)


@torch.no_grad()
def upscale(img, net, vae, cond, steps=1, *, teacher=False, cond_neg=None, cfg=DEFAULTS["cfg"],
            shift=DEFAULTS["shift"], seed=0, tile=DEFAULTS["tile"], tile_overlap=DEFAULTS["tile_overlap"],
            color_fix="adain", vae_tile=None, progress=None, grid="shifted"):
    """x4 super-resolution of img (1, 3, H, W) in [0, 1] -> (1, 3, 4H, 4W) float32 in [0, 1], on CPU.

    net: a student (cfg.two_times) or, with teacher=True, a one-time teacher with the LR stream;
    both must be on the device and in the dtype wanted. cond = (pooled (1, P), context (1, L, D)),
    cond_neg likewise (the teacher's CFG negative, default cond). steps: uniform student steps
    (Alg. 2) or the teacher's Euler steps with guidance `cfg` on SD3's grid shifted by `shift`
    (the shift its training used; grid "uniform": Alg. 2's grid). tile / tile_overlap: latent tiles.
    vae_tile: passed to vae.encode / decode (None: vae.py decides by size, 0: never).
    progress: a Progress (or None), told the phases and every tile's network call."""
    assert img.ndim == 4 and img.shape[:2] == (1, 3), f"img must be (1, 3, H, W), got {tuple(img.shape)}"
    if color_fix not in COLOR_FIXES:
        raise ValueError(f"color_fix must be one of {sorted(COLOR_FIXES)}, got {color_fix!r}")
    p = next(net.parameters())
    device, dtype = p.device, p.dtype
    progress = progress or Progress(None)
    progress.phase("bicubic x4")
    H, W = img.shape[-2:]
    lr_up = F.interpolate(img.float().to(device), size=(SCALE * H, SCALE * W), mode="bicubic",
                          align_corners=False).clamp(0, 1)                        # (1, 3, 4H, 4W)
    x = pad_to(lr_up, vae.cfg.factor * net.cfg.patch)                          # (1, 3, H', W')
    progress.phase("VAE encode")
    z_lr = vae.encode((x * 2 - 1).to(next(vae.parameters()).dtype), tile=vae_tile).to(dtype)  # (1, C, h, w)
    g = torch.Generator(device).manual_seed(seed)
    tiled = TiledNet(net, tile, tile_overlap, on_tile=progress.tile)
    progress.phase("network", calls=steps * len(tiled.tiles(*z_lr.shape[-2:])))
    pooled, context = (c.to(device, dtype) for c in cond)
    if teacher:
        pooled_neg, context_neg = (c.to(device, dtype) for c in (cond_neg or cond))
        L = max(context.shape[1], context_neg.shape[1])     # zero-pad the shorter context so CFG can batch them
        pad = lambda ctx: F.pad(ctx, (0, 0, 0, L - ctx.shape[1]))
        z = mfsr.sample_teacher(tiled, z_lr, (pooled, pad(context)), (pooled_neg, pad(context_neg)), steps=steps,
                                cfg=cfg, shift=shift, generator=g, grid=grid)
    else:
        z = mfsr.sample_student(tiled, z_lr, pooled, context, steps=steps, generator=g)
    progress.phase("VAE decode")
    y = vae.decode(z.to(next(vae.parameters()).dtype), tile=vae_tile).float()  # (1, 3, H', W') in [-1, 1]
    y = ((y + 1) / 2)[..., :SCALE * H, :SCALE * W]                             # crop the padding
    progress.phase("colour fix")
    y = COLOR_FIXES[color_fix](y, lr_up).clamp(0, 1).cpu()
    progress.phase(None)
    return y


class Progress:
    """Network calls on tiles done / total, elapsed and ETA on `stream` (default stderr): a bar redrawn
    in place on a terminal, else a line every 10 %; nothing before `after` seconds (small images stay one
    summary line) nor with name=None. `seconds`: each phase's time, as upscale and process name them."""

    def __init__(self, name, stream=None, after=2.0):
        self.name, self.after, self.stream = name, after, stream or sys.stderr
        self.tty = name is not None and self.stream.isatty()
        self.t0 = self.phase_t0 = time.perf_counter()
        self.seconds, self.current = {}, None
        self.done = self.total = 0
        self.next_line, self.drawn = 0.1, False

    def phase(self, name, calls=0):
        now = time.perf_counter()
        if self.current is not None:
            self.seconds[self.current] = self.seconds.get(self.current, 0.0) + now - self.phase_t0
        self.current, self.phase_t0 = name, now
        if calls:
            self.done, self.total, self.network_t0 = 0, calls, now
        if name is None and self.drawn:
            print(file=self.stream, flush=True)                              # end the bar's line
            self.drawn = False

    def tile(self):
        self.done += 1
        now = time.perf_counter()
        if self.name is None or now - self.t0 < self.after or not self.total:
            return
        frac = self.done / self.total
        eta = (now - self.network_t0) / self.done * (self.total - self.done)
        text = (f"{self.name}: tiles {self.done}/{self.total}, {now - self.t0:.0f} s, "
                f"ETA {eta:.0f} s (network; then the VAE decode)")
        if self.tty:
            print(f"\r[{'#' * int(20 * frac):<20}] {text}", end="", file=self.stream, flush=True)
            self.drawn = True
        elif frac >= self.next_line or self.done == self.total:
            print(text, file=self.stream, flush=True)
            self.next_line = math.floor(frac * 10 + 1) / 10


# --------------------------------------------------------------------------------------------
# Loading the model and the prompt embeddings


def _beside(ckpt, name):
    return os.path.join(ckpt if os.path.isdir(ckpt) else os.path.dirname(os.path.abspath(ckpt)), name)


def load_models(ckpt, vae_path=None, teacher=False, device="cpu", dtype=torch.float32):
    """(net, vae) ready for `upscale`. ckpt=None: the shipped miniature in weights/mfsr-tiny/.
    The VAE: vae_path, else vae.safetensors beside the checkpoint, else the one inside it."""
    if ckpt is None:
        ckpt = os.path.join(SHIPPED, "student.safetensors")
        if not os.path.exists(ckpt):
            raise CheckpointError(f"the shipped model is missing ({ckpt}); pass --ckpt (a student.safetensors "
                                  f"exported by train.py) and --vae")
    net = model.load_transformer(ckpt, dtype=dtype, device=device)
    if not net.cfg.lr_stream:
        raise CheckpointError(f"{ckpt}: a plain SD3 transformer (no LR stream), not a super-resolution model")
    if net.cfg.two_times and teacher:
        raise CheckpointError(f"{ckpt}: this is a student (two time inputs); drop --teacher")
    if not net.cfg.two_times and not teacher:
        raise CheckpointError(f"{ckpt}: not an MFSR student (no s-embedder, one time input); pass --teacher "
                              f"to sample it as the 40-step teacher, or give a student.safetensors from train.py")
    if vae_path is None:
        vae_path = _beside(ckpt, "vae.safetensors")
        vae_path = vae_path if os.path.exists(vae_path) else ckpt
    try:
        vae = vae_lib.load_vae(vae_path, device=device)
    except CheckpointError as e:
        raise CheckpointError(f"no usable VAE ({e}); pass --vae (a VAE file or an SD3.5 checkpoint)") from None
    vae_lib.set_dtype(vae, dtype)
    if vae.cfg.latent_channels != net.cfg.in_channels:
        raise CheckpointError(f"{vae_path}: the VAE has {vae.cfg.latent_channels} latent channels, the "
                              f"transformer {net.cfg.in_channels}")
    return net.eval().requires_grad_(False), vae.eval().requires_grad_(False)


def load_embedding(path, null):
    """(context, pooled) from an embedding file, or the null embedding when there is none."""
    if not os.path.exists(path):
        return null
    f = SafetensorsFiles(path)
    try:
        context, pooled = f.get("context"), f.get("pooled")
    except KeyError:
        raise CheckpointError(f"{path}: an embedding file needs 'context' and 'pooled' tensors") from None
    if context.shape[-1] != null[0].shape[-1] or pooled.shape != null[1].shape:
        raise CheckpointError(f"{path}: context {tuple(context.shape)} / pooled {tuple(pooled.shape)} do not "
                              f"fit the model ({null[0].shape[-1]} / {tuple(null[1].shape)})")
    return context.float(), pooled.float()


def load_condition(net_cfg, emb=None, ckpt=None, beside=("prompt", "null")):
    """(pooled (1, P), context (1, L, D)): an embedding file, else the first of `beside` found next
    to the checkpoint (train.py stores the prompt, null and negative embeddings a model was trained
    with beside it), else zeros. Returns (cond, where from)."""
    zeros = (torch.zeros(1, net_cfg.context_dim), torch.zeros(net_cfg.pooled_dim))
    if emb and not os.path.exists(emb):
        raise CheckpointError(f"{emb}: no such embedding file")
    near_model = (_beside(ckpt or os.path.join(SHIPPED, "student.safetensors"), n + ".safetensors") for n in beside)
    found = [emb] if emb else [w for w in near_model if os.path.exists(w)]
    if not found:
        return (zeros[1][None], zeros[0][None]), f"zeros (no {' / '.join(beside)}.safetensors beside the model)"
    where = found[0]
    context, pooled = load_embedding(where, zeros)
    context = context if context.ndim == 2 else context.reshape(-1, net_cfg.context_dim)
    return (pooled.reshape(1, -1), context[None]), where


# --------------------------------------------------------------------------------------------
# Image files: every common file in, float RGB in [0, 1] out, and back to a file of the same kind.
# Gray stays gray, transparency is kept apart ((1, H, W) alpha), EXIF orientation is applied, every
# failure is an ImageError naming the file. Pillow does the work except where it would lose bits:
# 16-bit gray (I;16*, I) is read at full precision (its convert("RGB") clips to 255), 32-bit float
# (F) clipped to [0, 1] and written back at 16 bits; 16-bit colour PNG, which Pillow 13 reads at
# 8 bits and cannot write, goes through the optional pypng (without it: read at 8 bits, said in
# `note`), 16-bit colour TIFF through the optional tifffile (without it: refused, not read at 8 bits).


FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP",
           ".tif": "TIFF", ".tiff": "TIFF"}
EXTS = tuple(FORMATS)                                           # read and written
INPUT_EXTS = EXTS + (".gif", ".ppm", ".pgm", ".pbm", ".pnm")    # read only: results of these are PNG
MAX_PIXELS = 100_000_000           # refuse bigger files (a decompression bomb, or a mistake)
LUMA = (0.299, 0.587, 0.114)       # ITU-R 601, what Pillow's convert("L") uses


class ImageError(ValueError):
    """An image that cannot be read or written: the message names the file and what is wrong."""


@dataclass
class LoadedImage:
    rgb: torch.Tensor                  # (3, H, W) float32 in [0, 1]
    alpha: torch.Tensor | None         # (1, H, W) float32 in [0, 1], or None
    gray: bool                         # the file was grayscale: write it back gray
    bits: int                          # 8 or 16 bits per sample in the file
    note: str = ""                     # what the reader did that the user should know (animated GIF)

    @property
    def size(self):                    # (H, W)
        return tuple(self.rgb.shape[-2:])


def load_image(path) -> LoadedImage:
    """Read any INPUT_EXTS file into float RGB in [0, 1] (+ alpha, gray flag, bit depth); of an
    animated file (GIF, WebP, TIFF pages) the first frame, said in `note`."""
    path = str(path)
    if not os.path.isfile(path):
        raise ImageError(f"{path}: no such file")
    if os.path.getsize(path) == 0:
        raise ImageError(f"{path}: empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)   # MAX_PIXELS decides
            with Image.open(path) as im:
                W, H = im.size
                if W * H == 0:
                    raise ImageError(f"{path}: the image has zero size ({W}x{H})")
                if W * H > MAX_PIXELS:
                    raise ImageError(f"{path}: {W}x{H} = {W * H:,} pixels is above the limit of {MAX_PIXELS:,} "
                                     f"(a decompression bomb?); raise sample.MAX_PIXELS if the file is genuine")
                frames = getattr(im, "n_frames", 1)
                deep_png = im.format == "PNG" and _png_depth(path) == 16
                arr, gray, bits = _pixels(path, im, deep_png)                 # (H, W, C) float32 (frame 0)
                arr = _orient(arr, im.getexif().get(0x0112, 1))
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(f"{path}: too many pixels ({e})") from None
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image Pillow can read (unknown or corrupt format)") from None
    except (OSError, SyntaxError, ValueError, zlib.error) as e:  # truncated / corrupt data
        raise ImageError(f"{path}: unreadable image data ({e})") from None
    t = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)          # (C, H, W)
    color, alpha = (t[:-1], t[-1:]) if t.shape[0] in (2, 4) else (t, None)
    notes = [f"animated, {frames} frames: the first is used"] * (frames > 1)
    notes += ["16-bit colour PNG read at 8 bits (pip install pypng to keep all 16)"] * (deep_png and bits == 8)
    return LoadedImage(color.expand(3, -1, -1).contiguous(), alpha, gray, bits, "; ".join(notes))


def _pixels(path, im, deep_png=False):
    """(array (H, W, C) float32 in [0, 1] with C in 1..4 (gray, gray+alpha, RGB, RGBA), gray, bits).
    deep_png: the file is a 16-bit PNG."""
    if deep_png and im.mode not in ("I", "I;16", "I;16B") and _has_pypng():
        return _read_png16(path)                       # 16-bit colour or gray+alpha: Pillow gives 8 bits
    if im.format == "TIFF" and im.mode in ("RGB", "RGBA") and np.max(im.tag_v2.get(258, 8)) == 16:
        a = _tifffile(path).imread(path)               # tag 258: BitsPerSample, one or one per channel
        if a.dtype != np.uint16 or a.ndim != 3 or a.shape[2] not in (3, 4):
            raise ImageError(f"{path}: unsupported 16-bit TIFF layout {a.shape} {a.dtype}")
        return a.astype(np.float32) / 65535, False, 16
    im.load()                                          # decode now, so truncation raises here
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        a = np.asarray(im).astype(np.float64)
        if a.min() < 0 or a.max() > 65535:
            raise ImageError(f"{path}: 32-bit integer image (values {a.min():.0f}..{a.max():.0f}) is not supported")
        return (a / 65535).astype(np.float32)[..., None], True, 16
    if im.mode == "F":
        return np.clip(np.asarray(im, dtype=np.float32), 0, 1)[..., None], True, 16
    gray = im.mode in ("1", "L", "LA", "La")
    alpha = im.mode in ("LA", "La", "PA", "RGBA", "RGBa") or (im.mode == "P" and "transparency" in im.info)
    try:                                               # other modes (RGBX, CMYK, YCbCr, LAB, HSV) as RGB
        a = np.asarray(im.convert(("L" if gray else "RGB") + ("A" if alpha else "")), dtype=np.float32) / 255.0
    except ValueError as e:
        raise ImageError(f"{path}: unsupported image mode {im.mode!r} ({e})") from None
    return a.reshape(*a.shape[:2], -1), gray, 8


def _orient(a, orientation):
    """Apply the EXIF orientation tag (1..8) to an (H, W, C) array, as ImageOps.exif_transpose."""
    ops = {2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
           5: lambda a: a.transpose(1, 0, 2), 6: lambda a: np.rot90(a, -1),
           7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1], 8: lambda a: np.rot90(a, 1)}
    return ops[orientation](a) if orientation in ops else a


def save_image(path, rgb, alpha=None, gray=False, bits=8, protect=()):
    """Write rgb (3, H, W) in [0, 1] (+ alpha (1, H, W)) atomically: a temporary file in the same
    folder, then a rename. gray: store one channel (ITU-R 601 luma). bits=16 is kept for PNG and
    TIFF; other formats store 8 bits. JPEG cannot hold alpha (an error).
    protect: paths that must never be written over (the inputs). Returns the path."""
    path = str(path)
    fmt = check_output(path, alpha is not None, protect)
    folder = os.path.dirname(os.path.abspath(path))
    rgb = torch.as_tensor(rgb).detach().float().cpu()
    assert rgb.ndim == 3 and rgb.shape[0] == 3, f"rgb must be (3, H, W), got {tuple(rgb.shape)}"
    if gray:
        rgb = sum(w * c for w, c in zip(LUMA, rgb))[None]                           # (1, H, W)
    if alpha is not None:
        rgb = torch.cat([rgb, torch.as_tensor(alpha).detach().float().cpu().reshape(1, *rgb.shape[1:])])
    a = rgb.clamp(0, 1).permute(1, 2, 0).numpy()                                   # (H, W, C) in [0, 1]
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            if bits == 16 and fmt in ("PNG", "TIFF"):
                _write16(f, fmt, np.round(a * 65535).astype(np.uint16), path)
            else:
                u8 = np.round(a * 255).astype(np.uint8)
                im = Image.fromarray(u8[..., 0] if u8.shape[2] == 1 else u8)  # L, LA, RGB or RGBA
                if fmt == "WEBP" and im.mode in ("L", "LA"):
                    im = im.convert("RGB" if im.mode == "L" else "RGBA")    # WebP has no gray mode
                im.save(f, format=fmt, **({"quality": 95} if fmt in ("JPEG", "WEBP") else {}))
        os.replace(tmp, path)
    except PermissionError:
        raise ImageError(f"{path}: cannot write there, the folder {folder} is not writable") from None
    except OSError as e:
        raise ImageError(f"{path}: cannot write the image ({e})") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def check_output(path, has_alpha=False, protect=()):
    """The checks save_image makes before writing, for callers to make before any compute: a
    known extension, not an input, JPEG without alpha, an existing folder. Returns the format."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in FORMATS:
        raise ImageError(f"{path}: cannot write {ext or 'a file without extension'}; use one of {', '.join(EXTS)}")
    if any(_same_file(path, p) for p in protect):
        raise ImageError(f"{path}: refusing to write over an input file")
    if has_alpha and FORMATS[ext] == "JPEG":
        raise ImageError(f"{path}: JPEG cannot store the alpha channel; use .png or .webp")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ImageError(f"{path}: the folder {folder} does not exist")
    return FORMATS[ext]


def _same_file(a, b):
    try:
        return os.path.samefile(a, b)
    except OSError:      # one of them does not exist yet
        return os.path.realpath(a) == os.path.realpath(b)


# 16-bit colour files through the optional pypng (PNG) and tifffile (TIFF)


def _has_pypng():
    return importlib.util.find_spec("png") is not None


def _tifffile(path):
    try:
        import tifffile
    except ImportError:
        raise ImageError(f"{path}: 16-bit colour TIFF needs the tifffile package (pip install tifffile); "
                         f"Pillow handles 8 bits only") from None
    return tifffile


def _png_depth(path):
    """The bit depth in a PNG's IHDR chunk (byte 24 of the file)."""
    with open(path, "rb") as f:
        head = f.read(25)
    return head[24] if len(head) == 25 and head[12:16] == b"IHDR" else 8


def _read_png16(path):
    import png
    try:
        w, h, rows, info = png.Reader(filename=path).asDirect()
        a = np.vstack([np.asarray(r, np.uint16) for r in rows]).reshape(h, w, info["planes"])
    except png.Error as e:
        raise ImageError(f"{path}: unreadable PNG data ({e})") from None
    return a.astype(np.float32) / 65535, info["planes"] <= 2, 16


def _write16(f, fmt, a, path):
    """a: (H, W, C) uint16, C in 1..4: gray through Pillow (mode I;16), colour through pypng / tifffile."""
    H, W, C = a.shape
    if C == 1:
        Image.fromarray(np.ascontiguousarray(a[..., 0])).save(f, format=fmt)
    elif fmt == "TIFF":
        _tifffile(path).imwrite(f, a, photometric="rgb" if C >= 3 else "minisblack")
    elif not _has_pypng():
        raise ImageError(f"{path}: 16-bit colour PNG needs the pypng package (pip install pypng)")
    else:
        import png
        png.Writer(W, H, bitdepth=16, greyscale=C <= 2, alpha=C in (2, 4)).write(f, a.reshape(H, W * C))


# --------------------------------------------------------------------------------------------
# The program


def find_inputs(specs, suffix):
    """Files, folders (their images, not recursive) and globs -> (paths, problems). A file named
    twice (a.png and ./a.png, or through a folder and a glob) is one input."""
    paths, problems, seen = [], [], set()
    for spec in specs:
        if os.path.isdir(spec):
            found = sorted(os.path.join(spec, f) for f in os.listdir(spec) if f.lower().endswith(INPUT_EXTS))
            # earlier results in the same folder are not inputs again
            found = [f for f in found if not (suffix and os.path.splitext(f)[0].endswith(suffix))]
        elif any(ch in spec for ch in "*?["):
            found = sorted(f for f in glob.glob(spec) if os.path.isfile(f))
        else:
            found = [spec] if os.path.exists(spec) else []
        if not found:
            problems.append(f"{spec}: no such file, or no images ({', '.join(INPUT_EXTS)}) there")
        for f in found:
            if os.path.realpath(f) not in seen:
                seen.add(os.path.realpath(f))
                paths.append(f)
    return paths, problems


def output_path(src, out_dir, suffix, ext, has_alpha):
    stem, src_ext = os.path.splitext(os.path.basename(src))
    ext = src_ext.lower() if ext == "auto" else "." + ext.lstrip(".").lower()
    if ext not in EXTS:
        ext = ".png"                                   # read-only formats (GIF, PPM, ...) come out as PNG
    if has_alpha and ext in (".jpg", ".jpeg"):
        ext = ".png"                                   # JPEG has no alpha
    return os.path.join(out_dir or os.path.dirname(src), stem + suffix + ext)


def process(path, args, net, vae, cond, cond_neg, inputs, written, device):
    """One image: read, upscale (RGB; alpha bicubic apart), write. Returns the summary line."""
    img = load_image(path)
    out = output_path(path, args.output, args.suffix, args.ext, img.alpha is not None)
    if out in written:
        raise ImageError(f"{out}: already written for another input in this run; use --suffix or --ext")
    check_output(out, img.alpha is not None, inputs)                  # before minutes of compute
    if img.note:
        print(f"note: {path}: {img.note}", file=sys.stderr, flush=True)
    _reset_peak(device)
    t0 = time.perf_counter()
    progress = Progress(path, after=PROGRESS_AFTER)
    y = upscale(img.rgb[None], net, vae, cond, args.steps, teacher=args.teacher, cond_neg=cond_neg,
                cfg=args.cfg, shift=args.shift, seed=args.seed, tile=args.tile, tile_overlap=args.tile_overlap,
                color_fix=args.color_fix, progress=progress)
    alpha = None if img.alpha is None else F.interpolate(img.alpha[None], scale_factor=SCALE, mode="bicubic",
                                                          align_corners=False)[0]
    progress.phase("write")
    save_image(out, y[0], alpha=alpha, gray=img.gray, bits=img.bits, protect=inputs)
    progress.phase(None)
    written.add(out)
    H, W = img.size
    secs = time.perf_counter() - t0
    where = ", ".join(f"{k} {v:.1f}" for k, v in progress.seconds.items()) if secs >= progress.after else ""
    return (f"{path} {W}x{H} -> {out} {SCALE * W}x{SCALE * H}, {args.steps} step{'s' * (args.steps > 1)}, "
            f"{secs:.2f} s{f' ({where})' if where else ''}, peak {peak_memory_mb(device):.0f} MB")


def _reset_peak(device):
    if device.type == "cuda":
        return torch.cuda.reset_peak_memory_stats(device)
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")                                   # Linux: VmHWM restarts from the current RSS


def peak_memory_mb(device):
    """The process's peak memory since _reset_peak: CUDA's allocator peak, else the resident set's
    (Linux's VmHWM); NaN where the system does not say (no /proc: macOS, Windows)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM"))
    except (OSError, StopIteration):
        return math.nan


def _shipped_sampling():
    """The sampler settings the shipped student records (for --help), or {} without it."""
    try:
        return SafetensorsFiles(os.path.join(SHIPPED, "student.safetensors")).config("mfsr_sampling")
    except CheckpointError:      # a missing or unreadable file: --help still works
        return {}


def parse_args(argv=None):
    rec = _shipped_sampling()
    shipped = lambda k: f"; the shipped model records {rec[k]:g}" if k in rec else ""   # noqa: E731
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("inputs", nargs="+", help="image files, folders, globs")
    p.add_argument("-o", "--output", default=None, help="output folder (default: beside each input)")
    p.add_argument("--suffix", default="_mfsr", help="added to the file name (default _mfsr)")
    p.add_argument("--ext", default="auto", help="png, jpg, webp, bmp, tif; auto = the input's "
                   "(PNG for the formats only read: gif, ppm, pgm, pbm, pnm)")
    p.add_argument("--ckpt", default=None, help="student.safetensors from train.py (default: the shipped model)")
    p.add_argument("--teacher", action="store_true", help="--ckpt is a one-time teacher: Euler with CFG")
    p.add_argument("--vae", default=None, help="VAE file/folder or SD3.5 checkpoint (default: beside/inside --ckpt)")
    p.add_argument("--emb", default=None, help="prompt embedding file (context, pooled) from `python tools/text.py "
                   "--prompt TEXT --out FILE`; default: the prompt.safetensors / null.safetensors beside the model")
    p.add_argument("--neg-emb", default=None, help="negative prompt embedding for the teacher's CFG")
    p.add_argument("--steps", type=int, default=None, help="student 1..8 (default 1); teacher default 40")
    p.add_argument("--cfg-scale", "--cfg", dest="cfg", type=float, default=None,
                   help="the teacher's CFG scale, v_neg + scale (v_c - v_neg) (train.py's Eq. 11 --cfg-w is scale - 1; "
                   f"default: the one recorded in the checkpoint, else DiT4SR's 8{shipped('cfg')})")
    p.add_argument("--shift", type=float, default=None, help="the teacher's sigma shift on SD3's grid (default: the "
                   "one its training used, recorded in the checkpoint, else SD3.5's 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tile", type=int, default=None, help="latent tile side (default: the training size recorded "
                   f"in the checkpoint, else DiT4SR's 64{shipped('tile')})")
    p.add_argument("--tile-overlap", type=int, default=None, help="latent tile overlap (default: recorded, else 24"
                   f"{shipped('tile_overlap')}; with another --tile, the recorded overlap scaled with it)")
    p.add_argument("--color-fix", default="adain", choices=sorted(COLOR_FIXES))
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, mps")
    a = p.parse_args(argv)
    if a.steps is None:
        a.steps = 40 if a.teacher else 1
    if not a.teacher and not 1 <= a.steps <= 8:
        p.error(f"--steps {a.steps}: the student takes 1..8 steps")
    if a.teacher and a.steps < 1:
        p.error(f"--steps {a.steps}: at least 1")
    if a.shift is not None and not a.shift > 0:
        p.error(f"--shift {a.shift}: must be > 0 (1 is none)")
    if a.ext != "auto" and "." + a.ext.lstrip(".").lower() not in EXTS:
        p.error(f"--ext {a.ext}: choose from auto, {', '.join(e[1:] for e in EXTS)}")
    return a


def pick_device(name):
    """torch.device for --device; ValueError naming it and what this torch has, if unusable."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    have = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    have += ["mps"] if torch.backends.mps.is_available() else []
    try:
        d = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {name}: not a device name; this machine has {', '.join(have)}") from None
    if d.type in have or f"{d.type}:{d.index or 0}" in have:          # cpu, mps, or a GPU this machine has
        return d
    raise ValueError(f"--device {name}: not available to this torch {torch.__version__}; it has {', '.join(have)}")


def apply_sampling_settings(args, net):
    """Unset flags take the checkpoint's own settings. A --tile without --tile-overlap takes the
    recorded overlap scaled with it (in whole patches, below the tile). Returns a note or ""."""
    rec = sampling_settings(net)
    scale_overlap = args.tile is not None and args.tile_overlap is None and args.tile != rec["tile"]
    for key, value in rec.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if not scale_overlap:
        return ""
    p = net.cfg.patch
    args.tile_overlap = max(0, min(p * round(rec["tile_overlap"] * args.tile / rec["tile"] / p), args.tile - p))
    return (f"--tile {args.tile}: tile overlap {args.tile_overlap} (the model's {rec['tile_overlap']} for tile "
            f"{rec['tile']}, scaled; --tile-overlap sets it)")


def main(argv=None):
    args = parse_args(argv)
    written = set()
    try:
        return run(args, written)
    except KeyboardInterrupt:   # outputs are written atomically: each is whole or absent
        print(f"\ninterrupted: {len(written)} output(s) written, none half-written", file=sys.stderr)
        return 130


def run(args, written):
    """The program after parsing: inputs, models, then one image at a time into `written`."""
    try:
        device = pick_device(args.device)
        paths, problems = find_inputs(args.inputs, args.suffix)
        for msg in problems:
            print(f"error: {msg}", file=sys.stderr)
        if not paths:
            return 1
        net, vae = load_models(args.ckpt, args.vae, args.teacher, device, DTYPES[args.dtype])
        cond, where = load_condition(net.cfg, args.emb, args.ckpt)
        cond_neg = load_condition(net.cfg, args.neg_emb, args.ckpt, ("neg", "null"))[0] if args.teacher else None
        note = apply_sampling_settings(args, net)
        if note:
            print(f"note: {note}", file=sys.stderr)
        TiledNet(net, args.tile, args.tile_overlap)                      # check the tiles once
    except ValueError as e:                            # a CheckpointError, or a setting that cannot work
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.output:
        try:
            os.makedirs(args.output, exist_ok=True)
        except OSError as e:
            print(f"error: cannot create the output folder {args.output}: {e.strerror or e}", file=sys.stderr)
            return 2
    kind = f"teacher, CFG scale {args.cfg:g}, shift {args.shift:g}" if args.teacher else "student"
    calls = args.steps * (2 if args.teacher else 1)
    print(f"model: {args.ckpt or SHIPPED} ({kind}, {calls} network calls per tile), prompt: {where}, "
          f"{device}, {args.dtype}")
    inputs, failed = [os.path.abspath(q) for q in paths], len(problems)
    for path in paths:
        try:
            print(process(path, args, net, vae, cond, cond_neg, inputs, written, device), flush=True)
        except (ValueError, OSError, RuntimeError) as e:      # ImageError and CheckpointError are ValueErrors
            failed += 1
            print(f"error: {path}: {e}" if path not in str(e) else f"error: {e}", file=sys.stderr, flush=True)
    if failed:
        print(f"{failed} of {len(paths) + len(problems)} inputs failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
