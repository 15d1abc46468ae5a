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
2. Linear layers and RMSNorm. PyTorch's generic forward rules multiply x by the weight's zero
   tangent, and take RMSNorm op by op; `linear` computes only dx W^T, `rms_norm` one rule.
3. Memory. model.JointBlock's `attend` and `image_mlp` are the plain equations (q, k, v of the rows
   [X ; L ; C] concatenated, the MLPs over all rows at once). Inside `lean_memory()` (train.py runs
   in it; sample.py's latent tiles bound its memory) the block runs their twins `lean_attend` and
   `lean_image_mlp`: the same numbers, lower peaks. Each stream's q, k, v are freed once joined, and
   under a JVP the MLPs, whose 4x-wide hidden layers and their tangents are the largest activations,
   run over bands of image rows (`mlp_band_rows`, their size from a memory budget).

Switches (context managers): `plain()` turns all of it off; `detached_tangents()` promises that the
JVP's tangent output is detached, so the tangent rules need not be recorded for backward;
`compiled_jvp()` tells `attention` that the graph being compiled carries tangents (`func_jvp` is
the JVP torch.compile is given); `lean_memory()` takes the lean block. `forward_switches` keeps them
for an eager checkpointed block's recomputation.
"""
import contextlib

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

# Memory budgets in bytes of a JVP's blocks: a (B, H, chunk, N) block of attention scores, a
# (B, rows * w, 4 D) band of an MLP's hidden layer. A GPU launches a kernel per op (a few us each):
# there blocks as large as memory easily allows. At 512^2 (B = 5, 24 heads, 2,202 tokens) a chunk is
# 508 query rows, 5 an attention, 1.5 GB of fp32 blocks at once beside 5 GB of bf16 weights; a 1024^2
# image's hidden layer (503 MB) is one band. A CPU launches nothing (an op costs its arithmetic): a
# few MiB keep the JVP's peak that of a forward. "gpu": other devices, and meta (bench.py jvp_ops).
ATTN_BLOCK_BYTES = {"cpu": 2 ** 22, "gpu": 2 ** 29}
MLP_BAND_BYTES = {"cpu": 2 ** 23, "gpu": 2 ** 29}
_budget = lambda table, device: table["cpu" if device.type == "cpu" else "gpu"]   # noqa: E731


# --------------------------------------------------------------------------------------------
# Switches

_SWITCHES = {"plain": False, "compiled_jvp": False, "detached_tangents": False, "lean": False}


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


def lean_memory():
    """model.JointBlock through lean_attend and lean_image_mlp (section 3): the same numbers up to
    rounding, lower peak memory."""
    return _switch("lean")


def lean():
    """Whether model.JointBlock takes the lean path: inside lean_memory(), unless inside plain()."""
    return _SWITCHES["lean"] and not _SWITCHES["plain"]


def compiled_jvp():
    """Tell `attention` that the graph being compiled carries tangents. Tensor wrappers cannot be
    inspected while dynamo traces, so code that compiles a JVP says so; attention then takes the
    plain-ops chunked path, which forward AD and the compiler both go through."""
    return _switch("compiled_jvp")


def func_jvp(f, primals, tangents):
    """torch.func.jvp(f, primals, tangents) inside compiled_jvp(): the JVP to hand to torch.compile,
    forward and backward (train.py --compile uses it in place of mfsr.jvp: in a compiled graph the
    linear and attention rules mfsr.jvp's dual tensors are for give way to plain ops anyway).
    Inside detached_tangents() the tangent comes back detached, so the compiled backward is the
    primal's alone (with a tangent left trainable, inductor's backward fails on the CPU: it writes
    into an efficient zero tensor of the tangent's graph; docs/benchmarks.md)."""
    with compiled_jvp():
        out, tangent = torch.func.jvp(f, primals, tangents)
    return out, tangent.detach() if _SWITCHES["detached_tangents"] else tangent


def detached_tangents():
    """Promise that the JVP's tangent output will be detached: the tangent rules then run without
    recording for backward. In a grad-enabled JVP (mfsr's "fused" mode) autograd would otherwise
    keep every (chunk, N) probability block of the tangent for a backward that never comes.
    Gradients through the tangent would be wrong inside this context, which is why it is opt-in."""
    return _switch("detached_tangents")


@contextlib.contextmanager
def _switches_as(saved):
    prev = dict(_SWITCHES)
    _SWITCHES.update(saved)
    try:
        yield
    finally:
        _SWITCHES.update(prev)


def forward_switches():
    """torch.utils.checkpoint's context_fn: a block recomputed in backward runs with the switches its
    forward ran with (lean_memory(), plain(), ...), so it saves the same tensors wherever backward runs.
    Eager only: a compiled graph replays its traced path, and dynamo takes no such context_fn."""
    return contextlib.nullcontext(), _switches_as(dict(_SWITCHES))


def _tangent_recording():
    """The grad mode for computing a tangent by hand: off inside detached_tangents."""
    return torch.no_grad() if _SWITCHES["detached_tangents"] else contextlib.nullcontext()


def has_tangent(x):
    """True inside torch.func transforms (jvp, grad, vmap) or with forward-AD dual tensors."""
    return torch._C._functorch.is_functorch_wrapped_tensor(x) or fwAD.unpack_dual(x).tangent is not None


# --------------------------------------------------------------------------------------------
# 1. Attention and its tangent


def plain_attention(q, k, v):
    """softmax(s Q K^T) V on (B, H, N, d), every op plain: forward AD differentiates it as is."""
    return torch.softmax((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5, dim=-1) @ v


def autocasting(x):
    """Whether autocast is on for x's device (the meta device has none)."""
    kind = x.device.type
    return torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind)


def compute_dtype(x):
    """The dtype x's products run in: autocast's where it is on (it never casts fp64), else x's."""
    on = x.is_floating_point() and x.dtype != torch.float64 and autocasting(x)
    return torch.get_autocast_dtype(x.device.type) if on else x.dtype


def _query_chunk(q, k, dtype=None):
    """Query rows per chunk: a (B, H, chunk, N) score block of `dtype` (q's) within ATTN_BLOCK_BYTES."""
    row = q.shape[0] * q.shape[1] * k.shape[-2] * (dtype or q.dtype).itemsize    # B H N scores
    return max(1, _budget(ATTN_BLOCK_BYTES, q.device) // row)


def attention_and_tangent(q, k, v, dq, dk, dv, with_lse=False):
    """O = softmax(s Q K^T) V and dO (the rule in the module docstring), over chunks of query rows,
    never forming N x N. Six (chunk, N, d) products, two of them the primal's, all on views of the
    inputs (concatenating [K, dK] would cost more memory than it saves time). with_lse: also the
    rows' log-sum-exp, for the backward. Returns (O, dO, lse or None), O and dO in compute_dtype(q).
    Done once, not per chunk: the casts (autocast is off in the loop: it would cast all of K and dK
    for every chunk), the scale, the (B H, n, d) layout bmm takes."""
    dtype, kind = compute_dtype(q), q.device.type
    acc = torch.promote_types(dtype, torch.float32)         # the softmax's dtype, as SDPA's
    scale, chunk = q.shape[-1] ** -0.5, _query_chunk(q, k, acc)
    flat = lambda t: t.to(dtype).reshape(-1, *t.shape[-2:])                    # (B H, n, d)
    qs, dqs, v, dv = flat(q) * scale, flat(dq) * scale, flat(v), flat(dv)     # s Q, s dQ, V, dV
    kt, dkt = flat(k).transpose(1, 2), flat(dk).transpose(1, 2)                # (B H, d, N)
    o, do = (qs.new_empty(*qs.shape[:-1], v.shape[-1]) for _ in range(2))
    lse = qs.new_empty(qs.shape[:-1], dtype=acc) if with_lse else None
    with torch.autocast(kind, enabled=False) if autocasting(q) else contextlib.nullcontext():
        for i in range(0, qs.shape[1], chunk):
            rows = slice(i, i + chunk)
            qc = qs[:, rows]
            s = torch.bmm(qc, kt)                                               # (B H, c, N)
            p = torch.softmax(s, dim=-1, dtype=acc)
            if with_lse:   # log sum_j exp(s_j) = s_j - log p_j for any j; the row maximum is safest
                lse[:, rows] = s.amax(-1).to(acc) - p.amax(-1).log()
            del s
            p = p.to(dtype)
            pds = torch.bmm(dqs[:, rows], kt).baddbmm_(qc, dkt).mul_(p)   # P * dS, dS = dQ K^T + Q dK^T
            o[:, rows] = oc = torch.bmm(p, v)
            do[:, rows] = torch.addcmul(torch.bmm(p, dv).add_(torch.bmm(pds, v)), pds.sum(-1, keepdim=True),
                                        oc, value=-1)
            del p, pds       # before the next chunk's scores: two blocks fewer at the peak
    shape = q.shape[:-1]                                                       # back to (B, H, N, ...)
    return o.view(*shape, -1), do.view(*shape, -1), None if lse is None else lse.view(shape)


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
        q, k, v, o, lse = ctx.saved_tensors      # q, k, v, go cast as the forward cast (autocast)
        return *_attention_grads(*(t.to(o.dtype) for t in (q, k, v, go)), o, lse), None, None, None


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
# 2. Linear layers and RMSNorm: one tangent rule each


def _rule_applies(x, w):
    """(x's primal, tangent) where a hand rule applies (x a forward-AD dual, w without tangent, outside
    plain(), torch.func, compiling), else None: plain ops, PyTorch's generic rules."""
    if _SWITCHES["plain"] or torch.compiler.is_compiling() or torch._C._functorch.is_functorch_wrapped_tensor(x):
        return None
    xp, dx = fwAD.unpack_dual(x)
    return None if dx is None or fwAD.unpack_dual(w).tangent is not None else (xp, dx)


def linear(x, w, b=None):
    """F.linear; under forward AD its tangent is dx W^T, one product (the generic rule adds x dW^T, dW = 0)."""
    dual = _rule_applies(x, w)
    if dual is None:
        return F.linear(x, w, b)
    with _tangent_recording():
        dy = F.linear(dual[1], w)
    return fwAD.make_dual(F.linear(dual[0], w, b), dy)


def rms_norm(x, w, eps):
    """x / sqrt(mean(x^2) + eps) * w over the last dim, statistics in >= fp32, the result in x's dtype
    (an fp32 w under autocast would make q, k fp32). Its tangent by one rule: with n = x r and
    r = (mean(x^2) + eps)^-1/2, dn = r (dx - n mean(n dx)); the generic rules take 3x the ops."""
    dual = _rule_applies(x, w)
    xp, w = x if dual is None else dual[0], w.to(x.dtype)
    xf = xp.float() if xp.dtype in (torch.float16, torch.bfloat16) else xp
    r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    n = xf * r
    y = n.to(x.dtype) * w
    if dual is None:
        return y
    with _tangent_recording():
        dy = ((dual[1] - n * (n * dual[1]).mean(-1, keepdim=True)) * r).to(x.dtype) * w
    return fwAD.make_dual(y, dy)


class Linear(nn.Linear):
    """nn.Linear (same parameters and keys) through `linear`, for its cheaper forward-mode rule."""

    def forward(self, x):
        return linear(x, self.weight, self.bias)


# --------------------------------------------------------------------------------------------
# 3. Lean memory: model.JointBlock's attend and image_mlp with lower peaks (inside lean_memory())


def _modulate(x, shift, scale):
    """model.modulate (this file cannot import model.py, which imports it)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def lean_attend(block, x, lr, ctx, mods, c_mods, attn_mode):
    """block.attend: new X and L, and C's rows of the joint attention's output. Its `del`s free
    q, k, v and the normalised inputs as soon as they are dead."""
    xb, cb, key_mode = block.x_block, block.context_block, block.cfg.lr_key_mode
    nx, nl = xb.norm1(x), None if lr is None else xb.norm1(lr)
    text = cb.attn.qkv_x(_modulate(cb.norm1(ctx), c_mods[0], c_mods[1]))     # C's q, k, v
    q, k, v, la = _lean_qkv(xb.attn, nx, nl, *mods[:2], key_mode, text)
    del text
    o = attention(q, k, v, attn_mode)                                           # [X ; L ; C]
    del q, k, v                                 # freed before the second attention makes its own
    o = rearrange(o, "b h n d -> b n (h d)")                                   # (B, N, D)
    x2, lr2 = _lean_out(xb.attn, o, x, lr, la, mods[2])
    # C's rows, for its MLP (the last block has none): the rest of o can go
    o_c = None if cb.pre_only else o[:, -ctx.shape[1]:].clone()
    del o, la
    if xb.dual:  # MMDiT-X: image-only attention from the same normalised inputs, over [X ; L]
        shift2, scale2, gate2 = mods[6:9]
        q, k, v, la2 = _lean_qkv(xb.attn2, nx, nl, shift2, scale2, key_mode)
        del nx, nl
        o2 = attention(q, k, v, attn_mode)
        del q, k, v                             # freed before o2's (B, 2K, D) copy is made
        o2 = rearrange(o2, "b h n d -> b n (h d)")                             # (B, 2K, D)
        x2, lr2 = _lean_out(xb.attn2, o2, x2, lr2, la2, gate2)
    return x2, lr2, o_c


def _lean_qkv(attn, nx, nl, shift, scale, key_mode, text=None):
    """q, k, v over [X ; L] (L if nl is given) with the text's q, k, v appended, and la, the
    modulated LR input. Parts are freed once joined: only one of q, k, v is ever held twice."""
    q, k, v = attn.split_heads(_modulate(nx, shift, scale))
    parts, la = [[attn.ln_q(q)], [attn.ln_k(k)], [v]], None
    del q, k, v                 # from here only `parts` holds them
    if nl is not None:
        # v copied out of the (B, N, 3D) projection, which then goes before the LR one is made
        parts[2][0] = parts[2][0].contiguous()
        la = _modulate(nl, shift, scale)
        for part, t in zip(parts, attn.qkv_lr(la, parts[1][0], key_mode)):
            part.append(t)
        del part, t
    for part, t in zip(parts, text or ()):
        part.append(t)

    def join(part):
        out = torch.cat(part, 2) if len(part) > 1 else part[0]
        part.clear()
        return out
    return join(parts[0]), join(parts[1]), join(parts[2]), la


def _lean_out(attn, o, x, lr, la, gate):
    """Gated residual updates of X (and L) from the attention output o (B, N, D)."""
    K = x.shape[1]
    x = x + gate.unsqueeze(1) * attn.proj(o[:, :K])
    if lr is not None:  # LR residual: the modulated input is added back before out_control
        lr = lr + gate.unsqueeze(1) * attn.out_control(o[:, K:2 * K] + la)
    return x, lr


def mlp_band_rows(x, h, w, hidden):
    """How many of the h image rows (w tokens each) one MLP band holds: all of them normally; under
    a JVP (a tangent beside every activation) as many as keep a (B, rows * w, hidden) band under
    MLP_BAND_BYTES. The result is the same up to rounding."""
    if _SWITCHES["plain"] or torch.compiler.is_compiling() or not has_tangent(x):
        return h
    row = x.shape[0] * w * hidden * compute_dtype(x).itemsize
    return max(1, _budget(MLP_BAND_BYTES, x.device) // row)


def lean_image_mlp(block, x, lr, shift, scale, gate, grid):
    """block.image_mlp over bands of image rows (mlp_band_rows: one band without a tangent). L's
    hidden layer is computed once, a band ahead: a band's 3x3 conv needs the rows beside it."""
    (h, w), xb = grid, block.x_block
    rows = mlp_band_rows(x, h, w, xb.mlp.fc1.out_features)
    hidden_lr = lambda r: None if lr is None else xb.mlp.hidden(_modulate(xb.norm2(lr[:, r * w:(r + rows) * w]),
                                                                          shift, scale))   # image rows r ..
    parts, above, here = [], None, hidden_lr(0)
    for r in range(0, h, rows):
        below = hidden_lr(r + rows) if r + rows < h else None
        parts.append(mlp_rows(block, x, lr, shift, scale, gate, grid, r, min(r + rows, h), above, here, below))
        above, here = None if below is None else here[:, -w:].clone(), below   # a view would keep the band
    cat = lambda ts: ts[0] if len(ts) == 1 else torch.cat(ts, 1)                # one band: no copy
    return cat([p[0] for p in parts]), None if lr is None else cat([p[1] for p in parts])


def mlp_rows(block, x, lr, shift, scale, gate, grid, r0, r1, above=None, here=None, below=None):
    """block.image_mlp's outputs on image rows r0 .. r1 - 1 (tokens r0 w .. r1 w - 1) of X and of L.
    above, here, below: L's hidden layer on the row above, the band, the band below (None past the edges)."""
    xb, (h, w) = block.x_block, grid
    band = slice(r0 * w, r1 * w)
    hx = xb.mlp.hidden(_modulate(xb.norm2(x[:, band]), shift, scale))         # (B, n, 4D)
    lr_out = None
    if lr is not None:
        window = [t for t in (above, here, None if below is None else below[:, :w]) if t is not None]
        window = torch.cat(window, 1) if len(window) > 1 else here          # the band and its halo
        conv = xb.mlp.control_conv(rearrange(window, "b (h w) c -> b c h w", w=w))
        conv = conv.narrow(2, int(above is not None), r1 - r0)              # the band's rows
        hx = hx + block.cfg.ff_inject * rearrange(conv, "b c h w -> b (h w) c")
        lr_out = lr[:, band] + gate.unsqueeze(1) * xb.mlp.fc2(here)
    return x[:, band] + gate.unsqueeze(1) * xb.mlp.fc2(hx), lr_out
