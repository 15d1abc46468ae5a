"""The transformer's fast paths, swapped into model.py's plain network from here:

    net = fastjvp.accelerate(model.MMDiT(cfg))     # any built network: the same numbers, faster

MFSR's target needs du/dt, a Jacobian-vector product of the student (mfsr.py, Eq. 8). Forward-mode
AD computes it through model.py's plain ops, which is all the method needs; at full size that is too
slow and too large, for three reasons this file answers (a subclass per layer, so keys stay):

1. Attention. The fused SDPA kernels have no forward-AD formula, and the plain ops that have one
   materialise the N x N scores for the primal and for the tangent. With P = softmax(S),
   S = s Q K^T (s = d^-1/2) and O = P V, the tangent is

       dS = s (dQ K^T + Q dK^T),   dO = P dV + (P * dS) V - rowsum(P * dS) O

   (the last term is the softmax's Jacobian). `attention_and_tangent` computes O and dO in one pass
   over blocks of query rows, so memory grows as N, not N^2. Two autograd Functions wrap it:
   JVPAttention (torch.func transforms, or a tangent that is trained: the primal by fused SDPA,
   the tangent by the rule) and DualAttention (forward-AD dual tensors whose tangent is detached,
   as in mfsr.py: one pass for both, backward from the saved O and log-sum-exp).
2. Linear layers and RMSNorm. PyTorch's generic forward rules multiply x by the weight's zero
   tangent, and take RMSNorm op by op; `linear` computes only dx W^T, RMSNorm one rule.
3. Memory. model.JointBlock's `attend` and `image_mlp` are the plain equations (q, k, v of the rows
   [X ; L ; C] concatenated, the MLPs over all rows at once). Inside `lean_memory()` (train.py runs
   in it) this file's JointBlock runs them with lower peaks: each stream's q, k, v freed once
   joined, and under a JVP the MLPs, whose 4x-wide hidden layers and their tangents are the largest
   activations, over bands of image rows (`mlp_band_rows`, their size from a memory budget).

Switches (context managers, below): detached_tangents(), compiled_jvp(), lean_memory(),
attention_mode(mode); forward_switches keeps them for a checkpointed block's recomputation.
"""
import contextlib

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

import model

# Memory budgets in bytes of a JVP's blocks: a (B, H, chunk, N) block of attention scores, a
# (B, rows * w, 4 D) band of an MLP's hidden layer. A GPU launches a kernel per op (a few us each):
# there blocks as large as memory easily allows. A CPU launches nothing (an op costs its arithmetic):
# a few MiB keep the JVP's peak that of a forward. "gpu": other devices, and meta (bench.py jvp_ops).
ATTN_BLOCK_BYTES = {"cpu": 2 ** 22, "gpu": 2 ** 29}
MLP_BAND_BYTES = {"cpu": 2 ** 23, "gpu": 2 ** 29}
_budget = lambda table, device: table["cpu" if device.type == "cpu" else "gpu"]   # noqa: E731


# --------------------------------------------------------------------------------------------
# Switches

_SWITCHES = {"compiled_jvp": False, "detached_tangents": False, "lean": False, "attn_mode": "auto"}


@contextlib.contextmanager
def _switches_as(saved):
    prev = dict(_SWITCHES)
    _SWITCHES.update(saved)
    try:
        yield
    finally:
        _SWITCHES.update(prev)


def lean_memory():
    """The accelerated JointBlock's lean attend and image_mlp (section 3): lower peaks, the same numbers."""
    return _switches_as({"lean": True})


def attention_mode(mode):
    """`attention`'s mode in the accelerated blocks (auto outside): e.g. "math" for a reference."""
    return _switches_as({"attn_mode": mode})


def compiled_jvp():
    """Tell `attention` that the graph being compiled carries tangents (dynamo cannot inspect tensor
    wrappers): it takes the chunked plain-ops path, which forward AD and the compiler both go through."""
    return _switches_as({"compiled_jvp": True})


def func_jvp(f, primals, tangents):
    """torch.func.jvp(f, primals, tangents) inside compiled_jvp(): the JVP to hand to torch.compile
    (train.py --compile, in place of mfsr.jvp, whose dual tensors' rules a compiled graph drops).
    Inside detached_tangents() the tangent comes back detached, so the compiled backward is the
    primal's alone (with a trainable tangent, inductor's CPU backward fails; docs/benchmarks.md)."""
    with compiled_jvp():
        out, tangent = torch.func.jvp(f, primals, tangents)
    return out, tangent.detach() if _SWITCHES["detached_tangents"] else tangent


def detached_tangents():
    """Promise that the JVP's tangent output will be detached: the tangent rules then record nothing
    for backward (in mfsr's grad-enabled "fused" mode autograd would keep every (chunk, N) block of
    the tangent for a backward that never comes). Opt-in: gradients through the tangent would be wrong."""
    return _switches_as({"detached_tangents": True})


def forward_switches():
    """torch.utils.checkpoint's context_fn (MMDiT.checkpoint_context, set by accelerate): a block
    recomputed in backward runs with its forward's switches (lean_memory(), ...), so it saves the
    same tensors wherever backward runs. Eager only: a compiled graph replays its traced path."""
    return contextlib.nullcontext(), _switches_as(dict(_SWITCHES))


def _tangent_recording():   # the grad mode for computing a tangent by hand: off inside detached_tangents
    return torch.no_grad() if _SWITCHES["detached_tangents"] else contextlib.nullcontext()


def has_tangent(x):
    """True inside torch.func transforms (jvp, grad, vmap) or with forward-AD dual tensors."""
    return torch._C._functorch.is_functorch_wrapped_tensor(x) or fwAD.unpack_dual(x).tangent is not None


# --------------------------------------------------------------------------------------------
# 1. Attention and its tangent


def compute_dtype(x):
    """The dtype x's products run in: autocast's where it is on (it never casts fp64), else x's."""
    on = x.is_floating_point() and x.dtype != torch.float64 and model.autocasting(x)
    return torch.get_autocast_dtype(x.device.type) if on else x.dtype


def _query_chunk(q, k, dtype=None):
    """Query rows per chunk: a (B, H, chunk, N) score block of `dtype` (q's) within ATTN_BLOCK_BYTES."""
    row = q.shape[0] * q.shape[1] * k.shape[-2] * (dtype or q.dtype).itemsize    # B H N scores
    return max(1, _budget(ATTN_BLOCK_BYTES, q.device) // row)


def attention_and_tangent(q, k, v, dq, dk, dv, with_lse=False):
    """O = softmax(s Q K^T) V and dO (the rule in the module docstring) over chunks of query rows,
    never forming N x N: six (chunk, N, d) products on views of the inputs. with_lse: also the rows'
    log-sum-exp, for the backward. Returns (O, dO, lse or None), O and dO in compute_dtype(q). Done
    once, not per chunk: the casts (autocast is off in the loop), the scale, bmm's (B H, n, d) layout."""
    dtype, kind = compute_dtype(q), q.device.type
    acc = torch.promote_types(dtype, torch.float32)         # the softmax's dtype, as SDPA's
    scale, chunk = q.shape[-1] ** -0.5, _query_chunk(q, k, acc)
    flat = lambda t: t.to(dtype).reshape(-1, *t.shape[-2:])                    # (B H, n, d)
    qs, dqs, v, dv = flat(q) * scale, flat(dq) * scale, flat(v), flat(dv)     # s Q, s dQ, V, dV
    kt, dkt = flat(k).transpose(1, 2), flat(dk).transpose(1, 2)                # (B H, d, N)
    o, do = (qs.new_empty(*qs.shape[:-1], v.shape[-1]) for _ in range(2))
    lse = qs.new_empty(qs.shape[:-1], dtype=acc) if with_lse else None
    with torch.autocast(kind, enabled=False) if model.autocasting(q) else contextlib.nullcontext():
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
    o, do = DualAttention.apply(q, k, v, *(torch.zeros_like(p) if t is None else t for p, t in ((q, dq), (k, dk), (v, dv))))
    return fwAD.make_dual(o, do)


def _auto_mode(q, k, v):
    if torch.compiler.is_compiling():
        return "chunked" if _SWITCHES["compiled_jvp"] else "sdpa"
    if any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in (q, k, v)):
        return "function"
    if any(fwAD.unpack_dual(t).tangent is not None for t in (q, k, v)):
        untrained = not torch.is_grad_enabled() or _SWITCHES["detached_tangents"]
        return "dual" if untrained else "function"
    return "sdpa"


def attention(q, k, v, mode="auto"):
    """Multi-head attention softmax(s Q K^T) V on (B, H, N, d) tensors, the accelerated JointBlock's.
    mode: auto | sdpa | dual | function | chunked | math. auto: fused SDPA without tangents; dual
    tensors whose tangent is not trained: DualAttention; other tangents (torch.func, a trained
    tangent): JVPAttention; compiling a JVP: the chunked plain-ops path."""
    mode = _auto_mode(q, k, v) if mode == "auto" else mode
    if mode == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    if mode == "dual":
        return _dual_attention(q, k, v)
    if mode == "function":
        return JVPAttention.apply(q, k, v)
    if mode == "chunked":   # model.py's plain ops over query chunks: dynamo ignores JVPAttention's jvp
        chunk, plain = _query_chunk(q, k), model.JointBlock.attention
        return torch.cat([plain(q[..., i:i + chunk, :], k, v) for i in range(0, q.shape[-2], chunk)], dim=-2)
    if mode == "math":
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v)
    raise ValueError(f"unknown attention mode {mode!r}")


# --------------------------------------------------------------------------------------------
# 2. Linear layers and RMSNorm: one tangent rule each


def _rule_applies(x, w):
    """(x's primal, tangent) where a hand rule applies (x a forward-AD dual, w without tangent, outside
    torch.func, compiling), else None: plain ops, PyTorch's generic rules."""
    if torch.compiler.is_compiling() or torch._C._functorch.is_functorch_wrapped_tensor(x):
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


class Linear(nn.Linear):
    """nn.Linear (same parameters and keys) through `linear`, for its cheaper forward-mode rule."""

    def forward(self, x):
        return linear(x, self.weight, self.bias)


class LoRALinear(model.LoRALinear, Linear):
    """model.LoRALinear, its base product through Linear's forward (next in the MRO). Without
    gradients for the LoRA factors, one product with the merged weight is cheaper than three once the
    rows outnumber in * out / (in + out); with them, the gradients stay low-rank."""

    def forward(self, x):
        n_in, n_out, factors = self.in_features, self.out_features, (self.lora_up.weight, self.lora_down.weight)
        lora_grad = torch.is_grad_enabled() and any(w.requires_grad for w in factors)
        if lora_grad or x.numel() // n_in * (n_in + n_out) <= n_in * n_out:
            return super().forward(x)
        return linear(x, self.merged_weight(), self.bias)


class RMSNorm(model.RMSNorm):
    """model.RMSNorm with its tangent by one rule (the generic ones take 3x the ops), beside the primal
    to share n = x r, r = (mean(x^2) + eps)^-1/2: dn = r (dx - n mean(n dx)), times the weight."""

    def forward(self, x):
        dual = _rule_applies(x, self.weight)
        if dual is None:
            return super().forward(x)
        (xp, dx), w = dual, self.weight.to(x.dtype)
        xf = xp.float() if xp.dtype in (torch.float16, torch.bfloat16) else xp
        r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        n = xf * r
        with _tangent_recording():
            dy = ((dx - n * (n * dx).mean(-1, keepdim=True)) * r).to(x.dtype) * w
        return fwAD.make_dual(n.to(x.dtype) * w, dy)


# --------------------------------------------------------------------------------------------
# 3. Lean memory: model.JointBlock's attend and image_mlp with lower peaks (inside lean_memory())


class JointBlock(model.JointBlock):
    """model.JointBlock with `attention` (fused kernels, the tangent rules) and, inside lean_memory(),
    attend and image_mlp with lower peaks: the same numbers up to rounding."""

    def attention(self, q, k, v):
        return attention(q, k, v, _SWITCHES["attn_mode"])

    def attend(self, x, lr, ctx, m, c_m):
        """New X and L, and C's rows of the joint attention's output, as model.JointBlock.attend; its
        `del`s free q, k, v and the normalised inputs as soon as they are dead."""
        if not _SWITCHES["lean"]:
            return super().attend(x, lr, ctx, m, c_m)
        xb, cb, key_mode = self.x_block, self.context_block, self.cfg.lr_key_mode
        nx, nl = xb.norm1(x), None if lr is None else xb.norm1(lr)
        text = cb.attn.qkv_x(model.modulate(cb.norm1(ctx), c_m.shift_msa, c_m.scale_msa))   # C's q, k, v
        q, k, v, la = _lean_qkv(xb.attn, nx, nl, m.shift_msa, m.scale_msa, key_mode, text)
        del text
        o = self.attention(q, k, v)                                             # [X ; L ; C]
        del q, k, v                                 # freed before the second attention makes its own
        o = rearrange(o, "b h n d -> b n (h d)")                               # (B, N, D)
        x2, lr2 = _lean_out(xb.attn, o, x, lr, la, m.gate_msa)
        # C's rows, for its MLP (the last block has none): the rest of o can go
        o_c = None if cb.pre_only else o[:, -ctx.shape[1]:].clone()
        del o, la
        if xb.dual:  # MMDiT-X: image-only attention from the same normalised inputs, over [X ; L]
            q, k, v, la2 = _lean_qkv(xb.attn2, nx, nl, m.shift_msa2, m.scale_msa2, key_mode)
            del nx, nl
            o2 = self.attention(q, k, v)
            del q, k, v                             # freed before o2's (B, 2K, D) copy is made
            o2 = rearrange(o2, "b h n d -> b n (h d)")                         # (B, 2K, D)
            x2, lr2 = _lean_out(xb.attn2, o2, x2, lr2, la2, m.gate_msa2)
        return x2, lr2, o_c

    def image_mlp(self, x, lr, m, grid):
        """model.JointBlock.image_mlp over bands of image rows (mlp_band_rows: one without a tangent).
        L's hidden layer is computed once, a band ahead: a band's 3x3 conv needs the rows beside it."""
        if not _SWITCHES["lean"]:
            return super().image_mlp(x, lr, m, grid)
        (h, w), xb = grid, self.x_block
        rows = mlp_band_rows(x, h, w, xb.mlp.fc1.out_features)
        hidden_lr = lambda r: None if lr is None else xb.mlp.hidden(   # noqa: E731  image rows r ..
            model.modulate(xb.norm2(lr[:, r * w:(r + rows) * w]), m.shift_mlp, m.scale_mlp))
        parts, above, here = [], None, hidden_lr(0)
        for r in range(0, h, rows):
            below = hidden_lr(r + rows) if r + rows < h else None
            parts.append(self.mlp_rows(x, lr, m, grid, r, min(r + rows, h), above, here, below))
            above, here = None if below is None else here[:, -w:].clone(), below   # a view would keep the band
        cat = lambda ts: ts[0] if len(ts) == 1 else torch.cat(ts, 1)   # noqa: E731  one band: no copy
        return cat([p[0] for p in parts]), None if lr is None else cat([p[1] for p in parts])

    def mlp_rows(self, x, lr, m, grid, r0, r1, above=None, here=None, below=None):
        """image_mlp's outputs on image rows r0 .. r1 - 1 (tokens r0 w .. r1 w - 1) of X and of L. above,
        here, below: L's hidden layer on the row above, the band, the band below (None past the edges)."""
        xb, (_, w), gate = self.x_block, grid, m.gate_mlp.unsqueeze(1)
        band = slice(r0 * w, r1 * w)
        hx = xb.mlp.hidden(model.modulate(xb.norm2(x[:, band]), m.shift_mlp, m.scale_mlp))   # (B, n, 4D)
        lr_out = None
        if lr is not None:
            window = [t for t in (above, here, None if below is None else below[:, :w]) if t is not None]
            window = torch.cat(window, 1) if len(window) > 1 else here          # the band and its halo
            conv = xb.mlp.control_conv(rearrange(window, "b (h w) c -> b c h w", w=w))
            conv = conv.narrow(2, int(above is not None), r1 - r0)              # the band's rows
            hx = hx + self.cfg.ff_inject * rearrange(conv, "b c h w -> b (h w) c")
            lr_out = lr[:, band] + gate * xb.mlp.fc2(here)
        return x[:, band] + gate * xb.mlp.fc2(hx), lr_out


def _lean_qkv(attn, nx, nl, shift, scale, key_mode, text=None):
    """q, k, v over [X ; L] (L if nl is given) with the text's q, k, v appended, and la, the
    modulated LR input. Parts are freed once joined: only one of q, k, v is ever held twice."""
    q, k, v = attn.split_heads(model.modulate(nx, shift, scale))
    parts, la = [[attn.ln_q(q)], [attn.ln_k(k)], [v]], None
    del q, k, v                 # from here only `parts` holds them
    if nl is not None:
        # v copied out of the (B, N, 3D) projection, which then goes before the LR one is made
        parts[2][0] = parts[2][0].contiguous()
        la = model.modulate(nl, shift, scale)
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
    if torch.compiler.is_compiling() or not has_tangent(x):
        return h
    row = x.shape[0] * w * hidden * compute_dtype(x).itemsize
    return max(1, _budget(MLP_BAND_BYTES, x.device) // row)


# --------------------------------------------------------------------------------------------
# 4. Putting them in

_FAST = {nn.Linear: Linear, model.LoRALinear: LoRALinear, model.RMSNorm: RMSNorm, model.JointBlock: JointBlock}


def accelerate(net):
    """Give a model.MMDiT the fast paths in place and return it: each layer of a class in _FAST
    becomes its subclass here (parameters and state_dict keys stay); checkpointed blocks recompute
    with their forward's switches. Again after add_lora or merge_lora, which put model.py's layers in."""
    for m in net.modules():
        m.__class__ = _FAST.get(type(m), type(m))
    net.checkpoint_context = forward_switches
    return net
