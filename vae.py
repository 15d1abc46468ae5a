"""The SD3 / SD3.5 VAE (16 latent channels, x8), loaded from safetensors, tiled for large images.

    from vae import load_vae
    vae = load_vae("sd3.5_medium.safetensors")   # or a diffusers vae/ folder, or a bare VAE file
    z = vae.encode(x)                             # x (B, 3, H, W) in [-1, 1] -> (B, 16, H/8, W/8)
    y = vae.decode(z)                             # model-space latents -> images in [-1, 1]

Follows Stability-AI's single-file reference (sd3_impls.VAEEncoder / VAEDecoder) for the layers
and the parameter names, so `state_dict()` keys equal the released `first_stage_model.*` keys
without the prefix. Facts and the original <-> diffusers key map: ../shared/reference/ARCHITECTURE.md
§4, cited as "ARCH §4.x". Latents leave `encode` in the transformer's space, (z - shift) * scale
(ARCH §1); `decode` undoes it.

Tiling. Above TILE_AUTO_ELEMENTS, `encode` and `decode` run the full-resolution levels on
overlapping tiles blended with linear ramps, so memory is bounded by the tile size; the mid block,
whose attention sees every latent position, runs on the whole latent. With per-tile GroupNorm
statistics every tile would be normalised differently, so by default (tile_norm="tiles") a first
pass over all tiles sums each GroupNorm's statistics over the pixels each tile owns and a second
pass normalises every tile with them: twice the compute, no seams (figures in docs/modules.md).

Inside, activations are channels-last (faster CPU convolutions); outputs are NCHW. GroupNorm
normalises in fp32 (its sums of squares overflow fp16); `set_dtype(vae, torch.float16)` keeps the
decoder's up levels and head in fp32, the parts of SD VAEs that overflow fp16 (diffusers' `upcast_vae`).
"""
import json
import math
import os
import re
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import CheckpointError, SafetensorsFiles, atomic_save, check_keys

# --------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class VAEConfig:
    channels: tuple = (128, 256, 512, 512)   # per level; len - 1 downsamplings
    enc_blocks: int = 2                      # ResnetBlocks per encoder level
    dec_blocks: int = 3                      # ResnetBlocks per decoder level
    latent_channels: int = 16
    image_channels: int = 3
    groups: int = 32                         # GroupNorm groups (checkpoints cannot tell them)
    mid_attn: bool = True                    # the mid blocks' self-attention (ARCH §4); tiny: none
    patch: int = 1                           # pixels per side folded into channels around the convs
    scale: float = 1.5305                    # z_model = (z_vae - shift) * scale (ARCH §1)
    shift: float = 0.0609

    def __post_init__(self):
        object.__setattr__(self, "channels", tuple(self.channels))
        bad = [c for c in self.channels if c % self.groups]
        if bad:
            raise ValueError(f"GroupNorm groups {self.groups} do not divide channels {bad}")

    @property
    def factor(self):
        return self.patch * 2 ** (len(self.channels) - 1)


CONFIGS = {
    "sd3": VAEConfig(),
    # The shipped miniature's: x4, 16 latent channels so it feeds the same transformer. It folds 4 x 4
    # pixel patches into channels, so every convolution runs at latent resolution, and a linear code of
    # the patches (`linear`, started as PCA by experiments/tiny_vae.py) carries most of the image
    # (docs/modules.md). 8 GroupNorm groups: 32 normalised every channel alone and trained slower. No
    # mid attention: its cost grows with the square of the image.
    "tiny": VAEConfig(channels=(64,), enc_blocks=1, dec_blocks=2, groups=8, mid_attn=False, patch=4),
    # the SD3 structure at x4 (the previous tiny VAE): small, and diffusers can read it (tests, bench)
    "x4": VAEConfig(channels=(32, 64, 64), enc_blocks=1, dec_blocks=2, groups=8, mid_attn=False),
}

# --------------------------------------------------------------------------------------------
# Layers (ARCH §4.2)


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm, computed in fp32, that can record its statistics or use shared ones.

    Tiling sets `stats` to (mean, var), each (B, G), estimated over the whole image, so every
    tile is normalised alike; `sums` collects (count, sum, sum of squares) while recording.
    """

    def __init__(self, groups, channels):
        super().__init__(groups, channels, eps=1e-6)
        self.stats, self.sums, self.mask = None, None, None

    def forward(self, x):
        B, C = x.shape[:2]
        w, b = self.weight.float(), self.bias.float()
        if self.stats is None and self.sums is None:
            return F.group_norm(x.float(), self.num_groups, w, b, self.eps).to(x.dtype)
        H, W = x.shape[-2:]
        G = self.num_groups
        g = x.float().permute(0, 2, 3, 1).reshape(B, H * W, G, C // G)  # (B, H W, G, C/G); a view when channels-last
        if self.sums is not None:   # add this tile's sums over the pixels it owns (`mask`, at input resolution)
            m = F.interpolate(self.mask[None, None], size=(H, W), mode="nearest").reshape(1, H * W, 1, 1)
            n, s1, s2 = self.sums
            self.sums = [n + m.sum().double() * g.shape[3], s1 + (g * m).sum((1, 3)).double(),
                         s2 + (g * g * m).sum((1, 3)).double()]                        # (B, G)
        if self.stats is not None:
            mean, var = self.stats
        else:
            var, mean = torch.var_mean(g, dim=(1, 3), unbiased=False)   # (B, G)
        y = (g - mean[:, None, :, None]) * torch.rsqrt(var[:, None, :, None] + self.eps)
        y = y.reshape(B, H, W, C).permute(0, 3, 1, 2)                   # (B, C, H, W), channels-last
        return (y * w.view(1, C, 1, 1) + b.view(1, C, 1, 1)).to(x.dtype)


def _silu(x):
    """SiLU, in place when no gradient is recorded: it always follows a GroupNorm, whose output is fresh."""
    return F.silu(x, inplace=not torch.is_grad_enabled())


class ResnetBlock(nn.Module):
    def __init__(self, cin, cout, groups):
        super().__init__()
        self.norm1, self.conv1 = GroupNorm(groups, cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = GroupNorm(groups, cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.conv1(_silu(self.norm1(x)))
        h = self.conv2(_silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


ATTN_CHUNK_ELEMENTS = 2 ** 25   # scores per attention chunk (128 MiB in fp32)


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, 1x1 convs, scale 1/sqrt(C)."""

    def __init__(self, channels, groups):
        super().__init__()
        self.norm = GroupNorm(groups, channels)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        # contiguous: with a strided last dim CPU SDPA falls back to the math kernel, which builds
        # the whole score block
        q, k, v = (f(h).flatten(2).transpose(1, 2).contiguous()[:, None]
                   for f in (self.q, self.k, self.v))                                         # (B, 1, HW, C)
        # queries in chunks, so the (chunk, HW) score block stays small at 256^2 latents (a 2048^2
        # image: 65536 positions); each row's softmax is whole, so the result is exact
        step = max(1, ATTN_CHUNK_ELEMENTS // (B * H * W))
        o = torch.cat([F.scaled_dot_product_attention(q[:, :, i:i + step], k, v)
                       for i in range(0, H * W, step)], dim=2)                                # (B, 1, HW, C)
        return x + self.proj_out(o[:, 0].transpose(1, 2).reshape(B, C, H, W))


class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))   # pad right/bottom only, as trained: H -> H / 2


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Mid(nn.Module):
    def __init__(self, channels, groups, attn=True):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups) if attn else nn.Identity()
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(_to_dtype_of(self, x))))


class Level(nn.Module):
    """One resolution: `block.{j}` ResnetBlocks, then `downsample` or `upsample` (or neither)."""

    def __init__(self, cin, cout, n_blocks, groups, resample=None):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(cin if j == 0 else cout, cout, groups) for j in range(n_blocks))
        if resample == "down":
            self.downsample = Downsample(cout)
        elif resample == "up":
            self.upsample = Upsample(cout)

    def forward(self, x):
        x = _to_dtype_of(self, x)   # under fp16 some levels run in fp32 (set_dtype)
        for b in self.block:
            x = b(x)
        for name in ("downsample", "upsample"):
            if hasattr(self, name):
                x = getattr(self, name)(x)
        return x


def _to_dtype_of(module, x):
    """x in the module's dtype and channels-last, which the convs and GroupNorms after it keep."""
    return x.to(next(module.parameters()).dtype, memory_format=torch.channels_last)


class Encoder(nn.Module):
    """(B, 3, H, W) -> (B, 2 * latent, H / f, W / f): the moments [mean ; logvar]."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, n = cfg.channels, len(cfg.channels)
        self.patch = cfg.patch
        self.conv_in = nn.Conv2d(cfg.image_channels * cfg.patch ** 2, ch[0], 3, padding=1)
        self.down = nn.ModuleList(
            Level(ch[max(l - 1, 0)], ch[l], cfg.enc_blocks, cfg.groups, "down" if l < n - 1 else None)
            for l in range(n))
        self.mid = Mid(ch[-1], cfg.groups, cfg.mid_attn)
        self.norm_out = GroupNorm(cfg.groups, ch[-1])
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)
        if cfg.patch > 1:   # the linear code of the patches, added to the convolutions' output
            self.linear = nn.Conv2d(cfg.image_channels * cfg.patch ** 2, 2 * cfg.latent_channels, 1)

    def forward(self, x):
        return self.tail(self.body(x), x)

    def body(self, x):
        """The full-resolution part, (B, 3, H, W) -> (B, C, H / f, W / f); tiled for big images."""
        h = self.conv_in(_to_dtype_of(self.conv_in, F.pixel_unshuffle(x, self.patch)))
        for level in self.down:
            h = level(h)
        return h

    def tail(self, h, x):
        """Mid (global attention), output head and the linear code of the image x; never tiled."""
        h = self.mid(h)
        m = self.conv_out(_silu(self.norm_out(_to_dtype_of(self.conv_out, h))))
        if self.patch > 1:
            m = m + self.linear(_to_dtype_of(self.linear, F.pixel_unshuffle(x, self.patch)))
        return m


class Decoder(nn.Module):
    """(B, latent, h, w) -> (B, 3, h * f, w * f). Levels run from the deepest (l = n - 1) up."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, n = cfg.channels, len(cfg.channels)
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[-1], 3, padding=1)
        self.mid = Mid(ch[-1], cfg.groups, cfg.mid_attn)
        self.up = nn.ModuleList(
            Level(ch[min(l + 1, n - 1)], ch[l], cfg.dec_blocks, cfg.groups, "up" if l > 0 else None)
            for l in range(n))
        self.norm_out = GroupNorm(cfg.groups, ch[0])
        self.patch = cfg.patch
        self.conv_out = nn.Conv2d(ch[0], cfg.image_channels * cfg.patch ** 2, 3, padding=1)
        if cfg.patch > 1:
            self.linear = nn.Conv2d(cfg.latent_channels, cfg.image_channels * cfg.patch ** 2, 1)

    def forward(self, z):
        return self.body(self.head(z)) + self.linear_part(z)

    def linear_part(self, z):
        """The linear decoding of the patches (patch > 1; else 0), added to the convolutions' image."""
        if self.patch == 1:
            return 0
        return F.pixel_shuffle(self.linear(_to_dtype_of(self.linear, z)), self.patch)

    def head(self, z):
        """conv_in and mid (global attention) at latent resolution; never tiled."""
        return self.mid(self.conv_in(_to_dtype_of(self.conv_in, z)))

    def body(self, h):
        """The up levels and the output head, (B, C, h, w) -> (B, 3, h f, w f); tiled for big images."""
        for level in reversed(self.up):
            h = level(h)
        return F.pixel_shuffle(self.conv_out(_silu(self.norm_out(_to_dtype_of(self.conv_out, h)))), self.patch)


# --------------------------------------------------------------------------------------------
# Tiling: overlapping tiles, linear blending ramps, GroupNorm statistics shared across tiles

TILE_AUTO_ELEMENTS = 1024 * 1024 * 128  # tiled by default above this many full-resolution activations
ENCODE_TILE, ENCODE_OVERLAP = 512, 128   # pixels
DECODE_TILE, DECODE_OVERLAP = 64, 16     # latents (x8: 512 and 128 pixels)
TILE_NORM = "tiles"                     # "tiles" | "down" | "local": see the module docstring


def tile_starts(n, tile, overlap):
    """Offsets of tiles of side `tile` along an axis of length n: stride tile - overlap, the last
    one flush with the end (DiT4SR's layout; sample.py's latent tiles use it too)."""
    if n <= tile:
        return [0]
    return list(range(0, n - tile, tile - overlap)) + [n - tile]


def _ramp(n, start, size, overlap):
    """1-D blending weight of a tile: rises over `overlap` where another tile precedes it and
    falls where one follows; never zero, so the weights of all tiles sum to > 0 everywhere."""
    w = torch.ones(size)
    if overlap > 0:
        r = (torch.arange(overlap) + 0.5) / overlap
        if start > 0:
            w[:overlap] = torch.minimum(w[:overlap], r)
        if start + size < n:
            w[-overlap:] = torch.minimum(w[-overlap:], r.flip(0))
    return w


def _owned(n, starts, size):
    """Per tile along one axis, the interval [a, b) of pixels it owns: overlaps split in the middle,
    so every pixel is counted once, as far from tile edges as possible."""
    cuts = [0] + [(s + p + size) // 2 for p, s in zip(starts, starts[1:])] + [n]
    return list(zip(cuts, cuts[1:]))


@contextmanager
def _shared_norm_stats(net, norms, mode, x, tile, overlap):
    """Inside the block the GroupNorms `norms` of `net` use statistics estimated over all of x.

    "tiles": one pass over every tile (normalised with its own statistics), each GroupNorm summing
    over the pixels the tile owns (a second such pass, normalised with the first's estimate, made
    the decoder worse). "down": one pass on x shrunk to a single tile. "local": no sharing.
    """
    if mode not in ("tiles", "down", "local"):
        raise ValueError(f"tile_norm must be 'tiles', 'down' or 'local', got {mode!r}")
    H, W = x.shape[-2:]
    try:
        if mode != "local":
            for m in norms:
                m.sums = [0, 0.0, 0.0]
            if mode == "tiles":
                rows, cols = tile_starts(H, tile, overlap), tile_starts(W, tile, overlap)
                for y0, (ya, yb) in zip(rows, _owned(H, rows, tile)):
                    for x0, (xa, xb) in zip(cols, _owned(W, cols, tile)):
                        crop = x[..., y0:y0 + tile, x0:x0 + tile]
                        own = torch.zeros(crop.shape[-2:], device=x.device)
                        own[ya - y0:yb - y0, xa - x0:xb - x0] = 1
                        for m in norms:
                            m.mask = own
                        net(crop)
            else:
                k = max(H, W) / tile
                small = F.interpolate(x, size=(math.ceil(H / k), math.ceil(W / k)), mode="area")
                for m in norms:
                    m.mask = torch.ones(small.shape[-2:], device=x.device)
                net(small)
            for m in norms:
                n, s1, s2 = m.sums
                mean = s1 / n
                m.stats, m.sums, m.mask = (mean.float(), (s2 / n - mean * mean).clamp_min(0).float()), None, None
        yield
    finally:
        for m in norms:
            m.stats, m.sums, m.mask = None, None, None


@torch.no_grad()   # tiling is for inference: no graph through the tiles
def run_tiled(net, norms, x, tile, overlap, tile_norm=TILE_NORM):
    """net(x) computed on overlapping square tiles of side `tile` (in x's pixels) and blended.

    net maps (B, C, H, W) to (B, C', r H, r W) for a fixed ratio r; tile offsets must map to
    whole output pixels (the callers keep them multiples of the VAE factor). `norms`: the
    GroupNorms inside net, whose statistics tile_norm shares across tiles. Output in fp32.
    """
    B, _, H, W = x.shape
    if not 0 <= overlap < tile:
        raise ValueError(f"need 0 <= overlap < tile, got tile {tile}, overlap {overlap}")
    th, tw = min(tile, H), min(tile, W)
    tiles = [(..., slice(y0, y0 + th), slice(x0, x0 + tw))
             for y0 in tile_starts(H, tile, overlap) for x0 in tile_starts(W, tile, overlap)]
    if len(tiles) == 1:   # fits in one tile: the untiled computation, no statistics pass
        return net(x).float()
    out = weight = None
    with _shared_norm_stats(net, norms, tile_norm, x, tile, overlap):
        for crop in tiles:
            y = net(x[crop]).float()                                     # (B, C', r th, r tw)
            r = y.shape[-1] / tw
            if out is None:
                out = y.new_zeros(B, y.shape[1], round(H * r), round(W * r))
                weight = y.new_zeros(round(H * r), round(W * r))
            y0, x0, o = round(crop[1].start * r), round(crop[2].start * r), round(overlap * r)
            w = _ramp(out.shape[-2], y0, y.shape[-2], o)[:, None] * _ramp(out.shape[-1], x0, y.shape[-1], o)
            w = w.to(y.device)
            region = (..., slice(y0, y0 + y.shape[-2]), slice(x0, x0 + y.shape[-1]))
            out[region] += y * w                                         # (r th, r tw) weights
            weight[region] += w
    return out / weight


def _norms(*modules):
    return [m for mod in modules for m in mod.modules() if isinstance(m, GroupNorm)]


def _tile_plan(tile, overlap, default_tile, default_overlap, elements, multiple):
    """(tile, overlap) to use, or None for one untiled pass. tile=None: automatic (by the
    elements of one full-resolution activation); 0: never."""
    if tile == 0 or (tile is None and elements <= TILE_AUTO_ELEMENTS):
        return None
    tile = default_tile if tile is None else tile
    if overlap is None:
        overlap = default_overlap if tile == default_tile else tile // 4 // multiple * multiple
    if tile % multiple or overlap % multiple:
        raise ValueError(f"tile {tile} and overlap {overlap} must be multiples of {multiple}")
    return tile, overlap


# --------------------------------------------------------------------------------------------
# The VAE


class VAE(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def _first_level_elements(self, H, W):
        """Elements of one activation of the first level for an H x W image (what tiling is decided by)."""
        p = self.cfg.patch
        return (H // p) * (W // p) * self.cfg.channels[0]

    def moments(self, x, tile=None, overlap=None, tile_norm=None):
        """(B, 3, H, W) in [-1, 1] -> (mean, logvar) in fp32, each (B, latent, H / f, W / f)."""
        f = self.cfg.factor
        B, C, H, W = x.shape
        assert C == self.cfg.image_channels and H % f == 0 and W % f == 0, \
            f"expected (B, {self.cfg.image_channels}, H, W) with H, W multiples of {f}, got {tuple(x.shape)}"
        plan = _tile_plan(tile, overlap, ENCODE_TILE, ENCODE_OVERLAP, self._first_level_elements(H, W), f)
        enc = self.encoder
        with torch.set_grad_enabled(torch.is_grad_enabled() and not plan):   # tiles are for inference: no graph
            # the full-resolution levels, in tiles if planned; mid attention sees all of h
            h = run_tiled(enc.body, _norms(enc.down), x, *plan, tile_norm or TILE_NORM) if plan else enc.body(x)
            m = enc.tail(h, x)                                           # (B, 2 latent, H/f, W/f)
        return m.float().contiguous().chunk(2, dim=1)   # channels-last stays inside vae.py

    def encode(self, x, generator=None, sample=False, tile=None, overlap=None, tile_norm=None):
        """Images in [-1, 1] -> model-space latents (z - shift) * scale, in x's dtype.

        z is the posterior mean, or with sample=True mean + std * eps, eps drawn from `generator`
        (logvar clamped to [-30, 20], ARCH §4.2). tile/overlap in pixels, multiples of the factor.
        """
        mean, logvar = self.moments(x, tile, overlap, tile_norm)
        z = mean
        if sample:
            eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
            z = mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * eps
        return ((z - self.cfg.shift) * self.cfg.scale).to(x.dtype)     # (B, latent, H/f, W/f)

    def decode(self, z, tile=None, overlap=None, tile_norm=None, clamp=True):
        """Model-space latents (B, latent, h, w) -> images (B, 3, h f, w f) in [-1, 1], z's dtype.

        tile/overlap in latents. clamp=False returns the raw decoder output.
        """
        f = self.cfg.factor
        B, C, h, w = z.shape
        assert C == self.cfg.latent_channels, f"expected (B, {self.cfg.latent_channels}, h, w), got {tuple(z.shape)}"
        z_vae = z.float() / self.cfg.scale + self.cfg.shift
        plan = _tile_plan(tile, overlap, DECODE_TILE, DECODE_OVERLAP, self._first_level_elements(h * f, w * f), 1)
        dec = self.decoder
        with torch.set_grad_enabled(torch.is_grad_enabled() and not plan):   # tiles are for inference: no graph
            feat = dec.head(z_vae)                                       # (B, C, h, w): mid attention sees all of it
            if plan:   # the up levels and the output head in tiles
                x = run_tiled(dec.body, _norms(dec.up, dec.norm_out), feat, *plan, tile_norm or TILE_NORM)
            else:
                x = dec.body(feat)
            x = (x + dec.linear_part(z_vae)).float()                     # (B, 3, h f, w f)
        x = x.contiguous()                                               # channels-last stays inside vae.py
        return (x.clamp(-1, 1) if clamp else x).to(z.dtype)


# parts of the SD VAE decoder that overflow fp16 and run in fp32 instead (diffusers' upcast_vae)
FP16_UPCAST = ("decoder.up", "decoder.norm_out", "decoder.conv_out")


def set_dtype(vae: VAE, dtype, upcast=FP16_UPCAST):
    """Cast the VAE to `dtype`; for fp16 the modules named in `upcast` stay fp32."""
    vae.to(dtype)
    if dtype == torch.float16:
        for name in upcast:
            vae.get_submodule(name).float()
    return vae


# --------------------------------------------------------------------------------------------
# Key names: diffusers AutoencoderKL -> original (Stability single file) (ARCH §4.3)

_ATTN_NAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
               "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}   # the last four: older files
_LEVEL_PARTS = {"resnets": "block", "downsamplers.0": "downsample", "upsamplers.0": "upsample"}


def from_diffusers_name(key, levels):
    """diffusers key -> original key; diffusers numbers the decoder levels from the deepest."""
    attn = "|".join(map(re.escape, _ATTN_NAMES))
    key = re.sub(rf"\.mid_block\.attentions\.0\.({attn})\.", lambda m: f".mid.attn_1.{_ATTN_NAMES[m[1]]}.", key)
    key = re.sub(r"\.mid_block\.resnets\.([01])\.", lambda m: f".mid.block_{int(m[1]) + 1}.", key)
    key = re.sub(r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out.", key)
    key = re.sub(r"^encoder\.down_blocks\.(\d+)\.(resnets|downsamplers\.0)\.",
                 lambda m: f"encoder.down.{m[1]}.{_LEVEL_PARTS[m[2]]}.", key)
    key = re.sub(r"^decoder\.up_blocks\.(\d+)\.(resnets|upsamplers\.0)\.",
                 lambda m: f"decoder.up.{levels - 1 - int(m[1])}.{_LEVEL_PARTS[m[2]]}.", key)
    return key.replace(".conv_shortcut.", ".nin_shortcut.")


def _is_attn_matrix(key):   # 1x1 conv weights in the original layout, (C, C) linears in diffusers
    return re.search(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$", key) is not None


# --------------------------------------------------------------------------------------------
# Loading and saving


class _VAESource:
    """The VAE tensors of one checkpoint under their original-layout names, read lazily
    (memory-mapped by model.SafetensorsFiles) so a full-size VAE is never held twice."""

    def __init__(self, path):
        self.path = path
        self.files = SafetensorsFiles(path, subfolder="vae", prefix="first_stage_model.")
        names = self.files.keys()
        quant = [k for k in names if k.split(".")[0] in ("quant_conv", "post_quant_conv")]
        if quant:
            raise CheckpointError(f"{path}: has {', '.join(quant[:4])}: a VAE with quant convs (SD1/SDXL "
                                  f"style, 4 latent channels), not the SD3 VAE (ARCH §4.3)")
        if not any(k.startswith(("encoder.", "decoder.")) for k in names):
            every = self.files.all_keys
            hint = " (it looks like a transformer checkpoint)" if any(
                re.search(r"joint_blocks\.|transformer_blocks\.", k) for k in every) else ""
            raise CheckpointError(f"{path}: no VAE keys (encoder.* / decoder.*, optionally under first_stage_model.)"
                                  f"{hint}; the file starts with: {', '.join(every[:3]) or 'nothing'}")
        self.layout = "diffusers" if any(".down_blocks." in k or ".up_blocks." in k for k in names) else "original"
        self.levels = len({m[1] for k in names if (m := re.match(r"encoder\.down(?:_blocks)?\.(\d+)\.", k))})
        rename = (lambda k: from_diffusers_name(k, self.levels)) if self.layout == "diffusers" else (lambda k: k)
        self.where = {rename(k): k for k in names}      # original name -> name in the file

    def shape(self, key):
        s = self.files.shape(self.where[key])
        return s + (1, 1) if len(s) == 2 and _is_attn_matrix(key) else s

    def get(self, key):
        return self.files.get(self.where[key]).view(self.shape(key))

    def told(self):
        """Settings the shapes cannot give: from this project's metadata or a diffusers config.json."""
        told = {k: v for k, v in self.files.config("vae_config").items() if k in ("groups", "scale", "shift", "patch")}
        folder = self.path if os.path.isdir(self.path) else os.path.dirname(self.path)
        folder = os.path.join(folder, "vae") if os.path.isdir(os.path.join(folder, "vae")) else folder
        if self.layout == "diffusers" and os.path.exists(os.path.join(folder, "config.json")):
            with open(os.path.join(folder, "config.json")) as f:
                d = json.load(f)
            told.update({k: d[n] for k, n in (("groups", "norm_num_groups"), ("scale", "scaling_factor"),
                                              ("shift", "shift_factor")) if d.get(n) is not None})
        return told


def checkpoint_config(path, groups=None):
    """(config, source) of a VAE file without reading a weight: levels, channels and block counts
    from shapes; groups/scale/shift from what the file tells (a bare checkpoint cannot: then the
    SD3 values, or `groups` as in load_vae)."""
    src = _VAESource(path)
    keys = list(src.where)
    told = src.told() | ({"groups": groups} if groups else {})
    patch = told.get("patch", 1)   # a bare file with the linear code: RGB patches assumed
    if "patch" not in told and "encoder.linear.weight" in keys:
        patch = math.isqrt(src.shape("encoder.linear.weight")[1] // 3)
    count = lambda pat: len({m[1] for k in keys if (m := re.match(pat, k))})
    try:
        shape = dict(channels=tuple(src.shape(f"encoder.down.{l}.block.0.conv1.weight")[0] for l in range(src.levels)),
                     enc_blocks=count(r"encoder\.down\.0\.block\.(\d+)\."),
                     dec_blocks=count(r"decoder\.up\.0\.block\.(\d+)\."),
                     latent_channels=src.shape("decoder.conv_in.weight")[1],
                     image_channels=src.shape("encoder.conv_in.weight")[1] // patch ** 2,
                     mid_attn=any(k.startswith("encoder.mid.attn_1.") for k in keys), patch=patch)
    except KeyError as e:
        raise CheckpointError(f"{path}: missing {e} needed to read the VAE size") from None
    try:
        return VAEConfig(**{**shape, **told}), src
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}; pass groups= to load_vae") from None


def load_vae(path, *, dtype=torch.float32, device="cpu", groups=None) -> VAE:
    """Load the SD3 VAE from an SD3.5 single file (`first_stage_model.*`; the rest ignored), a
    diffusers pipeline folder, its `vae/` folder or diffusion_pytorch_model.safetensors, a
    standalone VAE file with bare keys, or a file written by `save_vae`. The config is read from
    the shapes; every key and shape is checked, under the original-layout names the tensors load by.
    Tensors are cast to `dtype` (files may mix fp16 and fp32). groups: GroupNorm groups when the
    file cannot tell (default 32, the SD3 value)."""
    cfg, src = checkpoint_config(path, groups)
    with torch.device("meta"):
        vae = VAE(cfg)
    expected = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    renamed = "" if src.layout == "original" else ", its keys renamed to the original layout (ARCH §4.3)"
    found = {k: src.shape(k) for k in src.where}
    check_keys(path, expected, found, f"the {src.layout}-layout VAE read from it ({cfg}){renamed}")
    vae.load_state_dict({k: src.get(k).to(dtype) for k in expected}, assign=True)
    return vae.to(device).eval()


def save_vae(vae: VAE, path):
    """Write the VAE as a standalone file with bare Stability names (`encoder.*`, `decoder.*`) and
    its config in the metadata, atomically."""
    sd = {k: v.detach().contiguous() for k, v in vae.state_dict().items()}
    atomic_save(sd, path, {"format": "mfsr-vae", "layout": "original", "vae_config": json.dumps(asdict(vae.cfg))})
