"""The fidelity-realism trade-off of the start time t0 (sample.py --start-time), measured.

    python experiments/bench.py quality        # the sweep's tables, docs/start_sweep.png and the README's rows

The student's jump can start anywhere on the path from noise (t0 = 0, the paper's Alg. 2) to the
image (t0 -> 1): from z_t0 = t0 z_LR + (1 - t0) eps, with the LR latent standing in for the unknown
HR one (mfsr.start_latent). Started late, it invents less: PSNR rises towards bicubic's, the grain
the miniature paints in flat areas (speckle) falls, and LPIPS gives back some of what the jump won.
This sweeps t0 for 1, 2 and 4 steps on the held-out crops, in both settings, and plots PSNR against
LPIPS beside bicubic, the teacher and the peers (SPAN x4, ClearReality4x, Real-ESRGAN x4plus).
The plot is optional (matplotlib, requirements-test.txt): without it the tables are still printed.
"""
import importlib.util
import os

import metrics
import miniature
from plumbing import checkpoints

STARTS = (0.0, 0.5, 0.75, 0.85, 0.9, 0.95, 0.965, 0.98)
STEPS = (1, 2, 4)


def sweep_rows(size, setting, names, starts=STARTS, steps=STEPS, seed=0, shipped=None):
    """[{steps, start, PSNR, LPIPS, speckle}] of the shipped student on the quality table's crops
    of one setting (miniature.heldout_pairs, the same seed), sampled as sample.py samples.
    shipped: miniature.load_shipped()'s result, if the caller has it already."""
    nets, vae, embs = shipped or miniature.load_shipped()
    hr, lr = miniature.heldout_pairs(size, 1, seed, setting, names)
    prompt = checkpoints.prompt_rows(embs["prompt"])
    rows = []
    for k in steps:
        for t0 in starts:
            x = miniature.upscale_crops(lr, nets["student"], vae, prompt, k, seed=seed, start=t0)
            rows.append({"steps": k, "start": t0, "PSNR": metrics.psnr(x, hr).mean().item(),
                         "LPIPS": metrics.lpips(x, hr).mean().item(), "speckle": metrics.speckle(x, hr).mean().item()})
    return rows


def missing_plotter():
    """None if the plot can be drawn, else one line with the install command."""
    return None if importlib.util.find_spec("matplotlib") else "matplotlib not installed (pip install matplotlib)"


def plot(sweeps, points, path, chosen=None):
    """One panel per setting: PSNR (x) against LPIPS (y, lower is better), a curve per step count
    through the starts (labelled by t0), and a marker per point. sweeps {setting: sweep_rows};
    points {setting: {name: (PSNR, LPIPS)}}; chosen: (steps, start) circled as sample.py's default.
    Written atomically as a PNG."""
    import matplotlib
    matplotlib.use("Agg")                                  # files only, no display
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(sweeps), figsize=(6.5 * len(sweeps), 5.5))
    for ax, (setting, rows) in zip(axes, sweeps.items()):
        for k in sorted({r["steps"] for r in rows}):
            curve = [r for r in rows if r["steps"] == k]
            ax.plot([r["PSNR"] for r in curve], [r["LPIPS"] for r in curve], "-o", ms=3,
                    label=f"student, {k} step{'s' * (k > 1)}, t0 = {curve[0]['start']:g} ... {curve[-1]['start']:g}")
            if k == 1:
                for r in curve:
                    ax.annotate(f"{r['start']:g}", (r["PSNR"], r["LPIPS"]), fontsize=7, xytext=(3, -9),
                                textcoords="offset points")
        if chosen:
            r = next((r for r in rows if (r["steps"], r["start"]) == chosen), None)
            if r is None:
                raise ValueError(f"the default (steps, start) {chosen} is not among the swept ones")
            ax.plot(r["PSNR"], r["LPIPS"], "o", ms=12, mfc="none", mec="black",
                    label=f"sample.py's default ({chosen[0]} step, t0 = {chosen[1]:g})")
        for (name, (p, l)), mark in zip(points[setting].items(), "sD^v<>p*hX"):
            ax.plot(p, l, mark, ms=7, label=name)
        ax.set(title=miniature.SETTINGS[setting], xlabel="PSNR to HR, dB (higher: more faithful)",
               ylabel="LPIPS to HR (lower: closer as people see it)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
