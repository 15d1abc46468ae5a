"""sample: the shipped miniature end to end, student vs 40-step CFG teacher, in process (fp32, bf16),
and `python sample.py photo.png` as whole processes beside SPAN x4: time, peak memory, GFLOP."""
import math
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

from benches.common import ROOT, bench, median_times, peak_mb, whole_process

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
    import fastjvp
    import sample
    from torch.utils.flop_counter import FlopCounterMode
    from plumbing import tiling
    ckpt = os.path.join(sample.SHIPPED, "student.safetensors")
    net, vae = sample.load_models(ckpt)
    net, vae = fastjvp.accelerate(net.to("meta")), vae.to("meta")          # as sample.py runs them
    prompt = sample.load_condition(net.cfg, ckpt)[0].to("meta")   # sample.py's prompt
    st = sample.sampling_settings(net)
    m = vae.cfg.factor * net.cfg.patch
    x = torch.empty(1, 3, -(-4 * h // m) * m, -(-4 * w // m) * m, device="meta")      # padded as upscale pads
    counts = {}
    with torch.inference_mode():
        with FlopCounterMode(display=False) as fc:
            z = tiling.encode(vae, x)
        counts["VAE encode"] = fc.get_total_flops() / 1e9
        tiles = len(tiling.TiledNet(net, st["tile"], st["tile_overlap"]).tiles(*z.shape[-2:]))
        one = z[..., :st["tile"], :st["tile"]]
        with FlopCounterMode(display=False) as fc:
            net(one, torch.ones(1, device="meta"), prompt.pooled, prompt.context, lr=one, sigma_s=torch.zeros(1, device="meta"))
        counts["network"] = tiles * fc.get_total_flops() / 1e9
        with FlopCounterMode(display=False) as fc:
            tiling.decode(vae, z)
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
