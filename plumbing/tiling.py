"""Tiles (plumbing: they bound memory and keep latents inside the transformer's position grid; an image
that fits one tile runs untiled, bit-identical): the VAE's, GroupNorm statistics shared, and TiledNet's.

    z = tiling.encode(vae, x)       # vae.encode(x), tiled above TILE_AUTO_ELEMENTS (tile=0: never)
    y = tiling.decode(vae, z)       # vae.decode(z), likewise
"""
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from plumbing.cli import proc_kib

# --------------------------------------------------------------------------------------------
# The VAE's tiles: overlapping, blended with linear ramps, GroupNorm statistics shared

TILE_AUTO_ELEMENTS = 1024 * 1024 * 128  # tiled by default above this many full-resolution activations
ENCODE_TILE, ENCODE_OVERLAP = 512, 128   # pixels
DECODE_TILE, DECODE_OVERLAP = 64, 16     # latents (x8: 512 and 128 pixels)


def encode(vae, x, tile=None, overlap=None, tile_norm="tiles", **kw):
    """vae.encode(x, **kw), its full-resolution levels on tiles of `tile` pixels; the mid block whole."""
    plan = tile_plan(vae.cfg, *x.shape[-2:], tile, overlap, ENCODE_TILE, ENCODE_OVERLAP, vae.cfg.factor)
    with _tiled(vae.encoder, plan, tile_norm, vae.encoder.down):
        return vae.encode(x, **kw)


def decode(vae, z, tile=None, overlap=None, tile_norm="tiles", **kw):
    """vae.decode(z, **kw), its up levels and output head on tiles of `tile` latents."""
    H, W = (n * vae.cfg.factor for n in z.shape[-2:])
    plan = tile_plan(vae.cfg, H, W, tile, overlap, DECODE_TILE, DECODE_OVERLAP, 1)
    with _tiled(vae.decoder, plan, tile_norm, vae.decoder.up, vae.decoder.norm_out):
        return vae.decode(z, **kw)


def tile_plan(cfg, H, W, tile, overlap, default_tile, default_overlap, multiple):
    """(tile, overlap) for an H x W image, or None for one untiled pass. tile=None: automatic, by the
    elements of one activation of the first level (at latent resolution for a patch VAE); 0: never."""
    if tile == 0 or (tile is None and (H // cfg.patch) * (W // cfg.patch) * cfg.channels[0] <= TILE_AUTO_ELEMENTS):
        return None
    tile = default_tile if tile is None else tile
    if overlap is None:
        overlap = default_overlap if tile == default_tile else tile // 4 // multiple * multiple
    if tile % multiple or overlap % multiple:
        raise ValueError(f"tile {tile} and overlap {overlap} must be multiples of {multiple}")
    return tile, overlap


@contextmanager
def _tiled(part, plan, tile_norm, *holders):
    """Inside the block part.body runs on the tiles of `plan` (None: whole), `holders`' GroupNorms shared."""
    body, norms = part.body, [m for h in holders for m in h.modules() if isinstance(m, nn.GroupNorm)]
    tiled = {part: lambda x: run_tiled(body, norms, x, *plan, tile_norm)} if plan else {}
    with torch.set_grad_enabled(torch.is_grad_enabled() and not plan), _hidden("body", tiled):
        yield


@contextmanager
def _hidden(name, values):
    """Inside the block each module m in `values` has the attribute `name` = values[m], hiding its method
    of that name: vae.py's modules stay plain, their tiled behaviour lives here."""
    for m, v in values.items():
        setattr(m, name, v)
    try:
        yield
    finally:
        for m in values:
            delattr(m, name)


def _group_norm(m, x, stats):
    """GroupNorm m of x, in fp32, by the statistics stats = (mean, var), each (B, G)."""
    mean, var = (s[:, None, :, None] for s in stats)
    g = x.float().permute(0, 2, 3, 1).flatten(1, 2).unflatten(2, (m.num_groups, -1))   # (B, H W, G, C / G)
    y = ((g - mean) * torch.rsqrt(var + m.eps)).flatten(2).unflatten(1, x.shape[-2:]).permute(0, 3, 1, 2)
    return (y * m.weight.float()[:, None, None] + m.bias.float()[:, None, None]).to(x.dtype)


def tile_starts(n, tile, overlap):
    """Offsets of tiles along an axis of length n: stride tile - overlap, the last flush with the end."""
    if n <= tile:
        return [0]
    return list(range(0, n - tile, tile - overlap)) + [n - tile]


def tile_grid(H, W, tile, overlap):
    """The (rows, cols) slices of every tile of an H x W image, all of one size."""
    return [(slice(y, y + min(tile, H)), slice(x, x + min(tile, W)))
            for y in tile_starts(H, tile, overlap) for x in tile_starts(W, tile, overlap)]


def _ramp(n, start, size, overlap):
    """A tile's 1-D blending weight: ramps over `overlap` towards sides another tile shares; never zero."""
    w, i = torch.ones(size), torch.arange(size) + 0.5
    if overlap and start > 0:
        w = torch.minimum(w, i / overlap)
    if overlap and start + size < n:
        w = torch.minimum(w, i.flip(0) / overlap)
    return w


def _owned(n, tile, overlap):
    """Per tile along an axis of length n, its offset and the slice of it that it owns: overlaps
    split in the middle, so every pixel counts once, as far from tile edges as possible."""
    starts = tile_starts(n, tile, overlap)
    cuts = [0] + [(s + p + tile) // 2 for p, s in zip(starts, starts[1:])] + [n]
    return [(s, slice(a - s, b - s)) for s, a, b in zip(starts, cuts, cuts[1:])]


def _shared_stats(net, norms, x, tile, overlap):
    """{m: (mean, var)} (B, G) of the GroupNorms `norms` over all of x: a pass over the tiles, each summing the
    pixels it owns. (A second pass, normalised with the first's estimate, made the decoder worse.)"""
    sums = {m: (0, 0, 0) for m in norms}   # pixels, sum, sum of squares: (B, G) in fp64

    def record(m, t):   # t normalised by its own statistics; its sums over the pixels in `own` added
        g = t.float().permute(0, 2, 3, 1).flatten(1, 2).unflatten(2, (m.num_groups, -1))   # (B, H W, G, C / G)
        k = F.interpolate(own[None, None], size=t.shape[-2:], mode="nearest").reshape(1, -1, 1, 1)
        new = k.sum().double() * g.shape[3], (g * k).sum((1, 3)).double(), (g * g * k).sum((1, 3)).double()
        sums[m] = [a + b for a, b in zip(sums[m], new)]
        return _group_norm(m, t, torch.var_mean(g, dim=(1, 3), unbiased=False)[::-1])

    with _hidden("forward", {m: partial(record, m) for m in norms}):
        for y0, ys in _owned(x.shape[-2], tile, overlap):
            for x0, xs in _owned(x.shape[-1], tile, overlap):
                crop = x[..., y0:y0 + tile, x0:x0 + tile]
                own = torch.zeros(crop.shape[-2:], device=x.device)   # read by record
                own[ys, xs] = 1
                net(crop)
    moments = {m: (s1 / n, s2 / n) for m, (n, s1, s2) in sums.items()}   # E[x], E[x^2]
    return {m: (e1.float(), (e2 - e1 * e1).clamp_min(0).float()) for m, (e1, e2) in moments.items()}


def run_tiled(net, norms, x, tile, overlap, tile_norm="tiles"):
    """net(x) on overlapping tiles of side `tile` (each offset a whole pixel of net's r-times output), in fp32;
    the GroupNorms `norms` share statistics across tiles (tile_norm "tiles") or each has its own ("local")."""
    if not 0 <= overlap < tile or tile_norm not in ("tiles", "local"):
        raise ValueError(f"tile {tile}, overlap {overlap}, tile_norm {tile_norm!r}: "
                         "need 0 <= overlap < tile and tile_norm 'tiles' or 'local'")
    B, _, H, W = x.shape
    tiles = tile_grid(H, W, tile, overlap)
    if len(tiles) == 1:   # fits in one tile: the untiled computation, no statistics pass
        return net(x).float()
    stats = _shared_stats(net, norms, x, tile, overlap) if tile_norm == "tiles" else {}
    out = weight = None
    with _hidden("forward", {m: partial(_group_norm, m, stats=s) for m, s in stats.items()}):
        for rows, cols in tiles:
            y = net(x[..., rows, cols]).float()                          # (B, C', r th, r tw)
            r = y.shape[-1] / (cols.stop - cols.start)
            if out is None:
                out = y.new_zeros(B, y.shape[1], round(H * r), round(W * r))
                weight = y.new_zeros(round(H * r), round(W * r))
            y0, x0, o = round(rows.start * r), round(cols.start * r), round(overlap * r)
            w = torch.outer(_ramp(out.shape[-2], y0, y.shape[-2], o), _ramp(out.shape[-1], x0, y.shape[-1], o))
            w = w.to(y.device)
            region = (..., slice(y0, y0 + y.shape[-2]), slice(x0, x0 + y.shape[-1]))
            out[region] += y * w                                         # (r th, r tw) weights
            weight[region] += w
    return out / weight


# --------------------------------------------------------------------------------------------
# Latent tiles (reference/ARCHITECTURE.md §3.7 step 6)


def gaussian_weights(h, w, var=0.01):
    """DiT4SR's blending weight of an h x w tile: a Gaussian in tile-normalised coordinates, never zero."""
    def g(n):
        x = (torch.arange(n, dtype=torch.float64) - (n - 1) / 2) / n
        return torch.exp(-x * x / (2 * var))
    return (g(h)[:, None] * g(w)[None, :]).float()                              # (h, w)


TILE_BATCH_MAX = 8       # latent tiles per network call at most: on the CPU more were no faster


class TiledNet:
    """MMDiT.forward on overlapping latent tiles (the prompt whole, lr cropped like x), blended: the samplers
    combine outputs linearly, so this blends velocities. Tiles run `batch` at a time (None: by free memory)."""

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
        """Tiles per network call: `batch`, else as many as fit a quarter of the free memory (<= TILE_BATCH_MAX)."""
        if self.batch:
            return self.batch
        tokens = 2 * (self.tile // self.cfg.patch) ** 2 + (0 if context is None else context.shape[1])
        per_tile = x.shape[0] * tokens * 12 * self.cfg.hidden * x.element_size()   # activations, roughly
        return max(1, min(TILE_BATCH_MAX, int(free_memory(x.device) / 4 // per_tile)))

    def tiles(self, H, W):
        return tile_grid(H, W, self.tile, self.overlap)

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
