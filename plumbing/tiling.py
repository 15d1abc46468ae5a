"""Tiles: the VAE's (run_tiled, with GroupNorm statistics shared across tiles) and the sampler's
latent tiles (TiledNet). Plumbing: they bound memory and keep latents inside the transformer's
position grid; the method does not need them (an image that fits one tile runs untiled, bit-identical).
"""
import math
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from plumbing.cli import proc_kib

# --------------------------------------------------------------------------------------------
# The VAE's tiles: overlapping, blended with linear ramps, GroupNorm statistics shared (vae.py's docstring)

TILE_AUTO_ELEMENTS = 1024 * 1024 * 128  # tiled by default above this many full-resolution activations
ENCODE_TILE, ENCODE_OVERLAP = 512, 128   # pixels
DECODE_TILE, DECODE_OVERLAP = 64, 16     # latents (x8: 512 and 128 pixels)
TILE_NORM = "tiles"                     # "tiles" | "down" | "local": see _shared_norm_stats


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm in fp32 that can record its statistics or use shared ones: tiling sets `stats` to
    (mean, var), each (B, G), estimated over the whole image, so every tile is normalised alike;
    `sums` collects (count, sum, sum of squares) while recording."""

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


def tile_starts(n, tile, overlap):
    """Offsets of tiles of side `tile` along an axis of length n: stride tile - overlap, the last
    one flush with the end (DiT4SR's layout, used by both kinds of tiles)."""
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



def tile_plan(tile, overlap, default_tile, default_overlap, elements, multiple):
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
# Latent tiles (reference/ARCHITECTURE.md §3.7 step 6)


def gaussian_weights(h, w, var=0.01):
    """DiT4SR's blending weight of an h x w tile: a separable Gaussian of variance `var` in
    tile-normalised coordinates, peaked at the centre, tiny but never zero at the edges."""
    def g(n):
        x = (torch.arange(n, dtype=torch.float64) - (n - 1) / 2) / n
        return torch.exp(-x * x / (2 * var))
    return (g(h)[:, None] * g(w)[None, :]).float()                              # (h, w)


TILE_BATCH_MAX = 8       # latent tiles per network call at most: on the CPU more were no faster


class TiledNet:
    """Calls a transformer on overlapping latent tiles and blends the outputs, so any latent size
    runs in bounded memory and within the model's position grid. Same signature as MMDiT.forward;
    the prompt goes to every tile whole, the LR latent is cropped like x. A latent that fits in one
    tile runs untiled (bit-identical to net). The network's outputs are linear in what the samplers
    combine (CFG, Euler steps), so blending the outputs is blending the velocities. Tiles run
    `batch` at a time, stacked along the batch (None: batch_size's choice from free memory)."""

    def __init__(self, net, tile=64, overlap=24, on_tile=None, batch=None):
        p, most = net.cfg.patch, net.cfg.pos_grid * net.cfg.patch
        if tile % p or overlap % p or not 0 <= overlap < tile:
            raise ValueError(f"--tile {tile} / --tile-overlap {overlap}: need multiples of the patch {p} "
                             f"and 0 <= overlap < tile")
        if tile > most:
            raise ValueError(f"--tile {tile}: this model's position grid allows latent tiles up to {most}")
        if batch is not None and batch < 1:
            raise ValueError(f"--tile-batch {batch}: at least 1 tile per network call")
        self.net, self.tile, self.overlap, self.cfg, self.batch = net, tile, overlap, net.cfg, batch
        self.on_tile = on_tile or (lambda: None)      # called after every tile's network call

    def batch_size(self, x, context):
        """Tiles per network call: `batch`, else as many as keep their activations (by a rough count:
        12 hidden-sized values per token) within a quarter of the free memory, at most TILE_BATCH_MAX."""
        if self.batch:
            return self.batch
        tokens = 2 * (self.tile // self.cfg.patch) ** 2 + (0 if context is None else context.shape[1])
        per_tile = x.shape[0] * tokens * 12 * self.cfg.hidden * x.element_size()
        return max(1, min(TILE_BATCH_MAX, int(free_memory(x.device) / 4 // per_tile)))

    def tiles(self, H, W):
        """The (rows, cols) slices of every tile of an H x W latent (all of one size)."""
        T = self.tile
        return [(slice(y, y + min(T, H)), slice(x, x + min(T, W)))
                for y in tile_starts(H, T, self.overlap) for x in tile_starts(W, T, self.overlap)]

    def __call__(self, x, sigma, pooled, context, lr=None, sigma_s=None):
        tiles = self.tiles(*x.shape[-2:])
        if len(tiles) == 1:
            y = self.net(x, sigma, pooled, context, lr=lr, sigma_s=sigma_s)
            self.on_tile()
            return y
        B, n = x.shape[0], self.batch_size(x, context)
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)           # (B, C, H, W)
        total = torch.zeros(x.shape[-2:], dtype=torch.float32, device=x.device)   # (H, W)
        w = gaussian_weights(*(s.stop - s.start for s in tiles[0])).to(x.device)         # (th, tw)
        for i in range(0, len(tiles), n):
            group = tiles[i:i + n]
            k = len(group)
            stack = lambda t: None if t is None else torch.cat([t[..., r, c] for r, c in group])  # noqa: E731
            rep = lambda t: None if t is None else t.repeat(k, *[1] * (t.dim() - 1))             # noqa: E731
            y = self.net(stack(x), rep(sigma), rep(pooled), rep(context), lr=stack(lr), sigma_s=rep(sigma_s))
            for j, (rows, cols) in enumerate(group):                                 # y: (k B, C, th, tw)
                out[..., rows, cols] += y[j * B:(j + 1) * B].float() * w
                total[rows, cols] += w
                self.on_tile()
        return (out / total).to(x.dtype)


def free_memory(device):
    """Bytes free for tensors: CUDA's free memory, else Linux's MemAvailable (8 GiB where unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    kib = proc_kib("/proc/meminfo", "MemAvailable")
    return 8 * 2 ** 30 if kib is None else kib * 1024
