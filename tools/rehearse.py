"""A rehearsal of the full-scale distillation on one GPU (or the CPU) before booking eight: random
weights of the real size written in the real file layouts (nothing is downloaded), a few steps of
train.py's own code with a progress grid and a save, a resume for one more step, then where a step's
time goes and whether the batch fits.

    python tools/rehearse.py                          # the README's run: 512^2, batch 10, --grad-ckpt
    python tools/rehearse.py --size 128 --batch 2 --dtype bf16     # full dimensions on a CPU

The files: DiT4SR's teacher as a diffusers folder (`dit4sr/transformer/`, the `*control*` keys of
the released dit4sr_q), the SD3 VAE under an SD3.5 single file's `first_stage_model.*` names, the
null and negative prompt embeddings at SD3.5's sizes (154 x 4096 context, 2048 pooled), and a few
synthetic photographs. train.main reads them as it reads the real ones.
"""
import argparse
import gc
import json
import math
import os
import shutil
import sys
import tempfile
from dataclasses import replace

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model  # noqa: E402
import train  # noqa: E402
import vae as vae_lib  # noqa: E402
from plumbing import checkpoints, runs  # noqa: E402
from plumbing.cli import proc_kib, reset_peak  # noqa: E402

PHASES = ("data", "VAE encode", "teacher (CFG)", "JVP", "student forward", "loss (compiled)", "backward",
          "all-reduce", "optimizer")
PERIODIC = ("progress grid", "save")      # every --sample-every / --save-every steps, not every step


def teacher_config(depth=0):
    """DiT4SR's transformer; depth > 0: its first `depth` blocks (full width, for a quick test)."""
    cfg = model.CONFIGS["dit4sr"]
    return cfg if not depth else replace(cfg, depth=depth, dual_layers=tuple(i for i in cfg.dual_layers if i < depth))


def write_inputs(folder, depth=0, size=512, images=6, seed=0):
    """Random full-size weights in the released layouts, the prompt embeddings, and photographs;
    returns train.py's flags that read them. Weights in bf16, as released."""
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)       # built in bf16: a full-size fp32 copy is never held
    try:
        net = model.MMDiT(teacher_config(depth))
        for name, p in net.named_parameters():    # DiT4SR's trained control layers are not zero
            if "control" in name and p.abs().max() == 0:
                torch.nn.init.normal_(p, std=0.02)
        teacher = os.path.join(folder, "dit4sr", "transformer", "diffusion_pytorch_model.safetensors")
        os.makedirs(os.path.dirname(teacher))
        checkpoints.atomic_save(checkpoints.to_diffusers_state_dict(net.state_dict(), net.cfg.depth), teacher, {})
        del net
        vae = vae_lib.VAE(vae_lib.CONFIGS["sd3"])
        sd35 = os.path.join(folder, "sd3.5_medium.safetensors")      # its VAE part: first_stage_model.*
        checkpoints.atomic_save({"first_stage_model." + k: v.contiguous() for k, v in vae.state_dict().items()},
                                sd35, {})
        del vae
    finally:
        torch.set_default_dtype(default)
    embs = {}
    for name, tokens in (("null", 154), ("neg", 154)):
        embs[name] = os.path.join(folder, f"{name}.safetensors")
        checkpoints.atomic_save({"context": torch.randn(tokens, 4096) * 0.1, "pooled": torch.randn(2048) * 0.1},
                                embs[name], {"format": "mfsr-embedding"})
    data = os.path.join(folder, "photos")
    os.makedirs(data)
    rng = np.random.default_rng(seed)
    side = size * 5 // 4                           # larger than the crop, so crops differ
    x = np.linspace(0, 1, side)
    for i in range(images):
        f = rng.uniform(2, 30, 3)
        img = np.stack([np.outer(np.sin(f[0] * x + i), np.cos(f[1] * x)), np.outer(x, np.sin(f[2] * x)),
                        rng.random((side, side)) * 0.3], -1) * 0.5 + 0.5
        Image.fromarray((img.clip(0, 1) * 255).astype(np.uint8)).save(os.path.join(data, f"photo{i}.png"))
    return ["--teacher", os.path.dirname(os.path.dirname(teacher)), "--ckpt", sd35, "--data", data,
            "--null-emb", embs["null"], "--neg-emb", embs["neg"]]


def device_memory_mb(device):
    """What the device has: a GPU's total memory, else the machine's (Linux MemTotal); NaN if unknown."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / 2 ** 20
    kib = proc_kib("/proc/meminfo", "MemTotal")
    return math.nan if kib is None else kib / 1024


def verdict(batch, peaks, have_mb):
    """Whether `batch` fits in have_mb, from measured peaks {batch: MB} (the asked batch, or two smaller
    ones where it ran out of memory: then a line through them, memory = fixed + per row * batch)."""
    if batch in peaks:
        peak = peaks[batch]
        if peak <= have_mb:
            return f"fits: batch {batch} peaks at {peak / 1024:.1f} GiB of {have_mb / 1024:.1f} GiB"
        return f"does not fit: batch {batch} peaks at {peak / 1024:.1f} GiB, {(peak - have_mb) / 1024:.1f} GiB over"
    if len(peaks) < 2:
        return (f"does not fit: batch {batch} ran out of memory, and so did every smaller batch tried "
                f"({', '.join(map(str, sorted(peaks))) or 'none'} ran)")
    (b1, p1), (b2, p2) = sorted(peaks.items())[-2:]
    per_row = (p2 - p1) / (b2 - b1)
    need = p2 + (batch - b2) * per_row
    most = int(b2 + (have_mb - p2) // per_row) if per_row > 0 else b2
    return (f"does not fit: batch {batch} would need about {need / 1024:.1f} GiB ({p2 / 1024:.1f} at batch {b2} "
            f"+ {per_row / 1024:.2f} per row), the device has {have_mb / 1024:.1f}: {need / 1024 - have_mb / 1024:.1f}"
            f" GiB over; batch {most} fits")


def run(flags, out, batch):
    """One train.main run at `batch`; its phases.json, or None if a GPU ran out of memory."""
    gc.collect()                  # the previous run's models, held in reference cycles, go first
    reset_peak(torch.device("cuda" if torch.cuda.is_available() else "cpu"))   # from here, not the writing's
    try:
        train.main(flags + ["--batch", str(batch), "--out", out])
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None
    with open(os.path.join(out, "phases.json")) as f:
        return json.load(f)


def table(first, later, extra=()):
    """Markdown rows: each phase's seconds in the first step (start-up costs: caches, lazy reads of the
    weights, the loader's workers) and on average over the later ones, then `extra` (name, value) rows."""
    mean = {k: sum(s.get(k, 0.0) for s in later) / max(len(later), 1) for k in PHASES + PERIODIC}
    total = lambda d: sum(d.get(k, 0.0) for k in PHASES)                       # noqa: E731
    lines = [f"| phase | first step, s | later steps ({len(later)}), s | share of a later step |", "|---|---|---|---|"]
    lines += [f"| {k} | {first.get(k, 0):.3g} | {mean[k]:.3g} | {100 * mean[k] / max(total(mean), 1e-9):.0f} % |"
              for k in PHASES if k in first or mean[k]]
    lines += [f"| **a step** | {total(first):.3g} | {total(mean):.3g} | |"]
    lines += [f"| {k} (periodic) | {first.get(k, 0):.3g} | {mean[k]:.3g} | |" for k in PERIODIC]
    return "\n".join(lines + [f"| {k} | {v} | | |" for k, v in extra])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=512, help="HR crop (train.py --size)")
    p.add_argument("--batch", type=int, default=10, help="per GPU (train.py --batch; the paper: 80 over 8)")
    p.add_argument("--steps", type=int, default=2, help="steps before the resume (which runs one more)")
    p.add_argument("--depth", type=int, default=0, help="joint blocks (0: DiT4SR's 24; fewer for a quick check)")
    p.add_argument("--no-grad-ckpt", action="store_true", help="without train.py --grad-ckpt")
    p.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp32"), help="train.py --dtype")
    p.add_argument("--compile", action="store_true", help="train.py --compile")
    p.add_argument("--mode", default="split", choices=("split", "fused"), help="train.py --mode")
    p.add_argument("--workers", type=int, default=-1, help="train.py --workers (-1: its default)")
    p.add_argument("--memory-gib", type=float, default=0.0, help="judge against this much (0: the device's)")
    p.add_argument("--workdir", default="", help="where the files go (default: a temporary folder, removed)")
    p.add_argument("--markdown", default="", help="also write the table to this file")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    work = args.workdir or tempfile.mkdtemp(prefix="mfsr-rehearsal-")
    try:
        print(f"writing random full-size weights in the released layouts to {work} ...", flush=True)
        flags = write_inputs(work, args.depth, args.size)
        flags += ["--size", str(args.size), "--steps", str(args.steps), "--save-every", "1", "--sample-every",
                  str(args.steps), "--log-every", "1", "--diagnose-every", "0", "--profile-phases",
                  "--dtype", args.dtype, "--mode", args.mode, "--workers", str(args.workers)]
        flags += ([] if args.no_grad_ckpt else ["--grad-ckpt"]) + (["--compile"] if args.compile else [])
        peaks, recs, batch = {}, {}, args.batch
        while batch >= 1:           # on a GPU that runs out of memory: smaller batches, to say by how much
            out = os.path.join(work, f"run-batch{batch}")
            rec = run(flags, out, batch)
            if rec is None:
                print(f"batch {batch}: out of memory", flush=True)
                batch //= 2
                continue
            peaks[batch], recs[batch] = rec["peak_mb"], rec
            if batch == args.batch or len(peaks) == 2:
                break
            batch //= 2
        if not peaks:
            raise SystemExit(verdict(args.batch, peaks, device_memory_mb(device)))
        best = max(peaks)
        out = os.path.join(work, f"run-batch{best}")
        steps = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
        grid = os.path.join(out, f"grid-{args.steps:07d}.png")
        print("resuming for one more step ...", flush=True)
        resumed = flags + ["--steps", str(args.steps + 1), "--resume"]
        before = recs[best]["steps"]
        rec = run(resumed, out, best)
        if rec is None:
            raise SystemExit(f"the resumed run at batch {best} ran out of memory where the first did not: "
                             f"memory is too tight to rehearse; try --batch {max(1, best // 2)}")
        after = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
        have = args.memory_gib * 1024 or device_memory_mb(device)
        cfg = teacher_config(args.depth)
        with torch.device("meta"):
            params = sum(p.numel() for p in model.MMDiT(cfg).parameters())
            trained = [p for p in model.make_student(model.MMDiT(cfg), lora_rank=64).parameters() if p.requires_grad]
        checks = [("device", f"{device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'})"),
                  ("teacher", f"DiT4SR layout, {cfg.depth} blocks, hidden {cfg.hidden}, {params:,} parameters"),
                  ("crop, batch", f"{args.size}^2, {best}{'' if best == args.batch else f' (asked {args.batch})'}"),
                  ("losses", ", ".join(f"{r['loss']:.4g}" for r in after)),
                  ("progress grid", "written" if os.path.exists(grid) else "MISSING"),
                  ("save, resume", f"ckpt-{args.steps:07d} -> step {after[-1]['step']}"
                                   if len(after) == len(steps) + 1 else "FAILED"),
                  ("export", "student.safetensors written" if os.path.exists(os.path.join(
                      out, f"ckpt-{args.steps + 1:07d}", "student.safetensors")) else "MISSING"),
                  ("all-reduce", f"one process: none; under torchrun {len(trained)} gradients, "
                                 f"{4 * sum(p.numel() for p in trained) / 2 ** 30:.2f} GiB a step, in "
                                 f"{len(runs.buckets(trained))} flat buckets"),
                  ("peak memory", f"{peaks[best] / 1024:.2f} GiB ({'allocated' if device.type == 'cuda' else 'RSS'})"),
                  ("verdict", verdict(args.batch, peaks, have))]
        text = table(before[0], before[1:] + rec["steps"], checks)
        print(text)
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write(text + "\n")
        ok = all(math.isfinite(r["loss"]) for r in after) and "MISSING" not in text and "FAILED" not in text
        return 0 if ok else 1
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
