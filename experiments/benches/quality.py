"""quality: the miniature's quality table (metrics.table_row per method and setting) on the held-out
photographs, the peers' rows beside it, and the start-time sweep; metrics: what each column costs."""
import os
import subprocess
import tempfile
import time

import torch
import torch.nn.functional as F

from benches.common import bench, markdown_table, median_times

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


# The models a user would pick instead (issues 44, 51), through ncnn (experiments/ncnn_sr.py), on
# the same crops and LR as miniature.evaluate (heldout_pairs with its seed 0, one crop per photo),
# the same metrics; no teacher comparison ("-"). Optional: without their packages, one line each.
PEER_ROWS = {"spanx4_ch48": "SPAN x4, spanx4_ch48 (bicubic-trained; ncnn)",
             "ClearReality4x": "SPAN x4, ClearReality4x (real-world; ncnn)",
             "realesrgan-x4plus": "Real-ESRGAN x4plus (real-world; ncnn)"}


def peer_quality_rows(size, setting, names, teacher_steps):
    """Rows of the PEER_ROWS installed here on the quality table's crops of one setting (keys as
    evaluate's rows)."""
    import metrics
    import miniature
    import ncnn_sr
    hr, lr = miniature.heldout_pairs(size, 1, 0, setting, names)
    rows = []
    for name, method in PEER_ROWS.items():
        if ncnn_sr.missing(name):
            continue
        net = ncnn_sr.load(name, threads=torch.get_num_threads())   # beside torch: no more threads than it has
        ncnn_sr.upscale(net, lr[0].numpy())                       # ncnn's first call sets up; not timed
        t0 = time.perf_counter()
        out = torch.from_numpy(ncnn_sr.upscale_batch(net, lr))   # (B, 3, size, size)
        secs = (time.perf_counter() - t0) / len(lr)
        rows.append({"method": method, **metrics.table_row(out, hr), f"PSNR vs teacher {teacher_steps}": None,
                     "s / image": secs})
    return rows


def _plot_points(rows, cfg_scale, teacher_steps):
    """{name: (PSNR, LPIPS)} of one setting's rows that the start sweep's plot marks."""
    import miniature
    names = {"bicubic": "bicubic", **{miniature.teacher_name(k, cfg_scale): f"teacher, {k} step{'s' * (k > 1)}"
                                      for k in sorted({1, 4, teacher_steps})},
             **{m: m.split(" (")[0] for m in PEER_ROWS.values()}}
    return {names[r["method"]]: (r["PSNR"], r["LPIPS"]) for r in rows if r["method"] in names}


@bench
def bench_quality(args):
    """metrics.table_row against HR (PSNR, SSIM, LPIPS, DISTS, NIQE, speckle, texture), PSNR against
    the 40-step teacher, seconds per image; one table per setting (Real-ESRGAN degradation, clean
    bicubic), rows tagged by "setting"; the peers' rows (PEER_ROWS) last, where installed. Then the
    start-time sweep (experiments/start_sweep.py): its tables, and its PSNR-LPIPS plot."""
    import miniature
    import ncnn_sr
    import start_sweep
    from benches.common import print_table
    if args.quick:   # CI: the scikit-image photographs only (no Debian packages needed), 192^2, 8 steps
        size, steps, names = 192, 8, miniature.SKIMAGE_HELD_OUT   # 192: NIQE's two 96^2 blocks
    else:
        size, steps, names = 256, 40, miniature.HELD_OUT
    shipped = miniature.load_shipped()
    nets = shipped[0]
    start = nets["student"].sampling.get("start", 0.0)        # sample.py's default for the shipped student
    chosen = (1, start)
    starts = (0.0, start) if args.quick else start_sweep.STARTS
    rows, figure, sweeps, points = [], [], {}, {}
    for name in PEER_ROWS:
        if ncnn_sr.missing(name):
            print(f"{name} rows skipped: {ncnn_sr.missing(name)}")
    for setting in miniature.SETTINGS:
        r, f = miniature.evaluate(size=size, teacher_steps=steps, setting=setting, names=names,
                                  previous=_previous_release(getattr(args, "previous", None)))
        r += peer_quality_rows(size, setting, names, steps)
        rows += [{"setting": setting, **row} for row in r]
        figure.append(f)
        sweeps[setting] = start_sweep.sweep_rows(size, setting, names, starts, (1, 2) if args.quick else (1, 2, 4),
                                                 shipped=shipped)
        points[setting] = _plot_points(r, nets["teacher"].sampling["cfg"], steps)
    figures = {f"{r['setting']}/{r['method']}": {k: v for k, v in r.items() if k not in ("method", "setting")}
               for r in rows}
    figures.update({f"{s}/start sweep/{r['steps']} steps, t0 = {r['start']:g}": r for s, rs in sweeps.items() for r in rs})
    title = (f"quality: {miniature.SHIP}, {len(names)} held-out photographs ({', '.join(names)}), one {size}^2 "
             f"crop each, LR x4 by each setting, seed 0 (threads {torch.get_num_threads()})")
    for setting, rs in sweeps.items():
        print_table(f"start sweep (sample.py --start-time, --steps), {miniature.SETTINGS[setting]}", rs)
    if not args.quick:   # the figures and the model card's metrics.md, beside the shipped model
        miniature.save_figure(figure, os.path.join(miniature.SHIP, "figure.png"))
        if start_sweep.missing_plotter():
            print(f"the start sweep's plot skipped: {start_sweep.missing_plotter()}")
        else:
            start_sweep.plot(sweeps, points, os.path.join(miniature.ROOT, "docs", "start_sweep.png"), chosen)
        tmp = os.path.join(miniature.SHIP, "metrics.md.tmp")
        with open(tmp, "w") as f:
            f.write(f"# {title}\n\n`python experiments/bench.py quality` ({time.strftime('%Y-%m-%d')})\n")
            for setting, what in miniature.SETTINGS.items():
                table = [{k: v for k, v in r.items() if k != "setting"} for r in rows if r["setting"] == setting]
                f.write(f"\n## {what}\n\n{markdown_table(table)}")
                f.write(f"\n### The start sweep (sample.py --start-time, --steps)\n\n{markdown_table(sweeps[setting])}")
        os.replace(tmp, os.path.join(miniature.SHIP, "metrics.md"))
    return title, rows, figures
