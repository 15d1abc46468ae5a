"""The SD3.5 MMDiT-X transformer, DiT4SR's LR stream, and the MFSR two-time student.

    from model import CONFIGS, MMDiT, make_student
    net = MMDiT(CONFIGS["tiny"])                                 # a random teacher at CPU size
    v = net(x, sigma, pooled, context, lr=z_lr)                  # SD3 convention: eps - x0
    student = make_student(net)                                  # MFSR Alg. 1 lines 1-2

Follows Stability-AI's single-file reference (mmditx.py) for the architecture and the parameter
names, so `state_dict()` keys are those of the released checkpoints; DiT4SR (Duan et al., ICCV 2025)
for the LR stream; MFSR (§4.2, §4.4) for the s-embedder and the time scale. Facts, key maps and
shapes: reference/ARCHITECTURE.md (§2 MMDiT, §3 LR stream), cited as "ARCH §x".

Conventions of this file (the SD3 ones; mfsr.py converts to the paper's t = 1 - sigma once):
x_sigma = (1 - sigma) x0 + sigma eps, sigma = 1 is noise, the network predicts eps - x0 and sees
the time as `time_scale * sigma` (1000 for SD3.5 and DiT4SR, 1 for the MFSR student).
Token layout: image tokens X (B, K, D), LR tokens L (B, K, D), text tokens C (B, M, D).

The blocks are their equations in plain PyTorch ops, which forward-mode AD differentiates as they
are; `fastjvp.accelerate(net)` swaps fast kernels, JVP rules and leaner memory in, with the same
numbers. Checkpoint files (SD3.5, diffusers, DiT4SR layouts): plumbing/checkpoints.py.
"""
import math
from collections import namedtuple
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

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
# Building blocks (names as in mmditx.py)


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):   # x / rms(x) * weight: statistics in >= fp32, the result in x's dtype
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight.to(x.dtype)


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


def autocasting(x):   # whether autocast is on for x's device (the meta device has none)
    return torch.amp.is_autocast_available(x.device.type) and torch.is_autocast_enabled(x.device.type)


class TimeLinear(nn.Linear):
    """A Linear of the time path (t and s embedders, adaLN modulation), in fp32 under autocast: du/dt
    (Eq. 8) differentiates along t through it, and in bf16 many sinusoid features are constant over
    t in [0, 1] (c_noise = t): the forward would move in steps under a smooth JVP. Without autocast
    it runs in the weight's dtype, like any layer (sample.py --dtype bf16)."""

    def forward(self, x):
        if not autocasting(x):
            return F.linear(x.to(self.weight.dtype), self.weight, self.bias)
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.float(), self.weight.float(), None if self.bias is None else self.bias.float())


class VectorEmbedder(nn.Module):
    def __init__(self, in_dim, hidden):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, y):
        return self.mlp(y)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden):
        super().__init__()                 # over timestep_embedding's 256 features, in fp32 (TimeLinear)
        self.mlp = nn.Sequential(TimeLinear(256, hidden), nn.SiLU(), TimeLinear(hidden, hidden))

    def forward(self, t, max_freq=None):
        return self.mlp(timestep_embedding(t, max_freq=max_freq))


class PatchEmbed(nn.Module):
    def __init__(self, patch, in_channels, hidden):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden, patch, stride=patch)

    def forward(self, x):
        return rearrange(self.proj(x), "b d h w -> b (h w) d")                    # (B, K, D)


def sincos_pos_table(grid, dim):
    """(1, grid^2, dim): first half encodes the column, second the row; [sin, cos] each."""
    if torch.get_default_device().type == "meta":   # shapes only, a checkpoint fills it: ops on meta run
        return torch.empty(1, grid * grid, dim)      # torch's Python references, which import its compiler
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
        self.fc1 = nn.Linear(hidden, hidden * ratio)
        self.fc2 = nn.Linear(hidden * ratio, hidden)
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

    def forward(self, x):
        return self.fc2(self.hidden(x))


class SelfAttention(nn.Module):
    """qkv / ln_q / ln_k / proj as in mmditx.py; with `control`, DiT4SR's LR-stream layers."""

    def __init__(self, cfg, pre_only=False, control=False):
        super().__init__()
        D, self.heads = cfg.hidden, cfg.heads
        self.qkv = nn.Linear(D, 3 * D)
        if not pre_only:
            self.proj = nn.Linear(D, D)
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
        self.q_control, self.k_control, self.v_control = (nn.Linear(D, D, **kw) for _ in range(3))
        for p in (*self.q_control.parameters(), *self.k_control.parameters(), *self.v_control.parameters()):
            nn.init.zeros_(p)
        self.out_control = nn.Linear(D, D, **kw)

    def split_heads(self, x):   # q, k, v, each (B, H, N, d)
        return rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads).unbind(0)

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


# adaLN's shift, scale, gate per sub-layer (mmditx.py's names; msa2: MMDiT-X's attn2), None if absent
Modulation = namedtuple("Modulation", "shift_msa scale_msa gate_msa shift_mlp scale_mlp gate_mlp "
                                      "shift_msa2 scale_msa2 gate_msa2", defaults=(None,) * 7)


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
        self.n_mods = 2 if pre_only else (9 if dual else 6)    # the fields of Modulation it has
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), TimeLinear(D, self.n_mods * D))

    def modulation(self, c):
        return Modulation(*self.adaLN_modulation(c).chunk(self.n_mods, dim=-1))

    def post_attention(self, x, o, m):
        """The text stream's gated residual updates from its attention rows o and its MLP (mmditx.py's)."""
        x = x + m.gate_msa.unsqueeze(1) * self.attn.proj(o)
        return x + m.gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), m.shift_mlp, m.scale_mlp))


class JointBlock(nn.Module):
    """The image stream X (with DiT4SR's LR stream L beside it) and the text stream C: one joint
    attention over all their tokens, then an MLP per stream."""

    def __init__(self, cfg, index):
        super().__init__()
        self.cfg = cfg
        self.context_block = DismantledBlock(cfg, pre_only=index == cfg.depth - 1)
        self.x_block = DismantledBlock(cfg, dual=index in cfg.dual_layers, control=cfg.lr_stream)

    def forward(self, x, lr, ctx, c, grid):
        m, c_m = self.x_block.modulation(c), self.context_block.modulation(c)
        x, lr, o_c = self.attend(x, lr, ctx, m, c_m)
        x, lr = self.image_mlp(x, lr, m, grid)
        ctx = None if self.context_block.pre_only else self.context_block.post_attention(ctx, o_c, c_m)
        return x, lr, ctx

    @staticmethod
    def attention(q, k, v):
        """softmax(s Q K^T) V on (B, H, N, d), s = d^-1/2, in plain ops that forward AD differentiates
        (the fused SDPA kernels have no forward-AD rule: fastjvp.JointBlock brings them and one)."""
        return torch.softmax((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5, dim=-1) @ v

    def attend(self, x, lr, ctx, m, c_m):
        """The joint attention over [X ; L ; C] and, in an MMDiT-X block, the image-only attn2 over
        [X ; L] from the same normalised inputs."""
        xb, cb = self.x_block, self.context_block
        nx, nl = xb.norm1(x), None if lr is None else xb.norm1(lr)
        text = cb.attn.qkv_x(modulate(cb.norm1(ctx), c_m.shift_msa, c_m.scale_msa))       # C's q, k, v
        x, lr, o_c = self.image_attention(xb.attn, x, lr, nx, nl, m.shift_msa, m.scale_msa, m.gate_msa, text)
        if xb.dual:
            x, lr, _ = self.image_attention(xb.attn2, x, lr, nx, nl, m.shift_msa2, m.scale_msa2, m.gate_msa2)
        return x, lr, o_c

    def image_attention(self, attn, x, lr, nx, nl, shift, scale, gate, text=None):
        """One attention over the rows [X ; L ; C] (L with the LR stream, C when `text` gives its
        q, k, v): the gated residual updates of X and L, and C's rows of the output."""
        qkv = [attn.qkv_x(modulate(nx, shift, scale))]                  # X: q, k, v, each (B, H, K, d)
        if lr is not None:
            la = modulate(nl, shift, scale)
            qkv.append(attn.qkv_lr(la, qkv[0][1], self.cfg.lr_key_mode))  # L: (B, H, K, d) each
        if text is not None:
            qkv.append(text)                                            # C: (B, H, M, d) each
        q, k, v = (torch.cat(rows, dim=2) for rows in zip(*qkv))        # (B, H, N, d), N = K + K + M
        o = rearrange(self.attention(q, k, v), "b h n d -> b n (h d)")  # (B, N, D)
        o = o.split([q_.shape[2] for q_, _, _ in qkv], dim=1)           # back into X, L, C rows
        x = x + gate.unsqueeze(1) * attn.proj(o[0])
        if lr is not None:  # the modulated LR input is added back before out_control (ARCH §3.3)
            lr = lr + gate.unsqueeze(1) * attn.out_control(o[1] + la)
        return x, lr, o[-1] if text is not None else None

    def image_mlp(self, x, lr, m, grid):
        """The MLP of X and of L (the same weights); DiT4SR injects L's hidden layer into X's through
        a depthwise 3x3 conv over the token grid, times ff_inject (ARCH §3.4)."""
        mlp, gate = self.x_block.mlp, m.gate_mlp.unsqueeze(1)
        norm = lambda t: modulate(self.x_block.norm2(t), m.shift_mlp, m.scale_mlp)   # noqa: E731
        if lr is None:
            return x + gate * mlp(norm(x)), None
        h_x, h_lr = mlp.hidden(norm(x)), mlp.hidden(norm(lr))                      # (B, K, 4D) each
        conv = mlp.control_conv(rearrange(h_lr, "b (h w) c -> b c h w", h=grid[0]))  # (B, 4D, h, w)
        h_x = h_x + self.cfg.ff_inject * rearrange(conv, "b c h w -> b (h w) c")   # (B, K, 4D)
        return x + gate * mlp.fc2(h_x), lr + gate * mlp.fc2(h_lr)


class FinalLayer(nn.Module):
    def __init__(self, hidden, patch, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, patch * patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), TimeLinear(hidden, 2 * hidden))

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
        self.context_embedder = nn.Linear(cfg.context_dim, D)
        self.joint_blocks = nn.ModuleList(JointBlock(cfg, i) for i in range(cfg.depth))
        self.final_layer = FinalLayer(D, cfg.patch, cfg.in_channels)
        if cfg.prediction == "x":   # output x - z_LR: untrained, the model predicts the LR latent
            nn.init.zeros_(self.final_layer.linear.weight)
            nn.init.zeros_(self.final_layer.linear.bias)
        self.grad_checkpointing = False  # recompute each block in backward (full-scale training)
        self.checkpoint_context = torch.utils.checkpoint.noop_context_fn   # its context_fn (see forward)

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
            raise ValueError("a two-time model needs sigma_s (B,)" if cfg.two_times else "this model has one time input")

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
                # backward recomputes the block on its forward's path: checkpoint_context restores
                # fastjvp's switches (compiled, the graph replays it; dynamo refuses such a context_fn)
                keep = {} if torch.compiler.is_compiling() else {"context_fn": self.checkpoint_context}
                x_tok, lr_tok, ctx = torch.utils.checkpoint.checkpoint(
                    block, x_tok, lr_tok, ctx, c, grid, use_reentrant=False, **keep)
            else:
                x_tok, lr_tok, ctx = block(x_tok, lr_tok, ctx, c, grid)
        out = self.final_layer(x_tok, c)                                          # (B, K, p*p*C)
        return rearrange(out, "b (h w) (p q c) -> b c (h p) (w q)",
                         h=grid[0], p=cfg.patch, q=cfg.patch)                      # (B, C, H, W)


# --------------------------------------------------------------------------------------------
# LoRA (MFSR App. B) and the trainable set

LORA_TARGETS = ("qkv", "proj", "fc1", "fc2")  # attention and MLP linears of both streams


class LoRALinear(nn.Linear):
    """W x + (alpha / rank) * up(down(x)), up zero at init; the replaced layer's `weight` / `bias` keys stay."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_down = nn.Linear(self.in_features, rank, bias=False, **kw)
        self.lora_up = nn.Linear(rank, self.out_features, bias=False, **kw)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.scale = alpha / rank

    def forward(self, x):
        return super().forward(x) + self.scale * self.lora_up(self.lora_down(x))

    def merged_weight(self):   # W + (alpha / rank) up down: one weight for the same map
        return torch.addmm(self.weight, self.lora_up.weight, self.lora_down.weight, alpha=self.scale)

    def merged(self) -> nn.Linear:
        lin = nn.Linear(self.in_features, self.out_features, device=self.weight.device, dtype=self.weight.dtype)
        lin.load_state_dict({"weight": self.merged_weight(), "bias": self.bias})   # copies, records nothing
        return lin


def _replace_linears(net, pick, make):
    for parent in list(net.joint_blocks.modules()):
        for name, child in list(parent.named_children()):
            if pick(name, child):
                setattr(parent, name, make(child))


def add_lora(net: MMDiT, rank: int = 64, alpha: float | None = None, targets=LORA_TARGETS):
    """Wrap the transformer blocks' linear layers named in `targets` with LoRA (zero at init)."""
    alpha = float(rank) if alpha is None else alpha
    _replace_linears(net, lambda n, m: isinstance(m, nn.Linear) and not isinstance(m, LoRALinear) and n in targets,
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
    projections (its LR tokens are dropped) and, in v1 mode, every k_control (the LR keys are the
    image keys). Kept frozen: trained, they would all-reduce zeros and take AdamW's decay."""
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
    """SD3.5 -> DiT4SR teacher in place: the base weights (not copied) plus new LR-stream control layers."""
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
    """MFSR Alg. 1 lines 1-2: the teacher plus an s-embedder and LoRA, both zero at init (with the
    teacher's time_scale, the teacher for every s). Frozen weights are shared, trained ones cloned."""
    cfg = replace(teacher.cfg, two_times=True, time_scale=time_scale, time_cutoff=time_cutoff)
    w = next(teacher.parameters())
    new_t, dead = time_scale != teacher.cfg.time_scale, set(dead_lr_params(teacher))   # dead ones stay shared
    sd = {k: v.detach().clone() if ("control" in k and k not in dead) or (new_t and k.startswith("t_embedder."))
          else v.detach() for k, v in teacher.state_dict().items()}
    s_emb = TimestepEmbedder(cfg.hidden).to(w.device, w.dtype)
    nn.init.zeros_(s_emb.mlp[2].weight)
    nn.init.zeros_(s_emb.mlp[2].bias)
    sd.update({"s_embedder." + k: v for k, v in s_emb.state_dict().items()})
    with torch.device("meta"):
        student = MMDiT(cfg)
    student.load_state_dict(sd, assign=True)
    add_lora(student, lora_rank, lora_alpha)
    set_trainable(student, teacher_time_scale=teacher.cfg.time_scale)
    return student
