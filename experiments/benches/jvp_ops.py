"""jvp_ops: the aten ops (and kernels) one JVP pass of the full-size student dispatches beside a
forward's, counted on the meta device."""
import torch

from benches.common import bench

# jvp_ops: the aten ops one JVP pass dispatches beside a forward's, counted on the meta device (shapes
# only: the ops a GPU would launch, without a GPU). CPU autocast does not reach meta tensors, so the
# passes are counted in fp32; under bf16 autocast a GPU would add the casts of weights and inputs.

# ops that launch no kernel: views, shape and storage queries, allocations without a fill
NO_KERNEL = {"view", "_unsafe_view", "alias", "expand", "slice", "select", "t", "transpose", "permute",
             "unsqueeze", "squeeze", "split", "unbind", "as_strided", "detach", "to", "is_same_size",
             "_has_same_storage_numel", "promote_types", "_efficientzerotensor", "empty", "new_empty",
             "empty_like", "empty_strided"}


def op_counter():
    """A TorchDispatchMode counting the aten ops dispatched under it, by where they come from
    (`where`: a list whose last item names the current layer kind); .ops and .kernels (those not in
    NO_KERNEL) are Counters by that name."""
    from collections import Counter
    from torch.utils._python_dispatch import TorchDispatchMode

    class OpCounter(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.where, self.ops, self.kernels = ["other"], Counter(), Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[self.where[-1]] += 1
            self.kernels[self.where[-1]] += func.overloadpacket.__name__ not in NO_KERNEL
            return func(*args, **(kwargs or {}))
    return OpCounter()


def jvp_op_counts(cfg, side, B=5, L=154):
    """Op counters of the MFSR student of `cfg` on B rows of a side x side latent and L text tokens:
    a forward, and the JVP as train.py runs it (mfsr.meanflow_target's: tangents (v, 1, 0) for
    (z_t, t, s), under no_grad, lean_memory() and detached_tangents()). Each op is put under the
    kind of layer it runs in: linear, norm, attention (the call, with its tangent) or other."""
    from unittest import mock
    import fastjvp
    import mfsr
    import model
    with torch.device("meta"):
        student = fastjvp.accelerate(model.make_student(model.MMDiT(cfg)))      # as train.py
        z, v, z_lr = (torch.randn(B, cfg.in_channels, side, side) for _ in range(3))
        t, s = torch.rand(B), torch.rand(B)
        c = mfsr.Cond(z_lr, torch.randn(B, cfg.pooled_dim), torch.randn(B, L, cfg.context_dim))
    u = mfsr.average_velocity(student)
    fwd, jvp = op_counter(), op_counter()
    kinds = {torch.nn.Linear: "linear", torch.nn.LayerNorm: "norm", model.RMSNorm: "norm"}
    stack = []                                   # the counter in use, for the hooks

    def enter(kind):
        stack[-1].where.append(kind)
    for m in student.modules():
        kind = next((k for cls, k in kinds.items() if isinstance(m, cls)), None)
        if kind:
            m.register_forward_pre_hook(lambda *_, kind=kind: enter(kind))
            m.register_forward_hook(lambda *_: stack[-1].where.pop() and None)
    attend = fastjvp.attention

    def attention(*a, **kw):
        enter("attention")
        try:
            return attend(*a, **kw)
        finally:
            stack[-1].where.pop()
    with torch.no_grad(), fastjvp.lean_memory(), mock.patch.object(fastjvp, "attention", attention):
        with fwd:
            stack.append(fwd)
            u(z, t, s, c)
        with fastjvp.detached_tangents(), jvp:
            stack.append(jvp)
            mfsr.jvp(lambda *a: u(*a, c), (z, t, s), (v, torch.ones_like(t), torch.zeros_like(s)))
    return fwd, jvp


@bench
def bench_jvp_ops(args):
    """Aten ops (and the kernels among them) of one JVP pass of the full-size DiT4SR student against
    a forward's, at 512^2 and 1024^2 (64^2 and 128^2 latents), 5 JVP rows; by layer kind at 512^2."""
    import model
    rows, figures = [], {}
    for side in (64,) if args.quick else (64, 128):
        fwd, jvp = jvp_op_counts(model.CONFIGS["dit4sr"], side)
        tokens = 2 * (side // 2) ** 2 + 154
        parts = [("all", None)] + [(k, k) for k in ("linear", "norm", "attention", "other")] * (side == 64)
        for name, kind in parts:
            n = lambda c: sum(c.values()) if kind is None else c[kind]
            rows.append({"image": f"{8 * side}^2", "tokens": tokens, "ops of": name,
                         "forward ops": n(fwd.ops), "JVP ops": n(jvp.ops), "x": n(jvp.ops) / n(fwd.ops),
                         "forward kernels": n(fwd.kernels), "JVP kernels": n(jvp.kernels),
                         "x kernels": n(jvp.kernels) / n(fwd.kernels)})
            figures[f"{8 * side}/{name}"] = {k: rows[-1][k] for k in ("forward ops", "JVP ops", "forward kernels",
                                                                     "JVP kernels")}
    return ("jvp_ops: aten ops dispatched by one pass of the DiT4SR student (2.6 B parameters), 5 rows, "
            "154 text tokens, on the meta device in fp32 (CPU autocast does not reach meta tensors)"), rows, figures
