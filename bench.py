"""Benchmarks: every figure the issues ask for, measured side by side in one run.

    python bench.py model            # forward / JVP / JVP+backward of the transformer
    python bench.py model --json     # the same figures as one JSON object

Each bench prints a table. Time is the median of interleaved repeats (this is a shared
2-core VM: interleaving keeps slow phases from landing on one variant only). Peak memory
is the growth of the process's peak resident set (VmHWM, reset through
/proc/self/clear_refs before each measurement) over the resident set before the call,
so it counts what the call allocates, on CPU, including freed temporaries (glibc is told to
return big freed blocks to the OS at once, MALLOC_MMAP_THRESHOLD_=65536).
"""
import argparse
import ctypes
import gc
import json
import os
import statistics
import sys
import time

import torch

BENCHES = {}


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
    """Run fn() once; return (its result, peak resident memory it added in MB)."""
    gc.collect()
    _trim()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    base = _status_mb("VmRSS")
    out = fn()
    return out, _status_mb("VmHWM") - base


def _trim():
    """Give freed heap back to the OS so the next peak is measured from a clean base."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def median_times(fns, repeat=5, warmup=1):
    """Interleaved timing of several callables; returns {name: median seconds}."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def print_table(title, rows):
    """rows: list of dicts with the same keys; floats printed with 3 significant digits."""
    cols = list(rows[0])
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)
    cells = [[fmt(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print(f"\n{title}")
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


# --------------------------------------------------------------------------------------------
# model: forward, JVP (custom attention vs the math backend), JVP + backward


def _model_case(cfg, H, W, B=1, L=16, two_times=True):
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
                out = torch.func.jvp(f, (x, sigma), (tx, tt))
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

    def fused():          # one grad-enabled JVP; backward through its primal output
        net.zero_grad(set_to_none=True)
        u, dudt = torch.func.jvp(f, (x, sigma), (tx, tt))
        (u - dudt.detach()).square().mean().backward()
    return {"forward": fwd, "fwd+bwd": fwd_bwd, "jvp custom": jvp("auto"), "jvp math": jvp("math"),
            "split jvp+fwd+bwd": split, "fused jvp+bwd": fused}


def _load_row(cfg):
    """Peak memory of load_transformer vs the file size: one copy of the weights, not two."""
    import tempfile
    import model
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "t.safetensors")
        model.save_transformer(model.MMDiT(cfg), path)
        size = os.path.getsize(path) / 2 ** 20
        t0 = time.perf_counter()
        net, mb = peak_mb(lambda: model.load_transformer(path))
        secs = time.perf_counter() - t0
        del net
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
    import mfsr
    import model
    torch.manual_seed(0)
    teacher = model.MMDiT(cfg)
    student = mfsr.student_from_teacher(teacher, lora_rank=rank)
    for p in teacher.parameters():
        p.requires_grad_(False)
    z_hr, eps, z_lr = (torch.randn(B, 16, H, W) for _ in range(3))
    c = (z_lr, torch.randn(B, cfg.pooled_dim), torch.randn(B, L, cfg.context_dim))
    c_neg = (z_lr, torch.randn(B, cfg.pooled_dim), torch.randn(B, L, cfg.context_dim))
    u, v_t = mfsr.average_velocity(student), mfsr.velocity(teacher)
    g = torch.Generator().manual_seed(0)

    def mfd(mode, ratio=0.5):
        def step():
            t, s = mfsr.sample_times(B, ratio, g)
            z = t.view(-1, 1, 1, 1) * z_hr + (1 - t.view(-1, 1, 1, 1)) * eps
            v = mfsr.teacher_velocity("neg", z, t, teacher=v_t, cond=c, cond_neg=c_neg, w=6.0)
            student.zero_grad(set_to_none=True)
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
    return {"student fwd+bwd": plain_student, "teacher RF fwd+bwd": teacher_rf,
            "MFD split": mfd("split"), "MFD fused": mfd("fused"), "MFD split, ratio 1": mfd("split", 1.0)}


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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("which", choices=sorted(BENCHES), help="which bench to run")
    p.add_argument("--json", action="store_true", help="print one JSON object of the figures")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--quick", action="store_true", help="small sizes only (smoke run)")
    args = p.parse_args(argv)
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None and argv is None:
        # glibc serves big blocks with mmap from this size on, so freed tensors leave the resident
        # set at once and each peak is measured from the same base. Needs a fresh process.
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
        os.execv(sys.executable, [sys.executable] + sys.argv)
    torch.set_num_threads(args.threads)
    title, rows, figures = BENCHES[args.which](args)
    if args.json:
        print(json.dumps(figures, indent=1))
    else:
        print_table(title, rows)


if __name__ == "__main__":
    sys.exit(main())
