"""The SD3.5 MMDiT-X transformer, DiT4SR's LR stream, and the MFSR two-time student.

    from model import CONFIGS, MMDiT, load_transformer, save_transformer
    net = MMDiT(CONFIGS["tiny"])                                 # or load_transformer("sd3.5_medium.safetensors")
    v = net(x, sigma, pooled, context, lr=z_lr)                  # SD3 convention: eps - x0
    save_transformer(net, "out.safetensors")                     # SD3.5 names, config in the metadata

Follows Stability-AI's single-file reference (mmditx.py) for the architecture and the parameter
names, so `state_dict()` keys are those of the released checkpoints; DiT4SR (Duan et al., ICCV 2025)
for the LR stream; MFSR (§4.2, §4.4) for the s-embedder and the time scale. Facts, key maps and
shapes: ../shared/reference/ARCHITECTURE.md (§2 MMDiT, §3 LR stream), cited as "ARCH §x".

Conventions of this file (the SD3 ones; mfsr.py converts to the paper's t = 1 - sigma once):
x_sigma = (1 - sigma) x0 + sigma eps, sigma = 1 is noise, the network predicts eps - x0 and sees
the time as `time_scale * sigma` (1000 for SD3.5 and DiT4SR, 1 for the MFSR student).
Token layout: image tokens X (B, K, D), LR tokens L (B, K, D), text tokens C (B, M, D).

Checkpoints (the end of this file): only safetensors are read (pickled files can run code), memory-
mapped into a module built on the meta device. The transformer's two key layouts, SD3.5's single-file
names (the modules') and diffusers' (also DiT4SR's), map as in ARCH §2.5, §3.5. A mismatch is a
CheckpointError that names the file and lists what is missing, unexpected or misshapen.
"""
import json
import math
import os
import re
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from safetensors import safe_open
from safetensors.torch import save_file

from fastjvp import Linear, attention, linear, mlp_band_rows

# --------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class MMDiTConfig:
    depth: int = 24                    # joint blocks
    heads: int = 24                    # hidden size = heads * head_dim
    head_dim: int = 64
    patch: int = 2
    in_channels: int = 16              # latent channels (the SD3 VAE's 16)
    pos_grid: int = 384                # side of the stored sin-cos table (pos_embed_max_size)
    context_dim: int = 4096            # CLIP-L + CLIP-G (zero-padded) and T5 features
    pooled_dim: int = 2048             # pooled CLIP-L + CLIP-G
    dual_layers: tuple = tuple(range(13))  # MMDiT-X blocks with the image-only attn2
    qk_norm: bool = True               # RMSNorm on q and k per head
    mlp_ratio: int = 4
    lr_stream: bool = False            # DiT4SR: LR tokens inside every block (ARCH §3)
    lr_key_mode: str = "v1"            # "v1": released dit4sr_f/q keys quirk; "r1": fixed (ARCH §3.3)
    ff_inject: float = 1.2             # DiT4SR's factor on the LR conv injected into the MLP (ARCH §3.4)
    two_times: bool = False            # MFSR student: adds the s-embedder (§4.2)
    time_scale: float = 1000.0         # c_noise(sigma) = time_scale * sigma; MFSR student: 1 (§4.4)
    time_cutoff: float = 0.0           # > 0: time features above this many rad per unit sigma dropped
                                       # (a student of a 1000 sigma teacher; not the paper's, mfsr.py top)
    prediction: str = "v"              # output: "v" SD3's eps - x0; "x" x0 - z_LR (miniature; mfsr.py converts)

    def __post_init__(self):
        if self.lr_key_mode not in ("v1", "r1"):
            raise ValueError(f"lr_key_mode must be 'v1' or 'r1', got {self.lr_key_mode!r}")
        if self.prediction not in ("v", "x"):
            raise ValueError(f"prediction must be 'v' or 'x', got {self.prediction!r}")
        if self.prediction == "x" and not self.lr_stream:
            raise ValueError("prediction 'x' predicts the residual over the LR latent: it needs lr_stream")
        bad = [i for i in self.dual_layers if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"dual_layers {bad} outside the {self.depth} blocks")
        object.__setattr__(self, "dual_layers", tuple(sorted(self.dual_layers)))

    @property
    def hidden(self):
        return self.heads * self.head_dim


_MEDIUM = MMDiTConfig()
CONFIGS = {
    "sd35-medium": _MEDIUM,
    "sd35-large": MMDiTConfig(depth=38, heads=38, pos_grid=192, dual_layers=()),
    "dit4sr": replace(_MEDIUM, lr_stream=True),
    # CPU tests and the shipped miniature: every feature of the big one, at 2 x 64 hidden.
    "tiny": MMDiTConfig(depth=3, heads=2, pos_grid=32, context_dim=64, pooled_dim=32,
                        dual_layers=(0,), lr_stream=True),
}


# --------------------------------------------------------------------------------------------
# Building blocks (names as in mmditx.py). Attention is one call, fastjvp.attention (fused SDPA;
# its forward-AD paths live in fastjvp.py), and Linear is nn.Linear with a cheaper JVP rule.


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def timestep_embedding(t, dim=256, max_period=10000.0, max_freq=None):
    """Sinusoidal features of t (B,) -> (B, dim), cos first (ARCH §2.2 step 3), in >= fp32.
    max_freq: features of a higher frequency (rad per unit of t) are zero, as if the next layer's
    columns for them were cut (a low-passed embedding, see MMDiTConfig.time_cutoff)."""
    half = dim // 2
    dtype = torch.promote_types(t.dtype, torch.float32)
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=dtype) / half)
    args = t.to(dtype)[:, None] * freqs[None]                                     # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return emb if max_freq is None else emb * (freqs <= max_freq).repeat(2).to(dtype)


class VectorEmbedder(nn.Module):
    def __init__(self, in_dim, hidden):
        super().__init__()
        self.mlp = nn.Sequential(Linear(in_dim, hidden), nn.SiLU(), Linear(hidden, hidden))

    def forward(self, y):
        return self.mlp(y)


class TimestepEmbedder(VectorEmbedder):
    def __init__(self, hidden):
        super().__init__(256, hidden)      # over timestep_embedding's 256 features

    def forward(self, t, max_freq=None):
        return self.mlp(timestep_embedding(t, max_freq=max_freq).to(self.mlp[0].weight.dtype))


class PatchEmbed(nn.Module):
    def __init__(self, patch, in_channels, hidden):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden, patch, stride=patch)

    def forward(self, x):
        return rearrange(self.proj(x), "b d h w -> b (h w) d")                    # (B, K, D)


def sincos_pos_table(grid, dim):
    """(1, grid^2, dim): first half encodes the column, second the row; [sin, cos] each."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    pos = torch.arange(grid, dtype=torch.float64)
    ang = pos[:, None] * omega[None]                                              # (grid, dim/4)
    emb1d = torch.cat([ang.sin(), ang.cos()], dim=1)                              # (grid, dim/2)
    col = emb1d[None, :, :].expand(grid, grid, dim // 2)
    row = emb1d[:, None, :].expand(grid, grid, dim // 2)
    return torch.cat([col, row], dim=-1).reshape(1, grid * grid, dim).float()


class Mlp(nn.Module):
    def __init__(self, hidden, ratio, control=False):
        super().__init__()
        self.fc1 = Linear(hidden, hidden * ratio)
        self.fc2 = Linear(hidden * ratio, hidden)
        if control:
            self.add_control()

    def add_control(self):
        """DiT4SR's "LR injection between MLP": a zero-initialised depthwise 3x3 conv."""
        w, kw = self.fc1.out_features, dict(device=self.fc1.weight.device, dtype=self.fc1.weight.dtype)
        self.control_conv = nn.Conv2d(w, w, 3, padding=1, groups=w, **kw)
        nn.init.zeros_(self.control_conv.weight)
        nn.init.zeros_(self.control_conv.bias)

    def hidden(self, x):
        return F.gelu(self.fc1(x), approximate="tanh")


class SelfAttention(nn.Module):
    """qkv / ln_q / ln_k / proj as in mmditx.py; with `control`, DiT4SR's LR-stream layers."""

    def __init__(self, cfg, pre_only=False, control=False):
        super().__init__()
        D, self.heads = cfg.hidden, cfg.heads
        self.qkv = Linear(D, 3 * D)
        if not pre_only:
            self.proj = Linear(D, D)
        if cfg.qk_norm:
            self.ln_q, self.ln_k = RMSNorm(cfg.head_dim), RMSNorm(cfg.head_dim)
        else:
            self.ln_q = self.ln_k = nn.Identity()
        if control:
            self.add_control()

    def add_control(self):
        """DiT4SR's LR-stream layers on the frozen q/k/v, zero at init (ARCH §3.3). out_control
        gets a plain init: DiT4SR's script copied proj's random init, not proj (ARCH §3.3)."""
        D = self.qkv.in_features
        kw = dict(device=self.qkv.weight.device, dtype=self.qkv.weight.dtype)
        self.q_control, self.k_control, self.v_control = (Linear(D, D, **kw) for _ in range(3))
        for lin in (self.q_control, self.k_control, self.v_control):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        self.out_control = Linear(D, D, **kw)

    def split_heads(self, x):
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        return q, k, v                                                            # (B, H, N, d)

    def qkv_x(self, x):
        q, k, v = self.split_heads(x)
        return self.ln_q(q), self.ln_k(k), v

    def qkv_lr(self, la, k_x, key_mode):
        """LR q/k/v: the control layers on the frozen projections (ARCH §3.3 step 2); k_x: image keys after ln_k."""
        heads = lambda t: rearrange(t, "b n (h d) -> b h n d", h=self.heads)
        flat = lambda t: rearrange(t, "b h n d -> b n (h d)")
        q, k, v = self.split_heads(la)
        q = self.ln_q(heads(self.q_control(flat(q))))
        v = heads(self.v_control(flat(v)))
        if key_mode == "v1":   # the released checkpoints: norm_k applied twice to the image keys
            k = self.ln_k(k_x)
        else:
            k = self.ln_k(heads(self.k_control(flat(k))))
        return q, k, v

    def image_qkv(self, nx, nl, shift, scale, key_mode, text=None):
        """q, k, v over [X ; L] (L if nl is given, ARCH §3.3) with the text's q, k, v appended, and la,
        the modulated LR input. Parts are freed once joined: only one of q, k, v is ever held twice."""
        q, k, v = self.split_heads(modulate(nx, shift, scale))
        parts, la = [[self.ln_q(q)], [self.ln_k(k)], [v]], None
        del q, k, v                 # from here only `parts` holds them
        if nl is not None:
            # v copied out of the (B, N, 3D) projection, which then goes before the LR one is made
            parts[2][0] = parts[2][0].contiguous()
            la = modulate(nl, shift, scale)
            for part, t in zip(parts, self.qkv_lr(la, parts[1][0], key_mode)):
                part.append(t)
            del part, t
        for part, t in zip(parts, text or ()):
            part.append(t)

        def join(part):
            out = torch.cat(part, 2) if len(part) > 1 else part[0]
            part.clear()
            return out
        return join(parts[0]), join(parts[1]), join(parts[2]), la

    def image_out(self, o, x, lr, la, gate):
        """Gated residual updates of X (and L) from the attention output o (B, N, D)."""
        K = x.shape[1]
        x = x + gate.unsqueeze(1) * self.proj(o[:, :K])
        if lr is not None:  # LR residual: the modulated input is added back before out_control
            lr = lr + gate.unsqueeze(1) * self.out_control(o[:, K:2 * K] + la)
        return x, lr


class DismantledBlock(nn.Module):
    """One stream's half of a joint block: adaLN modulation, attention(s), MLP."""

    def __init__(self, cfg, pre_only=False, dual=False, control=False):
        super().__init__()
        D = cfg.hidden
        self.pre_only, self.dual = pre_only, dual
        self.norm1 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(cfg, pre_only=pre_only, control=control)
        if dual:
            self.attn2 = SelfAttention(cfg, control=control)
        if not pre_only:
            self.norm2 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
            self.mlp = Mlp(D, cfg.mlp_ratio, control=control)
        n = 2 if pre_only else (9 if dual else 6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(D, n * D))

    def modulation(self, c):
        return self.adaLN_modulation(c).chunk(self.adaLN_modulation[1].out_features // c.shape[-1], dim=-1)


class JointBlock(nn.Module):
    def __init__(self, cfg, index):
        super().__init__()
        self.cfg = cfg
        self.context_block = DismantledBlock(cfg, pre_only=index == cfg.depth - 1)
        self.x_block = DismantledBlock(cfg, dual=index in cfg.dual_layers, control=cfg.lr_stream)

    def forward(self, x, lr, ctx, c, grid, attn_mode):
        mods, c_mods = self.x_block.modulation(c), self.context_block.modulation(c)
        x, lr, oc = self._attention(x, lr, ctx, mods, c_mods, attn_mode)
        x, lr = self._mlp(x, lr, *mods[3:6], grid)
        ctx = None if self.context_block.pre_only else self._context_rest(ctx, oc, c_mods)
        return x, lr, ctx

    def _attention(self, x, lr, ctx, mods, c_mods, attn_mode):
        """The joint attention (and MMDiT-X's image-only second one): new X and L, and the text
        tokens' attention output. Its `del`s free q, k, v and the normalised inputs when dead."""
        xb, cb, cfg = self.x_block, self.context_block, self.cfg
        shift_msa, scale_msa, gate_msa = mods[:3]
        nx, nl = xb.norm1(x), None if lr is None else xb.norm1(lr)
        text = cb.attn.qkv_x(modulate(cb.norm1(ctx), c_mods[0], c_mods[1]))      # text stream
        q, k, v, la = xb.attn.image_qkv(nx, nl, shift_msa, scale_msa, cfg.lr_key_mode, text)
        del text
        o = attention(q, k, v, attn_mode)                                           # [X ; L ; C]
        del q, k, v                                 # freed before the second attention makes its own
        o = rearrange(o, "b h n d -> b n (h d)")                                   # (B, N, D)
        x2, lr2 = xb.attn.image_out(o, x, lr, la, gate_msa)
        # the text tokens' rows, for their MLP (the last block has none): the rest of o can go
        oc = None if cb.pre_only else o[:, -ctx.shape[1]:].clone()
        del o, la
        if xb.dual:  # MMDiT-X: image-only attention from the same normalised x, over [X ; L]
            shift2, scale2, gate2 = mods[6:]
            q, k, v, la2 = xb.attn2.image_qkv(nx, nl, shift2, scale2, cfg.lr_key_mode)
            del nx, nl
            o2 = attention(q, k, v, attn_mode)
            del q, k, v                             # freed before o2's (B, 2K, D) copy is made
            o2 = rearrange(o2, "b h n d -> b n (h d)")                             # (B, 2K, D)
            x2, lr2 = xb.attn2.image_out(o2, x2, lr2, la2, gate2)
        return x2, lr2, oc

    def _mlp(self, x, lr, shift, scale, gate, grid):
        """Both image streams' MLPs over all image rows at once (under a JVP in bands: fastjvp.mlp_band_rows)."""
        h, w = grid
        rows = mlp_band_rows(x, h, w, self.x_block.mlp.fc1.out_features)
        if rows >= h:
            return self._mlp_rows(x, lr, shift, scale, gate, grid, 0, h)
        parts = [self._mlp_rows(x, lr, shift, scale, gate, grid, r, min(r + rows, h)) for r in range(0, h, rows)]
        return torch.cat([p[0] for p in parts], 1), None if lr is None else torch.cat([p[1] for p in parts], 1)

    def _mlp_rows(self, x, lr, shift, scale, gate, grid, r0, r1):
        """The MLP outputs of image rows r0 .. r1 - 1 (tokens r0 w .. r1 w - 1) of X and of L."""
        xb, (h, w) = self.x_block, grid
        band = slice(r0 * w, r1 * w)
        hx = xb.mlp.hidden(modulate(xb.norm2(x[:, band]), shift, scale))          # (B, n, 4D)
        lr_out = None
        if lr is not None:
            a, b = max(r0 - 1, 0), min(r1 + 1, h)       # one more row each side for the 3x3 conv
            hl = xb.mlp.hidden(modulate(xb.norm2(lr[:, a * w:b * w]), shift, scale))
            conv = xb.mlp.control_conv(rearrange(hl, "b (h w) c -> b c h w", w=w))[:, :, r0 - a:r1 - a]
            hx = hx + self.cfg.ff_inject * rearrange(conv, "b c h w -> b (h w) c")
            lr_out = lr[:, band] + gate.unsqueeze(1) * xb.mlp.fc2(hl[:, (r0 - a) * w:(r1 - a) * w])
        return x[:, band] + gate.unsqueeze(1) * xb.mlp.fc2(hx), lr_out

    def _context_rest(self, ctx, oc, mods):
        cb = self.context_block
        _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        ctx = ctx + gate_msa.unsqueeze(1) * cb.attn.proj(oc)
        h = cb.mlp.hidden(modulate(cb.norm2(ctx), shift_mlp, scale_mlp))
        return ctx + gate_mlp.unsqueeze(1) * cb.mlp.fc2(h)


class FinalLayer(nn.Module):
    def __init__(self, hidden, patch, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = Linear(hidden, patch * patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(hidden, 2 * hidden))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)   # (shift, scale): ARCH §2.2 step 8
        return self.linear(modulate(self.norm_final(x), shift, scale))


# --------------------------------------------------------------------------------------------
# The transformer


class MMDiT(nn.Module):
    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.hidden
        self.x_embedder = PatchEmbed(cfg.patch, cfg.in_channels, D)
        self.register_buffer("pos_embed", sincos_pos_table(cfg.pos_grid, D))
        self.t_embedder = TimestepEmbedder(D)
        if cfg.two_times:
            # MFSR §4.2: s has its own embedder, added to the t-embedding. The paper does not say how it
            # starts; a zero last layer makes the student at init exactly the teacher, whatever s is.
            self.s_embedder = TimestepEmbedder(D)
            nn.init.zeros_(self.s_embedder.mlp[2].weight)
            nn.init.zeros_(self.s_embedder.mlp[2].bias)
        self.y_embedder = VectorEmbedder(cfg.pooled_dim, D)
        self.context_embedder = Linear(cfg.context_dim, D)
        self.joint_blocks = nn.ModuleList(JointBlock(cfg, i) for i in range(cfg.depth))
        self.final_layer = FinalLayer(D, cfg.patch, cfg.in_channels)
        if cfg.prediction == "x":   # output x - z_LR: untrained, the model predicts the LR latent
            nn.init.zeros_(self.final_layer.linear.weight)
            nn.init.zeros_(self.final_layer.linear.bias)
        self.attn_mode = "auto"          # see `attention`
        self.grad_checkpointing = False  # recompute each block in backward (full-scale training)

    def cropped_pos_embed(self, h, w):
        """Centre crop of the stored M x M table for an h x w token grid (ARCH §2.2 step 2)."""
        M = self.cfg.pos_grid
        top, left = (M - h) // 2, (M - w) // 2
        table = rearrange(self.pos_embed, "1 (m n) d -> m n d", m=M)
        return rearrange(table[top:top + h, left:left + w], "h w d -> 1 (h w) d")  # (1, K, D)

    def check_inputs(self, x, sigma, pooled, context, lr, sigma_s):
        """ValueError naming what is wrong (not an assert: `python -O` would skip those)."""
        cfg, p = self.cfg, self.cfg.patch
        B, C, H, W = x.shape
        if C != cfg.in_channels:
            raise ValueError(f"x has {C} channels, the model {cfg.in_channels}")
        if H % p or W % p:
            raise ValueError(f"latent {H}x{W} not divisible by the patch {p}")
        if H // p > cfg.pos_grid or W // p > cfg.pos_grid:
            raise ValueError(f"latent {H}x{W} exceeds the position grid {cfg.pos_grid * p}: tile it")
        if sigma.shape != (B,):
            raise ValueError(f"sigma must be (B,), got {tuple(sigma.shape)}")
        if pooled.shape != (B, cfg.pooled_dim):
            raise ValueError(f"pooled must be (B, {cfg.pooled_dim}), got {tuple(pooled.shape)}")
        if context.ndim != 3 or context.shape[0] != B or context.shape[2] != cfg.context_dim:
            raise ValueError(f"context must be (B, L, {cfg.context_dim}), got {tuple(context.shape)}")
        if (lr is not None) != cfg.lr_stream or (lr is not None and lr.shape != x.shape):
            raise ValueError("the LR stream needs lr shaped like x" if cfg.lr_stream else "this model has no LR stream")
        if (sigma_s is not None) != cfg.two_times or (sigma_s is not None and sigma_s.shape != (B,)):
            raise ValueError("a two-time model needs sigma_s (B,)" if cfg.two_times
                             else "this model has one time input")

    def forward(self, x, sigma, pooled, context, lr=None, sigma_s=None):
        self.check_inputs(x, sigma, pooled, context, lr, sigma_s)
        cfg = self.cfg
        H, W = x.shape[-2:]
        grid = (H // cfg.patch, W // cfg.patch)
        pos = self.cropped_pos_embed(*grid)
        x_tok = self.x_embedder(x) + pos                                           # (B, K, D)
        lr_tok = self.x_embedder(lr) + pos if lr is not None else None           # (B, K, D)
        low = cfg.time_cutoff / cfg.time_scale if cfg.time_cutoff > 0 else None  # per unit of c_noise
        c = self.t_embedder(cfg.time_scale * sigma, low) + self.y_embedder(pooled)  # (B, D)
        if cfg.two_times:
            c = c + self.s_embedder(cfg.time_scale * sigma_s, low)
        ctx = self.context_embedder(context)                                       # (B, M, D)
        for block in self.joint_blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x_tok, lr_tok, ctx = torch.utils.checkpoint.checkpoint(
                    block, x_tok, lr_tok, ctx, c, grid, self.attn_mode, use_reentrant=False)
            else:
                x_tok, lr_tok, ctx = block(x_tok, lr_tok, ctx, c, grid, self.attn_mode)
        out = self.final_layer(x_tok, c)                                          # (B, K, p*p*C)
        return rearrange(out, "b (h w) (p q c) -> b c (h p) (w q)",
                         h=grid[0], p=cfg.patch, q=cfg.patch)                      # (B, C, H, W)


# --------------------------------------------------------------------------------------------
# LoRA (MFSR App. B) and the trainable set

LORA_TARGETS = ("qkv", "proj", "fc1", "fc2")  # attention and MLP linears of both streams


class LoRALinear(Linear):
    """W x + (alpha / rank) * up(down(x)), up zero at init; the replaced layer's `weight` / `bias` keys stay."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_down = Linear(self.in_features, rank, bias=False, **kw)
        self.lora_up = Linear(rank, self.out_features, bias=False, **kw)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.scale = alpha / rank

    def forward(self, x):
        # Without gradients for the LoRA factors, one linear with the merged weight is cheaper than
        # three once the rows outnumber in * out / (in + out); with them, the gradients stay low-rank.
        rows = x.numel() // self.in_features
        lora_grad = torch.is_grad_enabled() and (self.lora_up.weight.requires_grad
                                                 or self.lora_down.weight.requires_grad)
        if not lora_grad and rows * (self.in_features + self.out_features) > self.in_features * self.out_features:
            w = torch.addmm(self.weight, self.lora_up.weight, self.lora_down.weight, alpha=self.scale)
            return linear(x, w, self.bias)
        return linear(x, self.weight, self.bias) + self.scale * self.lora_up(self.lora_down(x))

    def merged(self) -> nn.Linear:
        lin = Linear(self.in_features, self.out_features, device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.weight + self.scale * self.lora_up.weight @ self.lora_down.weight)
            lin.bias.copy_(self.bias)
        return lin


def _replace_linears(net, pick, make):
    for parent in list(net.joint_blocks.modules()):
        for name, child in list(parent.named_children()):
            if pick(name, child):
                setattr(parent, name, make(child))


def add_lora(net: MMDiT, rank: int = 64, alpha: float | None = None, targets=LORA_TARGETS):
    """Wrap the transformer blocks' linear layers named in `targets` with LoRA (zero at init)."""
    alpha = float(rank) if alpha is None else alpha
    _replace_linears(net, lambda n, m: type(m) is Linear and n in targets,
                     lambda m: LoRALinear(m, rank, alpha))
    net.lora = dict(rank=rank, alpha=alpha, targets=tuple(targets))
    return net


def merge_lora(net: MMDiT):
    """Fold every LoRA update into its base weight (for export); the output is unchanged."""
    _replace_linears(net, lambda n, m: isinstance(m, LoRALinear), lambda m: m.merged())
    net.lora = None
    return net


def dead_lr_params(net: MMDiT):
    """LR-stream parameters that never get a gradient (ARCH §3.3): the last block's LR output
    projections (the LR tokens are dropped after it) and, in v1 mode, every k_control (the LR
    keys come from the image keys). They are frozen: DDP must not wait for their gradients."""
    last = f"joint_blocks.{net.cfg.depth - 1}.x_block."
    return [n for n, _ in net.named_parameters()
            if (n.startswith(last) and ".out_control." in n)
            or (net.cfg.lr_key_mode == "v1" and ".k_control." in n)]


def set_trainable(net: MMDiT, teacher_time_scale: float = 1000.0) -> int:
    """MFSR's trainable set, all else frozen: LR-stream control layers, LoRA, the s-embedder, and the
    t-embedder if the student's time scale differs from the teacher's. Returns its parameter count."""
    train_t = net.cfg.time_scale != teacher_time_scale
    dead = set(dead_lr_params(net))
    for name, p in net.named_parameters():
        p.requires_grad_(name not in dead and (
            "control" in name or "lora_" in name or name.startswith("s_embedder.")
            or (train_t and name.startswith("t_embedder."))))
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


# --------------------------------------------------------------------------------------------
# DiT4SR's teacher from SD3.5, MFSR's student from the teacher


def add_lr_stream(net: MMDiT) -> MMDiT:
    """SD3.5 -> DiT4SR teacher in place: the base weights plus fresh LR-stream control layers
    (zero-initialised where DiT4SR zero-initialises). Frozen base weights are not copied."""
    assert not net.cfg.lr_stream, "the model already has the LR stream"
    net.cfg = replace(net.cfg, lr_stream=True)
    for blk in net.joint_blocks:
        blk.cfg = net.cfg
        for layer in list(blk.x_block.children()):     # attn, attn2 if dual, mlp: in this order
            if isinstance(layer, (SelfAttention, Mlp)):
                layer.add_control()
    return net


def make_student(teacher: MMDiT, time_scale: float = 1.0, lora_rank: int = 64,
                 lora_alpha: float | None = None, time_cutoff: float = 0.0) -> MMDiT:
    """MFSR Alg. 1 lines 1-2: the student is the teacher plus an s-embedder and LoRA, both zero at
    init (so with the teacher's time_scale it equals the teacher for every s; with a time_cutoff, the
    low-passed teacher). Frozen weights are shared with the teacher; the ones the student trains
    are cloned, so the teacher stays fixed."""
    cfg = replace(teacher.cfg, two_times=True, time_scale=time_scale, time_cutoff=time_cutoff)
    w = next(teacher.parameters())
    new_t = time_scale != teacher.cfg.time_scale
    sd = {k: v.detach().clone() if "control" in k or (new_t and k.startswith("t_embedder.")) else v.detach()
          for k, v in teacher.state_dict().items()}
    with torch.device(w.device):
        s_emb = TimestepEmbedder(cfg.hidden).to(w.dtype)
    nn.init.zeros_(s_emb.mlp[2].weight)
    nn.init.zeros_(s_emb.mlp[2].bias)
    sd.update({"s_embedder." + k: v for k, v in s_emb.state_dict().items()})
    with torch.device("meta"):
        student = MMDiT(cfg)
    student.load_state_dict(sd, assign=True)
    add_lora(student, lora_rank, lora_alpha)
    set_trainable(student, teacher_time_scale=teacher.cfg.time_scale)
    return student


# --------------------------------------------------------------------------------------------
# Safetensors files (shared with vae.py and the programs)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: the message names the file and what is wrong."""


class SafetensorsFiles:
    """The tensors of one .safetensors file, a sharded index, or a folder (one .safetensors file or an
    index json; its `subfolder`, e.g. diffusers' "transformer" or "vae", if it has one): names, shapes,
    reads. `prefix`: when some keys start with it, only those are seen, without it (an SD3.5 single
    file holds `model.diffusion_model.*` beside `first_stage_model.*`)."""

    def __init__(self, path, subfolder=None, prefix=None):
        self.path = path
        where, self.metadata = {}, {}
        for f in self._resolve(path, subfolder):
            try:
                h = safe_open(f, framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own error types for corrupt files
                raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from None
            self.metadata.update(h.metadata() or {})
            where.update({k: h for k in h.keys()})
        self.prefix = prefix if prefix and any(k.startswith(prefix) for k in where) else ""
        self.where = {k[len(self.prefix):]: h for k, h in where.items() if k.startswith(self.prefix)}
        self.all_keys = list(where)

    @staticmethod
    def _resolve(path, subfolder):
        if not os.path.exists(path):
            raise CheckpointError(f"{path}: no such file or folder")
        if os.path.isdir(path):
            if subfolder and os.path.isdir(os.path.join(path, subfolder)):
                return SafetensorsFiles._resolve(os.path.join(path, subfolder), None)
            index = sorted(f for f in os.listdir(path) if f.endswith(".safetensors.index.json"))
            if index:
                return SafetensorsFiles._resolve(os.path.join(path, index[0]), None)
            st = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
            if len(st) != 1:
                raise CheckpointError(f"{path}: expected one .safetensors file or an index json, found {st or 'none'}")
            return [os.path.join(path, st[0])]
        if path.endswith(".index.json"):
            try:
                with open(path) as f:
                    shards = sorted(set(json.load(f)["weight_map"].values()))
            except (ValueError, KeyError) as e:
                raise CheckpointError(f"{path}: not a safetensors index ({e})") from None
            return [os.path.join(os.path.dirname(path), s) for s in shards]
        if not path.endswith(".safetensors"):
            raise CheckpointError(f"{path}: only .safetensors checkpoints are read (pickled .pt/.ckpt/"
                                  f".bin files can run code when loaded); convert it first")
        return [path]

    def __contains__(self, key):
        return key in self.where

    def keys(self):
        return list(self.where)

    def shape(self, key):
        return tuple(self.where[key].get_slice(self.prefix + key).get_shape())

    def get(self, key):
        return self.where[key].get_tensor(self.prefix + key)

    def config(self, name):
        """A JSON config stored in the metadata by this project's `save_*` functions, or {}."""
        return json.loads(self.metadata.get(name, "{}"))


def check_keys(path, expected, found, what):
    """expected/found: {key: shape}. Raise a CheckpointError that lists what differs."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    misshapen = [f"{k}: file {tuple(found[k])} vs model {tuple(expected[k])}"
                 for k in expected if k in found and tuple(found[k]) != tuple(expected[k])]
    if missing or unexpected or misshapen:
        lines = [f"{path}: checkpoint does not match {what}"]
        for label, items in (("missing", missing), ("unexpected", unexpected), ("misshapen", misshapen)):
            if items:
                more = f" ... and {len(items) - 8} more" if len(items) > 8 else ""
                lines.append(f"  {label} ({len(items)}): " + ", ".join(items[:8]) + more)
        raise CheckpointError("\n".join(lines))


def atomic_save(tensors, path, metadata):
    """save_file to a temporary name beside `path`, then rename: never a half-written file. The
    file gets the permissions of any file the user makes (0666 less the umask); safetensors alone
    writes 0600."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        save_file(tensors, tmp, metadata=metadata)
        mask = os.umask(0)      # reading the umask means setting it; set it straight back
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# --------------------------------------------------------------------------------------------
# The transformer's key layouts, its loader and writer


PREFIX = "model.diffusion_model."
_QKV = lambda a, names: [f"{a}.{n}." for n in names]
_BLOCK_RULES = [  # (original suffix, diffusers suffix, or 3 suffixes that concatenate into qkv)
    ("x_block.adaLN_modulation.1.", "norm1.linear."),
    ("context_block.adaLN_modulation.1.", "norm1_context.linear."),
    ("x_block.attn.qkv.", _QKV("attn", ("to_q", "to_k", "to_v"))),
    ("context_block.attn.qkv.", _QKV("attn", ("add_q_proj", "add_k_proj", "add_v_proj"))),
    ("x_block.attn.ln_q.", "attn.norm_q."), ("x_block.attn.ln_k.", "attn.norm_k."),
    ("context_block.attn.ln_q.", "attn.norm_added_q."), ("context_block.attn.ln_k.", "attn.norm_added_k."),
    ("x_block.attn.proj.", "attn.to_out.0."), ("context_block.attn.proj.", "attn.to_add_out."),
    ("x_block.attn2.qkv.", _QKV("attn2", ("to_q", "to_k", "to_v"))),
    ("x_block.attn2.ln_q.", "attn2.norm_q."), ("x_block.attn2.ln_k.", "attn2.norm_k."),
    ("x_block.attn2.proj.", "attn2.to_out.0."),
    ("x_block.mlp.fc1.", "ff.net.0.proj."), ("x_block.mlp.fc2.", "ff.net.2."),
    ("context_block.mlp.fc1.", "ff_context.net.0.proj."), ("context_block.mlp.fc2.", "ff_context.net.2."),
    ("x_block.mlp.control_conv.", "ff.control_conv."),
] + [(f"x_block.{a}.{n}_control.", f"{a}.to_{n}_control.")
     for a in ("attn", "attn2") for n in ("q", "k", "v", "out")]
_GLOBAL_RULES = [
    ("pos_embed", "pos_embed.pos_embed"),
    ("x_embedder.proj.", "pos_embed.proj."),
    ("t_embedder.mlp.0.", "time_text_embed.timestep_embedder.linear_1."),
    ("t_embedder.mlp.2.", "time_text_embed.timestep_embedder.linear_2."),
    ("s_embedder.mlp.0.", "time_text_embed.s_embedder.linear_1."),   # MFSR student (ours)
    ("s_embedder.mlp.2.", "time_text_embed.s_embedder.linear_2."),
    ("y_embedder.mlp.0.", "time_text_embed.text_embedder.linear_1."),
    ("y_embedder.mlp.2.", "time_text_embed.text_embedder.linear_2."),
    ("context_embedder.", "context_embedder."),
    ("final_layer.adaLN_modulation.1.", "norm_out.linear."),
    ("final_layer.linear.", "proj_out."),
]
# DiT4SR's attn2 was built with text projections it never uses (ARCH §3.5): 130 tensors, dropped.
DIT4SR_UNUSED = re.compile(r"transformer_blocks\.\d+\.attn2\.(add_[qkv]_proj|to_add_out|norm_added_[qk])\.")


def to_diffusers_name(key, depth):
    """Original key -> (diffusers keys, how): how is 'copy', 'qkv' (3 row blocks) or 'swap'
    (halves (shift, scale) <-> (scale, shift): the last context adaLN and the final layer)."""
    m = re.match(r"joint_blocks\.(\d+)\.(.*)", key)
    rules, rest, head = (_BLOCK_RULES, m.group(2), f"transformer_blocks.{m.group(1)}.") if m \
        else (_GLOBAL_RULES, key, "")
    for orig, diff in rules:
        if rest.startswith(orig):
            tail = rest[len(orig):]
            if isinstance(diff, list):
                return [head + d + tail for d in diff], "qkv"
            swap = (key.startswith("final_layer.adaLN") or
                    (m and int(m.group(1)) == depth - 1 and orig.startswith("context_block.adaLN")))
            return [head + diff + tail], "swap" if swap else "copy"
    raise KeyError(f"no diffusers name for {key}")


def swap_halves(t):
    """(shift, scale) rows <-> (scale, shift): diffusers' order for the last adaLN layers."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def to_diffusers_state_dict(sd, depth):
    """An original-layout state dict (no prefix) -> the diffusers layout (qkv split in three)."""
    out = {}
    for key, t in sd.items():
        names, how = to_diffusers_name(key, depth)
        parts = t.chunk(3, dim=0) if how == "qkv" else [swap_halves(t) if how == "swap" else t]
        out.update({n: p.clone() if how == "qkv" else p for n, p in zip(names, parts)})
    return out


# --------------------------------------------------------------------------------------------
# Loading and saving


class _Source(SafetensorsFiles):
    """A transformer checkpoint: SD3.5 single file (its `model.diffusion_model.*` part), a
    diffusers folder (`transformer/`), a file; `layout` is "original" or "diffusers"."""

    def __init__(self, path):
        super().__init__(path, subfolder="transformer", prefix=PREFIX)
        if self.prefix or any(k.startswith("joint_blocks.") for k in self.where):
            self.layout = "original"
        elif any(k.startswith("transformer_blocks.") for k in self.where):
            self.layout = "diffusers"
        else:
            some = ", ".join(self.all_keys[:3]) or "nothing"
            raise CheckpointError(f"{path}: no SD3/MMDiT transformer keys found (neither 'joint_blocks.*' nor "
                                  f"'transformer_blocks.*'; the file starts with: {some})")


def _infer_config(src: _Source) -> MMDiTConfig:
    """The config a file's shapes and keys tell (ARCH §2.1); keys are asked for by original-layout names."""
    name = (lambda k: k) if src.layout == "original" else (lambda k: to_diffusers_name(k, 0)[0][0])
    shape = lambda k: src.shape(name(k))
    try:
        hidden, in_ch, patch, _ = shape("x_embedder.proj.weight")
        pos_rows, ctx_dim = shape("pos_embed")[1], shape("context_embedder.weight")[1]
        pooled = shape("y_embedder.mlp.0.weight")[1]
    except KeyError as e:
        raise CheckpointError(f"{src.path}: missing {e} needed to read the model size") from None
    block = r"joint_blocks\.(\d+)\." if src.layout == "original" else r"transformer_blocks\.(\d+)\."
    blocks = sorted({int(m.group(1)) for k in src.where if (m := re.match(block, k))})
    has = lambda k: name(k) in src.where
    qk = has("joint_blocks.0.x_block.attn.ln_q.weight")
    head_dim = shape("joint_blocks.0.x_block.attn.ln_q.weight")[0] if qk else 64
    return MMDiTConfig(
        depth=len(blocks), heads=hidden // head_dim, head_dim=head_dim, patch=patch, in_channels=in_ch,
        pos_grid=math.isqrt(pos_rows), context_dim=ctx_dim, pooled_dim=pooled, qk_norm=qk,
        dual_layers=tuple(i for i in blocks if has(f"joint_blocks.{i}.x_block.attn2.qkv.weight")),
        lr_stream=any("control" in k for k in src.where), two_times=has("s_embedder.mlp.0.weight"))


def checkpoint_config(path, **overrides):
    """(config, source) of a transformer file, without reading a weight: the config from its shapes,
    then the fields shapes cannot tell that save_transformer recorded, then `overrides`."""
    src = _Source(path)
    known = {f.name for f in fields(MMDiTConfig)}
    if set(overrides) - known:
        raise TypeError(f"unknown config overrides {sorted(set(overrides) - known)}; known: {sorted(known)}")
    saved = src.config("mfsr_config")
    told = {k: saved[k] for k in ("lr_key_mode", "ff_inject", "time_scale", "time_cutoff", "prediction") if k in saved}
    return replace(_infer_config(src), **{**told, **overrides}), src


def load_transformer(path, *, dtype=torch.float32, device="cpu", **overrides) -> MMDiT:
    """Load any supported transformer checkpoint; the config is read from its shapes and keys.

    path: an SD3.5 single file (`model.diffusion_model.*`; VAE and text encoders beside it are
    ignored), a diffusers transformer (.safetensors, or a folder, sharded or not, or its parent
    with `transformer/`), a DiT4SR transformer (diffusers layout with `*control*` keys), or a file
    written by `save_transformer`. overrides: config fields a file cannot tell, e.g.
    lr_key_mode="r1" or time_scale=1.0. Tensors are cast to `dtype` (files mix fp16 and fp32).
    """
    cfg, src = checkpoint_config(path, **overrides)
    lora = src.config("lora")       # None or {} without LoRA
    with torch.device("meta"):
        net = MMDiT(cfg)
        if lora:
            add_lora(net, lora["rank"], lora["alpha"], lora["targets"])
    expected = net.state_dict()
    want = {k: v.shape for k, v in expected.items()}
    found = {k: src.shape(k) for k in src.where}
    if src.layout == "diffusers":
        if lora:
            raise CheckpointError(f"{path}: LoRA weights are only stored in the original layout")
        want = {k: v.shape for k, v in to_diffusers_state_dict(expected, cfg.depth).items()}
        found = {k: shape for k, shape in found.items() if not DIT4SR_UNUSED.match(k)}
    check_keys(path, want, found, f"the {src.layout}-layout model read from it ({cfg})")
    sd = {}
    for key in expected:
        names, how = to_diffusers_name(key, cfg.depth) if src.layout == "diffusers" else ([key], "copy")
        parts = [src.get(k).to(dtype) for k in names]
        sd[key] = torch.cat(parts) if how == "qkv" else (swap_halves(parts[0]) if how == "swap" else parts[0])
    net.load_state_dict(sd, assign=True)
    net.sampling = src.config("mfsr_sampling")   # e.g. {"tile": 32, "tile_overlap": 12, "cfg": 1.25}: see sample.py
    return net.to(device)


def save_transformer(net: MMDiT, path, layout="original"):
    """Write a safetensors file atomically in the "original" layout (SD3.5's `model.diffusion_model.*`,
    loadable by SD3.5 tools if the model has no added parts) or the "diffusers" (DiT4SR's) one. The
    config, LoRA settings and `net.sampling` (if set) go into the metadata."""
    sd = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    lora = getattr(net, "lora", None)
    if layout == "original":
        sd = {PREFIX + k: v for k, v in sd.items()}
    elif layout == "diffusers":
        if lora:
            raise ValueError("merge_lora(net) before a diffusers-layout export")
        sd = to_diffusers_state_dict(sd, net.cfg.depth)
    else:
        raise ValueError(f"layout must be 'original' or 'diffusers', got {layout!r}")
    meta = {"format": "mfsr-mmdit", "layout": layout, "mfsr_config": json.dumps(asdict(net.cfg)),
            "lora": json.dumps(lora)}
    if getattr(net, "sampling", None):   # the sampler settings it was trained for (sample.py defaults)
        meta["mfsr_sampling"] = json.dumps(net.sampling)
    atomic_save(sd, path, meta)
