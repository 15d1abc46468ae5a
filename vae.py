"""The SD3 / SD3.5 VAE (16 latent channels, x8).

    from vae import CONFIGS, VAE
    vae = VAE(CONFIGS["sd3"])                     # or plumbing.checkpoints.load_vae("sd3.5_medium.safetensors")
    z = vae.encode(x)                             # x (B, 3, H, W) in [-1, 1] -> (B, 16, H/8, W/8)
    y = vae.decode(z)                             # model-space latents -> images in [-1, 1]

Follows Stability-AI's single-file reference (sd3_impls.VAEEncoder / VAEDecoder) for the layers
and the parameter names, so `state_dict()` keys equal the released `first_stage_model.*` keys
without the prefix. Facts and the original <-> diffusers key map: reference/ARCHITECTURE.md
§4, cited as "ARCH §4.x". Latents leave `encode` in the transformer's space, (z - shift) * scale
(ARCH §1); `decode` undoes it. Files: plumbing/checkpoints.py; overlapping tiles: plumbing/tiling.py.

Inside, activations are channels-last (faster CPU convolutions); outputs are NCHW. GroupNorm
normalises in fp32 (its sums of squares overflow fp16); `set_dtype(vae, torch.float16)` keeps the
decoder's up levels and head in fp32, the parts of SD VAEs that overflow fp16 (diffusers' `upcast_vae`).
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


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
    # The shipped miniature's: x4, 16 latent channels (the same transformer). 4 x 4 pixel patches folded
    # into channels, so every conv runs at latent resolution; a linear code of the patches (`linear`, PCA
    # at start, experiments/tiny_vae.py) carries most of the image (docs/modules.md). 8 GroupNorm groups:
    # 32 normalised every channel alone and trained slower. No mid attention: its cost is quadratic.
    "tiny": VAEConfig(channels=(64,), enc_blocks=1, dec_blocks=2, groups=8, mid_attn=False, patch=4),
    # the SD3 structure at x4 (the previous tiny VAE): small, and diffusers can read it (tests, bench)
    "x4": VAEConfig(channels=(32, 64, 64), enc_blocks=1, dec_blocks=2, groups=8, mid_attn=False),
}

# --------------------------------------------------------------------------------------------
# Layers (ARCH §4.2)


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm computed in fp32, whatever the input's dtype: its sums of squares overflow fp16."""

    def __init__(self, groups, channels):
        super().__init__(groups, channels, eps=1e-6)

    def forward(self, x):
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


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
        # contiguous: with a strided last dim CPU SDPA falls back to the math kernel (whole score blocks)
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
        h = self.mid(self.body(x))                                       # attention over all positions
        m = self.conv_out(_silu(self.norm_out(_to_dtype_of(self.conv_out, h))))
        if self.patch > 1:
            m = m + self.linear(_to_dtype_of(self.linear, F.pixel_unshuffle(x, self.patch)))
        return m

    def body(self, x):
        """The full-resolution levels (no attention), (B, 3, H, W) -> (B, C, H / f, W / f)."""
        h = self.conv_in(_to_dtype_of(self.conv_in, F.pixel_unshuffle(x, self.patch)))
        for level in self.down:
            h = level(h)
        return h


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
        x = self.body(self.mid(self.conv_in(_to_dtype_of(self.conv_in, z))))   # mid: attention over all positions
        if self.patch > 1:   # the linear decoding of the patches, added to the convolutions' image
            x = x + F.pixel_shuffle(self.linear(_to_dtype_of(self.linear, z)), self.patch)
        return x

    def body(self, h):
        """The up levels and the output head (no attention), (B, C, h, w) -> (B, 3, h f, w f)."""
        for level in reversed(self.up):
            h = level(h)
        return F.pixel_shuffle(self.conv_out(_silu(self.norm_out(_to_dtype_of(self.conv_out, h)))), self.patch)


# --------------------------------------------------------------------------------------------
# The VAE


class VAE(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def moments(self, x):
        """(B, 3, H, W) in [-1, 1] -> (mean, logvar) in fp32, each (B, latent, H / f, W / f)."""
        f = self.cfg.factor
        B, C, H, W = x.shape
        assert C == self.cfg.image_channels and H % f == 0 and W % f == 0, \
            f"expected (B, {self.cfg.image_channels}, H, W) with H, W multiples of {f}, got {tuple(x.shape)}"
        return self.encoder(x).float().contiguous().chunk(2, dim=1)   # channels-last stays inside vae.py

    def encode(self, x, generator=None, sample=False):
        """Images in [-1, 1] -> model-space latents (z - shift) * scale, in x's dtype: z the posterior
        mean, or with sample=True mean + std * eps, eps from `generator` (logvar clamped, ARCH §4.2)."""
        mean, logvar = self.moments(x)
        z = mean
        if sample:   # eps drawn on the generator's device, then moved: a CPU generator cannot draw on a GPU
            eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype,
                              device=mean.device if generator is None else generator.device).to(mean.device)
            z = mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * eps
        return ((z - self.cfg.shift) * self.cfg.scale).to(x.dtype)     # (B, latent, H/f, W/f)

    def decode(self, z, clamp=True):
        """Model-space latents (B, latent, h, w) -> images (B, 3, h f, w f) in [-1, 1] (clamp=False: raw)."""
        assert z.shape[1] == self.cfg.latent_channels, \
            f"expected (B, {self.cfg.latent_channels}, h, w), got {tuple(z.shape)}"
        x = self.decoder(z.float() / self.cfg.scale + self.cfg.shift).float().contiguous()   # (B, 3, h f, w f)
        return (x.clamp(-1, 1) if clamp else x).to(z.dtype)


FP16_UPCAST = ("decoder.up", "decoder.norm_out", "decoder.conv_out")


def set_dtype(vae: VAE, dtype, upcast=FP16_UPCAST):
    """Cast the VAE to `dtype`; for fp16 the modules named in `upcast` stay fp32."""
    vae.to(dtype)
    if dtype == torch.float16:
        for name in upcast:
            vae.get_submodule(name).float()
    return vae

