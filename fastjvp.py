"""How to make a JVP through the transformer cheap: the fast paths of model.py, kept apart.

MFSR's target needs du/dt, a Jacobian-vector product of the student (mfsr.py, Eq. 8). PyTorch's
forward-mode AD computes it through any network of plain ops, and that is all the method needs:

    with fastjvp.plain():        # every fast path off: plain PyTorch ops, the same numbers
        out, tangent = torch.func.jvp(f, primals, tangents)

At full size the plain path is too slow and too large, for three reasons this file answers:

1. Attention. The fused SDPA kernels have no forward-AD formula, and the math backend that has one
   materialises the N x N scores for the primal and for the tangent. With P = softmax(S),
   S = s Q K^T (s = d^-1/2) and O = P V, the tangent is

       dS = s (dQ K^T + Q dK^T),   dO = P dV + (P * dS) V - rowsum(P * dS) O

   (the last term is the softmax's Jacobian). `attention_and_tangent` computes O and dO in one pass
   over blocks of query rows, so memory grows as N, not N^2. Two autograd Functions wrap it:
   JVPAttention (torch.func transforms, or a tangent that is trained: the primal by fused SDPA,
   the tangent by the rule) and DualAttention (forward-AD dual tensors whose tangent is detached,
   as in mfsr.py: one pass for both, backward from the saved O and log-sum-exp).
2. Linear layers. PyTorch's generic forward rule for F.linear also multiplies x by the weight's
   zero tangent; `linear` computes only dx W^T.
3. The MLP's 4x-wide hidden layers, each with a tangent beside it, are the largest activations of
   the JVP; `mlp_band_rows` tells model.py to run the MLPs over bands of image rows.

Switches (context managers): `plain()` turns all of it off; `detached_tangents()` promises that the
JVP's tangent output is detached, so the tangent rules need not be recorded for backward;
`compiled_jvp()` tells `attention` that the graph being compiled carries tangents.
"""
import contextlib

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn as nn
import torch.nn.functional as F

ATTN_CHUNK_ELEMENTS = 2 ** 20  # size of one (B, H, chunk, N) score block in the JVP paths
MLP_CHUNK_ELEMENTS = 2 ** 21   # size of one (B, rows * w, 4 D) MLP hidden band in the JVP

# --------------------------------------------------------------------------------------------
# Switches

_SWITCHES = {"plain": False, "compiled_jvp": False, "detached_tangents": False}


@contextlib.contextmanager
def _switch(name):
    prev, _SWITCHES[name] = _SWITCHES[name], True
    try:
        yield
    finally:
        _SWITCHES[name] = prev


def plain():
    """Every fast path off: attention is softmax(s Q K^T) V in plain ops, linears are F.linear,
    the MLPs run over all rows at once. The tutorial path; the same numbers up to rounding."""
    return _switch("plain")


def compiled_jvp():
    """Tell `attention` that the graph being compiled carries tangents. Tensor wrappers cannot be
    inspected while dynamo traces, so code that compiles a JVP says so; attention then takes the
    plain-ops chunked path, which forward AD and the compiler both go through."""
    return _switch("compiled_jvp")


def detached_tangents():
    """Promise that the JVP's tangent output will be detached: the tangent rules then run without
    recording for backward. In a grad-enabled JVP (mfsr's "fused" mode) autograd would otherwise
    keep every (chunk, N) probability block of the tangent for a backward that never comes.
    Gradients through the tangent would be wrong inside this context, which is why it is opt-in."""
    return _switch("detached_tangents")


def _tangent_recording():
    """The grad mode for computing a tangent by hand: off inside detached_tangents."""
    return torch.no_grad() if _SWITCHES["detached_tangents"] else contextlib.nullcontext()


def has_tangent(x):
    """True inside torch.func transforms (jvp, grad, vmap) or with forward-AD dual tensors."""
    if torch._C._functorch.is_functorch_wrapped_tensor(x):
        return True
    return fwAD.unpack_dual(x).tangent is not None


# --------------------------------------------------------------------------------------------
# 1. Attention and its tangent


def plain_attention(q, k, v):
    """softmax(s Q K^T) V on (B, H, N, d), every op plain: forward AD differentiates it as is."""
    return torch.softmax((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5, dim=-1) @ v


def _query_chunk(q, k):
    """Query rows per chunk so that a score block stays under ATTN_CHUNK_ELEMENTS: O(N) memory."""
    B, H, _, _ = q.shape
    return max(1, ATTN_CHUNK_ELEMENTS // (B * H * k.shape[-2]))


def attention_and_tangent(q, k, v, dq, dk, dv, with_lse=False):
    """O = softmax(s Q K^T) V and dO (the rule in the module docstring), over chunks of query rows,
    never forming N x N. Six (chunk, N, d) products, two of them the primal's, all on views of the
    inputs (concatenating [K, dK] would cost more memory than it saves time). with_lse: also the
    rows' log-sum-exp, for the backward. Returns (O, dO, lse or None)."""
    scale, chunk = q.shape[-1] ** -0.5, _query_chunk(q, k)
    kt, dkt = k.transpose(-1, -2), dk.transpose(-1, -2)                         # (B, H, d, N)
    heads3 = lambda t: t.reshape(-1, *t.shape[-2:])        # (B, H, a, b) -> (B H, a, b), baddbmm's
    o, do = (q.new_empty(*q.shape[:-1], v.shape[-1]) for _ in range(2))
    acc = torch.promote_types(q.dtype, torch.float32)       # lse in fp32 for bf16, as SDPA's
    lse = q.new_empty(q.shape[:-1], dtype=acc) if with_lse else None
    for i in range(0, q.shape[-2], chunk):
        rows = slice(i, i + chunk)
        qc, dqc = q[..., rows, :] * scale, dq[..., rows, :] * scale
        s = qc @ kt                                                             # (B, H, c, N)
        p = torch.softmax(s, dim=-1)
        if with_lse:     # log sum_j exp(s_j) = s_j - log p_j for any j; the row maximum is safest
            lse[..., rows] = s.amax(-1).to(acc) - p.amax(-1).to(acc).log()
        del s
        pds = dqc @ kt                             # dS: dQ K^T, + Q dK^T in place, then * P
        # (in-place ops escape autocast: the operands are cast to the block's dtype by hand)
        pds.view(-1, *pds.shape[-2:]).baddbmm_(heads3(qc).to(pds.dtype), heads3(dkt).to(pds.dtype))
        pds.mul_(p)                                                             # P * dS
        o[..., rows, :] = p @ v
        do[..., rows, :] = torch.addcmul((p @ dv).add_(pds @ v), pds.sum(-1, keepdim=True),
                                         o[..., rows, :], value=-1)
        del p, pds           # before the next chunk's scores: two blocks fewer at the peak
    return o, do, lse


# PyTorch's CPU flash-attention backward (torch >= 2.3): gradients from a saved O and log-sum-exp
_FLASH_CPU_BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def _attention_grads(q, k, v, go, o=None, lse=None):
    """Gradients of softmax(s Q K^T) V w.r.t. q, k, v: on the CPU with O and its log-sum-exp saved,
    the fused flash backward directly; otherwise the fused SDPA forward recomputed with autograd."""
    if o is not None and q.device.type == "cpu" and _FLASH_CPU_BACKWARD is not None:
        return _FLASH_CPU_BACKWARD(go, q, k, v, o, lse, 0.0, False)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    with torch.enable_grad():
        out = F.scaled_dot_product_attention(q, k, v)
    return torch.autograd.grad(out, (q, k, v), go)


def attention_chunked(q, k, v):
    """softmax(s Q K^T) V in plain ops over query chunks, memory O(chunk * N): the JVP path inside
    a compiled graph (dynamo ignores the custom jvp rule of JVPAttention)."""
    chunk = _query_chunk(q, k)
    return torch.cat([plain_attention(q[..., i:i + chunk, :], k, v) for i in range(0, q.shape[-2], chunk)], dim=-2)


class JVPAttention(torch.autograd.Function):
    """Fused SDPA for the primal, the chunked rule for the tangent, recomputation for backward
    (only q, k, v saved)."""
    generate_vmap_rule = True

    @staticmethod
    def forward(q, k, v):
        return F.scaled_dot_product_attention(q, k, v)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)
        ctx.save_for_forward(*inputs)

    @staticmethod
    def jvp(ctx, dq, dk, dv):
        q, k, v = ctx.saved_tensors
        dq, dk, dv = (torch.zeros_like(p) if t is None else t for p, t in ((q, dq), (k, dk), (v, dv)))
        with _tangent_recording():
            return attention_and_tangent(q, k, v, dq, dk, dv)[1]

    @staticmethod
    def backward(ctx, do):
        return _attention_grads(*ctx.saved_tensors, do)


class DualAttention(torch.autograd.Function):
    """Attention and its tangent from one chunked pass, for dual tensors whose tangent is not
    trained. Backward from the saved O and log-sum-exp, without recomputing the primal; the
    tangent output gets no gradient."""

    @staticmethod
    def forward(ctx, q, k, v, dq, dk, dv):
        train = any(ctx.needs_input_grad[:3])
        o, do, lse = attention_and_tangent(q, k, v, dq, dk, dv, with_lse=train)
        if train:
            ctx.save_for_backward(q, k, v, o, lse)
        ctx.mark_non_differentiable(do)
        return o, do

    @staticmethod
    def backward(ctx, go, _):
        q, k, v, o, lse = ctx.saved_tensors
        return *_attention_grads(q, k, v, go, o, lse), None, None, None


def _dual_attention(q, k, v):
    """`attention` on dual tensors: unpack, one DualAttention pass, pack the result."""
    (q, dq), (k, dk), (v, dv) = (fwAD.unpack_dual(t) for t in (q, k, v))
    o, do = DualAttention.apply(q, k, v, *(torch.zeros_like(p) if t is None else t
                                            for p, t in ((q, dq), (k, dk), (v, dv))))
    return fwAD.make_dual(o, do)


def _auto_mode(q, k, v):
    if _SWITCHES["plain"]:
        return "plain"
    if torch.compiler.is_compiling():
        return "chunked" if _SWITCHES["compiled_jvp"] else "sdpa"
    if any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in (q, k, v)):
        return "function"
    if any(fwAD.unpack_dual(t).tangent is not None for t in (q, k, v)):
        untrained = not torch.is_grad_enabled() or _SWITCHES["detached_tangents"]
        return "dual" if untrained else "function"
    return "sdpa"


def attention(q, k, v, mode="auto"):
    """Multi-head attention softmax(s Q K^T) V on (B, H, N, d) tensors, the one call model.py makes.
    mode: auto | sdpa | dual | function | chunked | math | plain. auto: fused SDPA without tangents;
    dual tensors whose tangent is not trained: DualAttention; other tangents (torch.func, a trained
    tangent): JVPAttention; compiling a JVP: the chunked plain-ops path; inside plain(): plain."""
    mode = _auto_mode(q, k, v) if mode == "auto" else mode
    if mode == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    if mode == "dual":
        return _dual_attention(q, k, v)
    if mode == "function":
        return JVPAttention.apply(q, k, v)
    if mode == "chunked":
        return attention_chunked(q, k, v)
    if mode == "plain":
        return plain_attention(q, k, v)
    if mode == "math":
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v)
    raise ValueError(f"unknown attention mode {mode!r}")


# --------------------------------------------------------------------------------------------
# 2. Linear layers


def linear(x, w, b=None):
    """F.linear with its own forward-mode rule under torch.autograd.forward_ad (what mfsr.py uses):
    the tangent is dx W^T, one product; PyTorch's generic rule also multiplies x by the weight's
    zero tangent. Plain F.linear everywhere else (plain(), torch.func, compiling, no dual input)."""
    if (_SWITCHES["plain"] or torch.compiler.is_compiling()
            or torch._C._functorch.is_functorch_wrapped_tensor(x)):
        return F.linear(x, w, b)
    xp, dx = fwAD.unpack_dual(x)
    if dx is None or fwAD.unpack_dual(w).tangent is not None:
        return F.linear(x, w, b)
    with _tangent_recording():
        dy = F.linear(dx, w)
    return fwAD.make_dual(F.linear(xp, w, b), dy)


class Linear(nn.Linear):
    """nn.Linear (same parameters and keys) through `linear`, for its cheaper forward-mode rule."""

    def forward(self, x):
        return linear(x, self.weight, self.bias)


# --------------------------------------------------------------------------------------------
# 3. The MLP in bands of rows


def mlp_band_rows(x, h, w, hidden):
    """How many of the h image rows (w tokens each) one MLP band holds: all of them normally; under
    a JVP (a tangent beside every activation) as many as keep a (B, rows * w, hidden) band under
    MLP_CHUNK_ELEMENTS. The result is the same up to rounding."""
    if _SWITCHES["plain"] or torch.compiler.is_compiling() or not has_tangent(x):
        return h
    return max(1, MLP_CHUNK_ELEMENTS // (x.shape[0] * w * hidden))
