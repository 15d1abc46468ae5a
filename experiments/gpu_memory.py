"""A GPU training step's memory, counted on the meta device (no GPU here; `bench.py budget` uses it).

    tracker = LiveBytes()
    with tracker:
        ...  # any ops on meta tensors
    tracker.peak          # the most bytes of tensor storage alive at once

On the meta device tensors have shapes and dtypes but no values, so a full-size step runs in a minute
or two on a CPU. LiveBytes counts the bytes of every storage from the op that makes it until torch frees
it; its peak is what torch.cuda.max_memory_allocated reports for the same ops on a GPU (tensor
bytes; the caching allocator's rounding and the CUDA context come on top). Three things differ
between the meta device and a GPU, each with a stand-in here:

1. Autocast. A GPU step runs under torch.autocast("cuda", bf16), which no meta tensor sees.
   GPUAutocast applies CUDA autocast's rules (the op lists of ATen/autocast_mode.h) to the calls
   the model makes, above autograd as autocast works, so autograd saves the same casts: matmuls,
   linears and convs in bf16, layer norms, softmax and sums in fp32, mixed inputs promoted. It
   also keeps autocast's cache of bf16 copies of fp32 weights, and the fp32 regions of
   model.TimeLinear (which cannot tell that meta is under autocast: it asks torch).
2. Attention. F.scaled_dot_product_attention on meta takes the math path, which keeps N x N
   probabilities; on a GPU with bf16 inputs it takes flash attention, which keeps the output and
   its log-sum-exp. GPUAutocast calls flash attention's op (its meta kernel gives a GPU's shapes),
   and LiveBytes adds the fp32 scratch flash attention's backward allocates (flash_backward_scratch).
3. Values. Code that reads a value (.item(), a row count from nonzero) cannot on meta. MetaValues
   keeps the values of tensors moved from the CPU to meta (the step's times t and s are drawn on a
   CPU generator) and computes what depends only on them on the CPU, so shapes that follow from
   values (the JVP's rows s != t) are a GPU's; other reads get stand-ins (zero, False).
"""
import math
import weakref

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map
from torch.utils.weak import WeakIdKeyDictionary

GiB = 2 ** 30

# --------------------------------------------------------------------------------------------
# 1. Counting live storages


def flash_backward_scratch(q):
    """Bytes flash attention's backward allocates beside dq, dk, dv (FlashAttention-2 as in PyTorch's
    CUDA kernels, not deterministic): an fp32 accumulator for dq and fp32 row sums, over query rows
    padded to 128 and a head size padded to 32 (up to 128). q: (B, H, N, d)."""
    B, H, N, d = q.shape
    rows = math.ceil(N / 128) * 128
    return 4 * B * H * rows * (math.ceil(d / 32) * 32 + 1)


class LiveBytes(TorchDispatchMode):
    """Bytes of tensor storage alive, and their peak. Each op's output storage is counted once (views
    and in-place results share their input's), and uncounted when torch frees it: a finalizer on the
    storage's Python object, which torch keeps exactly as long as the storage. Storages made before
    counting began (weights, inputs) are counted with `adopt`. `phase` labels what runs now: the
    peak of each phase, and the phase of the overall peak, are kept."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.phase, self.peak_phase, self.phase_peaks = "weights", "weights", {}
        self._sizes = {}     # storage address -> bytes, while alive

    def adopt(self, tensors):
        for t in tensors:
            if t is not None:               # a prompt's Cond has no z_lr
                self._count(t)
        self._note(0)

    def _count(self, t):
        # CPU tensors (noise drawn on a CPU generator) are not on the GPU; a ZeroTensor (forward AD's
        # zero tangents) reports a size but its storage holds no memory
        if not t.is_meta or t._is_zerotensor():
            return
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self._sizes:
            return
        self._sizes[key] = storage.nbytes()
        self.live += self._sizes[key]
        weakref.finalize(storage, self._free, key)

    def _free(self, key):
        self.live -= self._sizes.pop(key)

    def _note(self, scratch):
        """The peak now, with `scratch` bytes a kernel holds only while it runs."""
        now = self.live + scratch
        self.phase_peaks[self.phase] = max(self.phase_peaks.get(self.phase, 0), now)
        if now > self.peak:
            self.peak, self.peak_phase = now, self.phase

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._count(t)
        scratch = 0
        if func is torch.ops.aten._scaled_dot_product_flash_attention_backward.default:
            scratch = flash_backward_scratch(args[1])
        self._note(scratch)
        return out

    def set_phase(self, name):
        self.phase = name
        self._note(0)


# --------------------------------------------------------------------------------------------
# 2. CUDA autocast's rules, for meta tensors

# Python-level names of the ops in ATen/autocast_mode.h's lists (torch 2.x) that this model calls,
# and their Tensor-method spellings. Ops in no list run in their inputs' dtype, promoting as usual.
TO_BF16 = {"linear", "conv1d", "conv2d", "conv3d", "matmul", "__matmul__", "__rmatmul__", "mm", "bmm",
           "addmm", "addbmm", "baddbmm", "addmv", "einsum", "prelu"}
TO_FP32 = {"layer_norm", "rms_norm", "group_norm", "pow", "__pow__", "__rpow__", "rsqrt", "exp", "expm1", "log",
           "log1p", "log2", "log10", "reciprocal", "softplus", "logsumexp", "acos", "asin", "cosh", "sinh", "tan",
           "erfinv", "norm", "dist", "cdist", "mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss"}
OUTPUT_FP32 = {"softmax", "log_softmax", "sum", "cumsum", "cumprod", "prod", "vector_norm"}   # dtype=fp32
PROMOTE = {"addcmul", "addcdiv", "atan2", "cross", "dot", "vdot", "index_put", "scatter_add", "tensordot"}


class GPUAutocast(TorchFunctionMode):
    """torch.autocast("cuda", torch.bfloat16) for meta tensors: the cast rules above, applied while
    `enabled`. Like autocast it casts before autograd records the op, so the casts are in the graph
    and backward runs in the forward's dtypes with no autocast of its own.

    Autocast caches the bf16 copy of each fp32 leaf that requires grad (a trained weight) until the
    autocast region ends, so a weight used by several calls is cast once; `end_region` drops the
    cache as leaving a region does. F.scaled_dot_product_attention becomes flash attention's op.
    Inside `fp32_calls` modules (hooks: see `time_linears_in_fp32`) linears run in fp32 with upcast
    weights, as model.TimeLinear does under autocast on a GPU."""

    def __init__(self, dtype=torch.bfloat16):
        super().__init__()
        self.dtype, self.enabled, self.fp32_depth = dtype, False, 0
        self.cache = WeakIdKeyDictionary()

    def end_region(self):
        self.cache.clear()

    def _cast(self, x, dtype):
        if not (isinstance(x, torch.Tensor) and x.is_floating_point()) or x.dtype in (dtype, torch.float64):
            return x
        if dtype == self.dtype and x.dtype == torch.float32 and x.requires_grad and x.is_leaf:
            if x not in self.cache:
                with torch.enable_grad():      # the copy is a graph node, whichever call made it first
                    self.cache[x] = x.to(dtype)
            return self.cache[x]
        return x.to(dtype)

    def _cast_all(self, args, kwargs, dtype):
        cast = lambda x: self._cast(x, dtype)                                     # noqa: E731
        return tree_map(cast, args), tree_map(cast, kwargs)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", "")
        if not self.enabled:
            return func(*args, **kwargs)
        if name == "scaled_dot_product_attention" and not kwargs and len(args) == 3:
            q, k, v = (self._cast(t, self.dtype) for t in args)
            return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)[0]
        if self.fp32_depth and name == "linear":
            args, kwargs = self._cast_all(args, kwargs, torch.float32)
        elif name in TO_BF16 or name == "scaled_dot_product_attention":
            args, kwargs = self._cast_all(args, kwargs, self.dtype)
        elif name in TO_FP32:
            args, kwargs = self._cast_all(args, kwargs, torch.float32)
        elif name in OUTPUT_FP32 and kwargs.get("dtype") is None:
            first = next((t for t in tree_leaves(args) if isinstance(t, torch.Tensor)), None)
            if first is not None and first.is_floating_point() and first.dtype != torch.float32:
                kwargs["dtype"] = torch.float32
        elif name in PROMOTE:
            floats = [t.dtype for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)
                      and t.is_floating_point() and t.dtype != torch.float64]
            if floats:
                widest = max(floats, key=lambda d: torch.finfo(d).bits)
                args, kwargs = self._cast_all(args, kwargs, widest)
        return func(*args, **kwargs)

    def time_linears_in_fp32(self, net, kind):
        """Hooks marking each `kind` module's calls (model.TimeLinear) as an fp32 region: on a GPU it
        switches autocast off and upcasts its weights; on meta it cannot see autocast and would run
        in the weights' dtype."""
        def enter(*_):
            self.fp32_depth += 1

        def leave(*_):
            self.fp32_depth -= 1
        for m in net.modules():
            if isinstance(m, kind):
                m.register_forward_pre_hook(enter)
                m.register_forward_hook(leave, always_call=True)


# --------------------------------------------------------------------------------------------
# 3. Values on the meta device

_READS = {torch.Tensor.item: lambda t: False if t.dtype == torch.bool else 0, torch.Tensor.__bool__: lambda t: False,
          torch.Tensor.__float__: lambda t: 0.0, torch.Tensor.__int__: lambda t: 0,
          torch.Tensor.__index__: lambda t: 0, torch.Tensor.tolist: lambda t: torch.zeros(t.shape).tolist()}
# never computed on the CPU copies: attributes (a meta tensor's device is meta) and forward AD's
# dual tensors, which must stay the ones the JVP made
_META_ONLY = {"__get__", "_make_dual", "_unpack_dual", "make_dual", "unpack_dual"}
_WRITES = {"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ipow__", "__iand__", "__ior__"}


def _writes_in_place(name):
    return name in _WRITES or (name.endswith("_") and not name.endswith("__"))


class MetaValues(TorchFunctionMode):
    """Values for meta tensors that came from the CPU. A CPU tensor moved to meta keeps its CPU copy;
    a call whose meta inputs all have copies is computed on the copies and its result moved to meta
    with its own copy, so a row count (`(s != t).nonzero()`) or `.item()` gives the true value.
    Reads of other meta tensors get stand-ins (zero, False): a value no shape depends on."""

    def __init__(self):
        super().__init__()
        self.values = WeakIdKeyDictionary()

    def _value(self, x):
        return self.values[x] if isinstance(x, torch.Tensor) and x.is_meta else x

    def _to_meta(self, x):
        if not isinstance(x, torch.Tensor):
            return x
        y = x.to("meta")
        self.values[y] = x
        return y

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        metas = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.is_meta]
        if metas and name not in _META_ONLY and all(t in self.values for t in metas):
            return tree_map(self._to_meta, func(*tree_map(self._value, args), **tree_map(self._value, kwargs)))
        if func in _READS and metas:
            return _READS[func](metas[0])
        out = func(*args, **kwargs)
        if (func is torch.Tensor.to and isinstance(out, torch.Tensor) and out.is_meta
                and isinstance(args[0], torch.Tensor) and args[0].device.type == "cpu"):
            self.values[out] = args[0]
        elif metas and metas[0] in self.values and _writes_in_place(name):
            del self.values[metas[0]]    # written in place from values it does not have
        return out


# --------------------------------------------------------------------------------------------
# 4. train.py's distillation step, counted


def _storages(tensors):
    """{address: bytes} of the distinct storages of `tensors` (shared weights count once)."""
    return {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in tensors if t is not None}


def _rows_seed(B, ratio):
    """A seed of train.py's per-step generator whose draw gives ceil(ratio * B) rows with s != t, the
    most the draw gives: at an odd batch the count is a coin toss, and the JVP's rows cost memory."""
    import mfsr
    for seed in range(100):
        t, s = mfsr.sample_times(B, ratio, torch.Generator().manual_seed(seed))
        if int((s != t).sum()) == math.ceil(ratio * B):
            return seed
    raise RuntimeError(f"no seed below 100 gives {math.ceil(ratio * B)} rows with s != t")


def backward(loss):
    """loss.backward() with the function modes on for what backward runs in Python (the checkpointed
    blocks' recomputation): the engine is called directly, because Tensor.backward and
    torch.autograd.backward go through the modes, and a mode is off inside its own handler."""
    from torch.autograd.graph import _engine_run_backward
    _engine_run_backward((loss,), (torch.ones_like(loss),), False, False, (), True, True)


def distill_step(net_cfg, B, latent, tokens, argv, vae_cfg=None, lora_rank=64, world=1):
    """Bytes of one steady-state step of `train.py --stage distill` (argv: its flags; the step's loop
    body in train.main, with Adam's state and the gradients an earlier step left) on one GPU, counted on meta:
    the VAE encode (vae_cfg, None: cached latents), the loss under bf16 autocast and
    fastjvp.lean_memory(), backward, with world > 1 the gradients' all-reduce (a fake process group
    that moves no data), clipping and Adam. The models are built as train.build_models builds them:
    the teacher stored in bf16, its frozen weights shared by the student, the trained ones in fp32.
    Returns {"resident": bytes before the step by part, "peak", "peak_phase", "phase_peaks"}."""
    import contextlib

    import fastjvp
    import mfsr
    import model
    import train
    import vae as vae_lib
    from plumbing import runs
    cfg = train.parse_args(argv)
    with torch.device("meta"):
        teacher = model.MMDiT(net_cfg).eval().requires_grad_(False)
        vae = vae_lib.VAE(vae_cfg).eval().requires_grad_(False) if vae_cfg else None
    train.store_in(teacher, torch.bfloat16)
    student = train.store_in(model.make_student(teacher, lora_rank=lora_rank), torch.bfloat16)
    fastjvp.accelerate(teacher)   # as train.main: the fast paths, which set its memory
    fastjvp.accelerate(student)
    student.grad_checkpointing = cfg.grad_ckpt
    trainable = [p for p in student.parameters() if p.requires_grad]
    # Adam's state and the gradients as an earlier step leaves them: train.main frees the gradients
    # (zero_grad(set_to_none=True)) first thing in a step, before the VAE encode
    opt = torch.optim.Adam(trainable, lr=cfg.lr, foreach=True)   # foreach: the default on CUDA tensors
    for p in trainable:
        p.grad = torch.zeros_like(p)
    opt.step()

    C, P = net_cfg.in_channels, net_cfg.context_dim
    with torch.device("meta"):
        prompt = lambda: mfsr.Cond(None, torch.empty(net_cfg.pooled_dim), torch.empty(tokens, P))   # noqa: E731
        images = dict(gt=torch.empty(B, 3, 8 * latent, 8 * latent), lr=torch.empty(B, 3, 2 * latent, 2 * latent))
        latents = dict(z_hr=torch.empty(B, C, latent, latent), z_lr=torch.empty(B, C, latent, latent))
        mb = dict(context=torch.empty(B, tokens, P), pooled=torch.empty(B, net_cfg.pooled_dim), null=prompt(),
                  neg=prompt())
    frozen = [p for m in (teacher, student) for p in m.parameters() if not p.requires_grad]
    state = [v for s in opt.state.values() for v in s.values() if v.is_meta]    # its step counts stay on the CPU
    resident = {"frozen weights (teacher = student's base)": _storages(frozen),
                "position table (fp32 buffer)": _storages(b for m in (teacher, student) for b in m.buffers()),
                "trained weights (fp32)": _storages(trainable), "Adam state (fp32 m, v)": _storages(state),
                "gradients (fp32), the earlier step's": _storages(p.grad for p in trainable),
                "VAE weights (fp32)": _storages(vae.parameters() if vae else []),
                "batch and prompts": _storages(tree_leaves((images if vae else latents, mb)))}
    parts = {k: sum(v.values()) for k, v in resident.items()}

    tracker, autocast, values = LiveBytes(), GPUAutocast(), MetaValues()
    tracker.adopt(tree_leaves((frozen, list(student.buffers()), list(teacher.buffers()), trainable, state,
                               [p.grad for p in trainable], list(vae.parameters()) if vae else [],
                               images if vae else latents, mb)))
    for net in (teacher, student):
        autocast.time_linears_in_fp32(net, model.TimeLinear)
    teacher.register_forward_pre_hook(lambda m, a: tracker.set_phase("teacher CFG"))
    student.register_forward_pre_hook(lambda m, a: tracker.set_phase(runs.student_phase(a)))
    # backward recomputes each checkpointed block in an autocast region of its own, which ends when the
    # recomputation stops (early, by an exception, once it has what backward needs: hence always_call)
    for block in student.joint_blocks:
        block.register_forward_hook(lambda *_: autocast.end_region() if tracker.phase == "backward" else None,
                                    always_call=True)

    @contextlib.contextmanager
    def clock(name):                      # train.update's phases
        tracker.set_phase(name)
        yield
    sync = None
    if world > 1:
        import torch.distributed as dist
        from torch.testing._internal.distributed.fake_pg import FakeStore
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
        sync = trainable
    g = torch.Generator().manual_seed(_rows_seed(B, cfg.ratio))
    try:
        with values, autocast, tracker:
            tracker.set_phase("VAE encode")
            opt.zero_grad(set_to_none=True)
            if vae:
                tracker.set_phase("VAE encode")
                z_hr, z_lr = train.encode_pair(vae, images, g)
                mb.update(z_hr=z_hr, z_lr=z_lr)
                del z_hr, z_lr, images
            else:
                mb.update(latents)
            tracker.set_phase("loss")      # until a network is called: the noise, z_t, the prompts' rows
            autocast.enabled = True
            with fastjvp.lean_memory():
                loss, _ = train.distill_loss(student, teacher, mb, cfg, g, step=0)
            autocast.end_region()
            tracker.set_phase("backward")   # autocast stays on for the checkpointed blocks' recomputation
            with fastjvp.lean_memory():
                backward(loss)
            autocast.enabled = False
            autocast.end_region()
            del loss
            train.update(cfg, student, opt, None, trainable, sync, 0, clock)
    finally:
        if world > 1:
            dist.destroy_process_group()
    return {"resident": parts, "peak": tracker.peak, "peak_phase": tracker.peak_phase,
            "phase_peaks": tracker.phase_peaks}
