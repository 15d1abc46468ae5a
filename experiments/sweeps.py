"""Measurements around the miniature: the paper's ablations and scans of the teacher's size and training length.

    python experiments/sweeps.py --ablations     # Tables 3 and 4, c_noise, the loss, from the trained teacher -> docs/ablations.md
    python experiments/sweeps.py --size-scan     # teachers of other sizes, 40-step quality -> docs/model_size.md
    python experiments/sweeps.py --length-scan   # the smallest teacher trained 2500 / 5000 / 10000 steps -> docs/teacher_length.md
    python experiments/sweeps.py --teacher-samples   # the teacher's 40-step samples against their mean -> docs/teacher_samples.md
    python experiments/sweeps.py --pairs-scan    # students with other (t, s) draws / anchors vs the 40-step teacher -> docs/time_pairs.md
    python experiments/sweeps.py --tile-scan     # the shipped student's latent tiles: seams, quality, time -> docs/tiles.md
    python experiments/sweeps.py --cutoff-check miniature-v2   # a low-passed time embedding in a 1000 t teacher -> docs/time_embedding.md

The ablations need a finished `python experiments/miniature.py` run's folder (--runs: its teacher, decoder and
data); the two scans prepare the data in --runs themselves and train on the shipped VAE's latents;
the teacher samples use the shipped files only. Every training run is a train.py run through
miniature.train_stage, resumable; the tables use the held-out crops of `bench.py quality`.
"""
import argparse
import glob
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the core files at the root

import model
import sample
from plumbing import checkpoints, tiling
import metrics
from metrics import mse, mse_to_psnr
from miniature import (HELD_OUT, SETTINGS, SHIP, STAGES, TRAIN_SIZE, bicubic_up, heldout_pairs, load_shipped,
                       prepare_data, train_stage, upscale_crops)

# The paper's ablations at miniature size (`python experiments/sweeps.py --ablations`): short distillations
# of the one shipped teacher, each changing one setting of the paper's row "neg-CFG"; 1-step student
# metrics on the held-out crops in both settings. Eq. 11's w is ABLATION_W for every CFG row
# (the pipeline's CFG scan chose w = 0, where Eq. 10 and Eq. 11 coincide).

ABLATION_STEPS, ABLATION_WARMUP, ABLATION_W = 200, 40, 0.5
ABLATIONS = [  # (table, row, flags that replace the base's)
    ("Table 3: target", "gt (row 1)", "--target gt"),
    ("Table 3: target", "MeanFlow CFG, Eq. 9 (w 1, kappa 0.83, condition dropped 10 %)",
     "--target meanflow --cfg-w 1 --kappa 0.83 --cond-drop 0.1"),
    ("Table 3: target", "null-prompt CFG, Eq. 10", "--target null"),
    ("Table 3: target", "negative-prompt CFG, Eq. 11 (the base row)", ""),
    ("Table 4: share of rows with s != t", "0", "--ratio 0"),
    ("Table 4: share of rows with s != t", "0.25", "--ratio 0.25"),
    ("Table 4: share of rows with s != t", "1", "--ratio 1"),
    ("§4.4: c_noise", "1000 t (SD3's; the teacher sees t)", "--time-scale 1000"),
    ("loss", "squared L2", "--loss l2"),
    ("loss", "adaptive L2", "--loss adaptive"),
]


def _with_flags(argv, flags):
    """argv with each "--flag value" pair of `flags` replacing that flag's value, or appended."""
    argv = list(argv)
    flags = flags.split()
    for i in range(0, len(flags), 2):
        if flags[i] in argv:
            argv[argv.index(flags[i]) + 1] = flags[i + 1]
        else:
            argv += flags[i:i + 2]
    return argv


def _write_table(dest, lines):
    """The table's lines to `dest`, atomically."""
    os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
    with open(dest + ".tmp", "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(dest + ".tmp", dest)
    print(f"wrote {dest}")


# One cell per setting holds metrics.table_row's columns, in this order (NIQE "-" below 192^2 crops).
CELL = "PSNR / SSIM / LPIPS / DISTS / NIQE / speckle / HF"


def _cells(m):
    """The table's cells of {setting: metrics.table_row}, one per setting, as CELL says."""
    return [" / ".join("-" if x is None else f"{x:.3g}" for x in m[s].values()) for s in SETTINGS]


@torch.no_grad()
def student_metrics(runs, student, size=128, names=HELD_OUT):
    """The 1-step student on one size^2 crop of each held-out photograph, per setting:
    {setting: metrics.table_row}, sampled as sample.py samples (tiles, AdaIN)."""
    v = checkpoints.load_vae(os.path.join(runs, "decoder", "final", "vae.safetensors")).eval()
    net = checkpoints.load_transformer(student).eval()
    prompt = checkpoints.load_embedding(os.path.join(runs, "emb", "prompt.safetensors"), checkpoints.zero_prompt(net.cfg))
    out = {}
    for setting in SETTINGS:
        hr, lr = heldout_pairs(size, 1, 0, setting, names)
        sr = upscale_crops(lr, net, v, checkpoints.prompt_rows(prompt), 1)
        out[setting] = metrics.table_row(sr, hr)
    return out


def _log_medians(out, after):
    """Median gradient norm and jvp_term (||u_tgt - v|| / ||v||, largest of the batch) of a run's
    steps after `after` (the warm-up), from its log.jsonl."""
    rows = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    rows = [r for r in rows if r["step"] > after]
    med = lambda k: float(np.median([r[k] for r in rows if k in r])) if any(k in r for r in rows) else float("nan")
    return med("grad_norm"), med("jvp_term")


def ablations(runs, scale=1.0, workers=2, dest="docs/ablations.md"):
    """Every ABLATIONS row distilled for ABLATION_STEPS (scaled) from the shipped pipeline's
    teacher, then measured; the table is printed and written to `dest`."""
    for stage in ("teacher", "decoder"):
        if not os.path.exists(os.path.join(runs, stage, "final")):
            raise SystemExit(f"error: {runs}/{stage}/final is missing: run `python experiments/miniature.py --runs {runs}` first")
    base = _with_flags(dict(STAGES)["student"].format(runs=runs, size=TRAIN_SIZE, w=ABLATION_W).split(),
                       f"--steps {ABLATION_STEPS} --warmup {ABLATION_WARMUP} --time-scale 1")   # the student
    # stage, shorter, with the paper's c_noise = t (§4.4), so the rows vary the paper's recipe
    lines = ["# The paper's ablations at miniature size", "",
             f"`python experiments/sweeps.py --ablations` ({time.strftime('%Y-%m-%d')}): each row a distillation of "
             f"{max(2, round(ABLATION_STEPS * scale))} steps ({max(1, round(ABLATION_WARMUP * scale))} of them "
             f"warm-up at s = t) from the miniature's teacher, changing one setting of the Eq. 11 row "
             f"(w = {ABLATION_W:g}, ratio 0.5, pseudo-Huber, c_noise = t). The 1-step student on a 128^2 crop "
             f"of each of the {len(HELD_OUT)} held-out photographs; grad norm and jvp_term are medians over "
             "the steps after the warm-up (jvp_term: the batch's largest ||u_tgt - v|| / ||v||).", "",
             f"| table | row | Real-ESRGAN {CELL} | clean bicubic {CELL} | grad norm | jvp_term | minutes |",
             "|---|---|---|---|---|---|---|"]
    for i, (table, row, flags) in enumerate(ABLATIONS):
        out = os.path.join(runs, "ablations", f"{i:02d}")
        if not os.path.exists(os.path.join(out, "final")):
            train_stage(runs, "student", _with_flags(base, flags), out, scale, workers)
        m = student_metrics(runs, os.path.join(out, "final", "student.safetensors"))
        gnorm, jvp_term = _log_medians(out, max(1, round(ABLATION_WARMUP * scale)))
        cells = _cells(m)
        minutes = open(os.path.join(out, "final", "minutes.txt")).read().strip()
        lines.append(f"| {table} | {row} | {cells[0]} | {cells[1]} | {gnorm:.3g} | {jvp_term:.3g} | {minutes} |")
        print(lines[-1], flush=True)
    _write_table(dest, lines)


# The size scan (is the miniature capacity-limited?): teachers of other (depth, heads) trained as
# the "teacher" stage, each on the shipped VAE's latents; the 40-step teacher bounds what a distilled
# student can reach. 3 x 2 (the shipped size) is the shipped teacher; 4 x 3 has 2.9x its parameters,
# more than three transformer files can have within the 25 MB the miniature may ship.
SIZE_SCAN = ((2, 1), (3, 2), (4, 3))


@torch.no_grad()
def teacher_metrics(net, v, embs, steps=40, size=256, names=HELD_OUT):
    """The `steps`-step teacher at its recorded CFG scale on one size^2 crop of each held-out
    photograph, per setting: {setting: metrics.table_row}, sampled as sample.py samples."""
    out = {}
    for setting in SETTINGS:
        hr, lr = heldout_pairs(size, 1, 0, setting, names)
        out[setting] = metrics.table_row(_teacher_sr(net, v, embs, lr, steps), hr)
    return out


def _teacher_sr(net, v, embs, lr, steps, seed=0):
    """The teacher's x4 samples of every LR image, one at a time as sample.py samples them."""
    cond = {e: checkpoints.prompt_rows(p) for e, p in embs.items()}
    return upscale_crops(lr, net, v, cond["prompt"], steps, teacher=True, cond_neg=cond["neg"], seed=seed)


def scan_teacher(runs, depth, heads, cfg_scale, scale=1.0, workers=2, steps=None):
    """The "teacher" stage at (depth, heads), and `steps` if given, on the shipped VAE's latents, into
    runs/size-scan/{depth}x{heads}[-{steps}] (resumed, or reused when done): (net set to sample at
    `cfg_scale`, the shipped teacher's, its training minutes)."""
    out = os.path.join(runs, "size-scan", f"{depth}x{heads}" + (f"-{steps}" if steps else ""))
    vae_path = os.path.abspath(os.path.join(SHIP, "vae.safetensors"))
    argv = _with_flags(dict(STAGES)["teacher"].format(runs=runs, size=TRAIN_SIZE).split(),
                       f"--depth {depth} --heads {heads} --vae {vae_path}" + (f" --steps {steps}" if steps else ""))
    done = glob.glob(os.path.join(runs, "size-scan", "*", "latents-0.safetensors"))
    if done and not os.path.exists(os.path.join(out, "latents-0.safetensors")):   # the same pairs for all
        os.makedirs(out, exist_ok=True)
        os.link(done[0], os.path.join(out, "latents-0.safetensors"))
    if not os.path.exists(os.path.join(out, "final")):
        train_stage(runs, "teacher", argv, out, scale, workers)
    net = checkpoints.load_transformer(os.path.join(out, "final", "teacher.safetensors")).eval()
    net.sampling = {**net.sampling, "cfg": cfg_scale}
    return net, open(os.path.join(out, "final", "minutes.txt")).read().strip()


def size_scan(runs, scale=1.0, workers=2, dest="docs/model_size.md", sizes=SIZE_SCAN, eval_steps=40, eval_size=256):
    """Every SIZE_SCAN teacher trained with the shipped recipe (steps scaled) unless it is the
    shipped size, then its `eval_steps`-step samples measured on `eval_size`^2 held-out crops; the
    table is printed and written to `dest`."""
    prepare_data(runs)
    shipped, v, embs = load_shipped()
    shipped = shipped["teacher"]
    cfg_scale = sample.sampling_settings(shipped)["cfg"]
    steps = max(2, round(int(dict(STAGES)["teacher"].split("--steps ")[1].split()[0]) * scale))
    lines = ["# Teacher size at miniature scale", "",
             f"`python experiments/sweeps.py --size-scan` ({time.strftime('%Y-%m-%d')}): the teacher stage of "
             f"`miniature.STAGES` ({steps} steps) at each (depth, heads of 64 channels), on the shipped VAE's "
             f"latents; the shipped size is the shipped teacher. Each sampled with {eval_steps} steps at CFG "
             f"scale {cfg_scale:g} (the shipped one) on a {eval_size}^2 crop of each of the {len(HELD_OUT)} held-out "
             "photographs. A distilled student is measured against the 40-step teacher, so the teacher's "
             "row bounds what its student can reach. fp16 MB: one transformer file as shipped (three are shipped).",
             "", f"| depth x width | parameters | fp16 MB | Real-ESRGAN {CELL} | clean bicubic {CELL} | minutes |", "|---|---|---|---|---|---|"]
    for depth, heads in sizes:
        if (depth, heads) == (shipped.cfg.depth, shipped.cfg.heads):
            net = shipped
            minutes = f'{json.load(open(os.path.join(SHIP, "training.json")))["minutes"]["teacher"]:.1f} (shipped run)'
        else:
            net, minutes = scan_teacher(runs, depth, heads, cfg_scale, scale, workers)
        m = teacher_metrics(net, v, embs, eval_steps, eval_size)
        n = sum(p.numel() for p in net.parameters())
        cells = _cells(m)
        lines.append(f"| {depth} x {net.cfg.hidden} | {n / 1e6:.2f} M | {2 * n / 1e6:.1f} | {cells[0]} | {cells[1]} "
                     f"| {minutes} |")
        print(lines[-1], flush=True)
    _write_table(dest, lines)


# The length scan (is the teacher training-limited?): the smallest SIZE_SCAN teacher trained for
# each of LENGTHS steps (the shipped recipe's 5000 among them, its cosine schedule stretched to each).
LENGTH_SCAN = (2, 1)
LENGTHS = (2500, 5000, 10000)


def length_scan(runs, scale=1.0, workers=2, dest="docs/teacher_length.md", size=LENGTH_SCAN, lengths=LENGTHS,
                eval_steps=40, eval_size=256):
    """The `size` teacher trained for each of `lengths` steps (scaled), then measured as in size_scan."""
    prepare_data(runs)
    shipped, v, embs = load_shipped()
    cfg_scale = sample.sampling_settings(shipped["teacher"])["cfg"]
    lines = ["# Teacher training length at miniature scale", "",
             f"`python experiments/sweeps.py --length-scan` ({time.strftime('%Y-%m-%d')}): the teacher stage of "
             f"`miniature.STAGES` at {size[0]} blocks x {64 * size[1]} channels for each number of steps "
             "(learning rate annealed to 0 over each), on the shipped VAE's latents and the same cached pairs. "
             f"Each sampled with {eval_steps} steps at CFG scale {cfg_scale:g} on a {eval_size}^2 crop of each "
             f"of the {len(HELD_OUT)} held-out photographs.", "",
             f"| steps | Real-ESRGAN {CELL} | clean bicubic {CELL} | minutes |", "|---|---|---|---|"]
    for steps in lengths:
        net, minutes = scan_teacher(runs, *size, cfg_scale, scale, workers, steps)
        m = teacher_metrics(net, v, embs, eval_steps, eval_size)
        cells = _cells(m)
        lines.append(f"| {max(2, round(steps * scale))} | {cells[0]} | {cells[1]} | {minutes} |")
        print(lines[-1], flush=True)
    _write_table(dest, lines)


# Are the teacher's 40-step samples draws from a posterior? K samples per crop (seeds 0..K-1): with
# independent draws, one sample's squared error is M + V and the mean of K's is M + V / K, where M
# is the error of the posterior mean (the best any deterministic one-step map can do) and V the
# samples' spread; so M = (K * mse(mean) - mse(one)) / (K - 1). For exact posterior draws V = M,
# and one sample's PSNR is 10 log10(2) = 3.0 dB below the posterior mean's.
SAMPLE_SEEDS = 4


@torch.no_grad()
def teacher_samples(runs, scale=1.0, workers=2, dest="docs/teacher_samples.md", seeds=SAMPLE_SEEDS, steps=40,
                    size=256):
    """The shipped teacher's `seeds` samples of `steps` steps per held-out crop, per setting: PSNR of
    bicubic, of the teacher's 1 step, of one sample, of the samples' mean and of the posterior mean
    (estimated), and V / M; printed and written to `dest`. scale multiplies `steps` (a smoke run);
    runs and workers are unused (the CLI passes every sweep the same)."""
    steps = max(2, round(steps * scale))
    nets, v, embs = load_shipped()
    net = nets["teacher"]
    db = lambda m: mse_to_psnr(m).mean().item()        # noqa: E731  mean PSNR of per-image errors
    lines = ["# The teacher's samples against their mean", "",
             f"`python experiments/sweeps.py --teacher-samples` ({time.strftime('%Y-%m-%d')}): the shipped teacher, {steps} "
             f"steps at its CFG scale {sample.sampling_settings(net)['cfg']:g}, seeds 0..{seeds - 1} on a {size}^2 "
             f"crop of each of the {len(HELD_OUT)} held-out photographs. PSNR per image, averaged; the posterior "
             f"mean's error M = ({seeds} mse(mean) - mse(one)) / {seeds - 1} per image, V = mse(one) - M (see sweeps.py).",
             "", f"| setting | bicubic | teacher 1 step | one {steps}-step sample | mean of the samples | posterior mean "
             "(estimated) | V / M |", "|---|---|---|---|---|---|---|"]
    for setting in SETTINGS:
        hr, lr = heldout_pairs(size, 1, 0, setting)
        bic = bicubic_up(lr, hr.shape[-2:])
        draws = torch.stack([_teacher_sr(net, v, embs, lr, steps, seed) for seed in range(seeds)])
        one = torch.stack([mse(x, hr) for x in draws]).mean(0)
        mean = mse(draws.mean(0), hr)
        post = (seeds * mean - one) / (seeds - 1)
        lines.append(f"| {SETTINGS[setting]} | {db(mse(bic, hr)):.2f} | {db(mse(_teacher_sr(net, v, embs, lr, 1), hr)):.2f} "
                     f"| {db(one):.2f} | {db(mean):.2f} | {db(post):.2f} | {((one - post) / post).mean().item():.2f} |")
        print(lines[-1], flush=True)
    _write_table(dest, lines)


# The time-pair scan (issue 42): how the (t, s) pairs are drawn decides how much of the teacher's
# 40-step flow map the student learns. The miniature's student stage with one change each (steps
# PAIR_SCAN_STEPS), from the pipeline's teacher; each 1- and 2-step student against the 40-step
# teacher's samples from the same noise (PSNR) and against the HR.
PAIR_SCAN_STEPS = 1200        # the student stage's own length: a row can ship as it is
PAIR_SCAN = [  # (row, flags replacing the student stage's)
    ("uniform, ratio 0.5 (the paper's)", "--time-pairs uniform --ratio 0.5 --anchor 0"),
    ("to-data, ratio 0.75", "--time-pairs to-data --ratio 0.75 --anchor 0"),
    ("logit-normal, ratio 0.75 (py-meanflow's)", "--time-pairs logit-normal --ratio 0.75 --anchor 0"),
    ("uniform, ratio 0.75, s - t capped, the cap ramped to 1 over 200 steps", "--time-pairs uniform --ratio 0.75 --gap-ramp 200 --anchor 0"),
    ("to-data, ratio 0.75, a quarter of the rows anchored on 40-step samples",
     "--time-pairs to-data --ratio 0.75 --anchor 0.25"),
]


@torch.no_grad()
def versus_teacher(runs, students, size=256, names=HELD_OUT, teacher_steps=40):
    """{row: {setting: {column: value}}} for the pipeline's teacher (1 step, 2 and 4 uniform
    steps) and each {row: student file} (1 and 2 steps) on the bench's held-out crops: PSNR to the
    teacher's `teacher_steps`-step samples from the same noise, and PSNR, LPIPS and speckle
    against the HR. The teacher's samples are kept in runs/pairs-scan/ (they take minutes)."""
    from miniature import chosen_cfg
    v = checkpoints.load_vae(os.path.join(runs, "decoder", "final", "vae.safetensors")).eval()
    teacher = checkpoints.load_transformer(os.path.join(runs, "teacher", "final", "teacher.safetensors")).eval()
    teacher.sampling = {**teacher.sampling, "cfg": chosen_cfg(runs)}
    embs = {e: checkpoints.load_embedding(os.path.join(runs, "emb", e + ".safetensors"), checkpoints.zero_prompt(teacher.cfg))
            for e in ("prompt", "neg")}
    cond = {e: checkpoints.prompt_rows(p) for e, p in embs.items()}

    def sr(net, lr, steps, **kw):
        return upscale_crops(lr, net, v, cond["prompt"], steps, cond_neg=cond["neg"], **kw)
    rows = {}
    for setting in SETTINGS:
        hr, lr = heldout_pairs(size, 1, 0, setting, names)
        cache = os.path.join(runs, "pairs-scan", f"teacher{teacher_steps}-{setting}-{size}.pt")
        if not os.path.exists(cache):
            os.makedirs(os.path.dirname(cache), exist_ok=True)
            torch.save(sr(teacher, lr, teacher_steps, teacher=True), cache + ".tmp")
            os.replace(cache + ".tmp", cache)
        ref = torch.load(cache)
        outs = {f"teacher {k} step{'s' * (k > 1)}{', uniform grid' * (k > 1)}":
                sr(teacher, lr, k, teacher=True, grid="uniform") for k in (1, 2, 4)}
        outs[f"teacher {teacher_steps} steps"] = ref
        for name, path in students.items():
            net = checkpoints.load_transformer(path).eval()
            for k in (1, 2):
                outs[f"{name}: {k} step{'s' * (k > 1)}"] = sr(net, lr, k)
        for name, o in outs.items():
            m = metrics.table_row(o, hr)
            rows.setdefault(name, {})[setting] = {
                "PSNR vs teacher": metrics.psnr(o, ref).mean().item() if o is not ref else float("inf"),
                "PSNR": m["PSNR"], "LPIPS": m["LPIPS"], "speckle": m["speckle"]}
    return rows


def _dudt_ratio(out, after, upto=None):
    """Median over a run's logged steps in (after, upto] of du/dt's JVP time term over its secant."""
    rows = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    r = [x["dudt_time"] / x["dudt_secant_time"] for x in rows
         if after < x["step"] <= (upto or x["step"]) and "dudt_time" in x]
    return float(np.median(r)) if r else float("nan")


def pairs_scan(runs, scale=1.0, workers=2, dest="docs/time_pairs.md", rows=None, train_only=False, eval_size=256,
               teacher_steps=40, at_step=None):
    """Every PAIR_SCAN row (or those numbered in `rows`) distilled for PAIR_SCAN_STEPS (scaled) from
    the pipeline's teacher into runs/pairs-scan/NN, then (unless train_only) all of them measured
    by versus_teacher on eval_size^2 crops; the table is printed and written to `dest`. at_step:
    measure the rows' checkpoints of that step instead (the rows that have one; the learning rate is
    constant, so a checkpoint is what a run of that length gives)."""
    for stage in ("teacher", "cfg", "decoder"):
        if not os.path.exists(os.path.join(runs, stage, "final")):
            raise SystemExit(f"error: {runs}/{stage}/final is missing: run `python experiments/miniature.py --runs {runs}` first")
    from miniature import chosen_cfg
    import mfsr
    steps = max(2, round(PAIR_SCAN_STEPS * scale))
    student = dict(STAGES)["student"].format(runs=runs, size=TRAIN_SIZE, w=mfsr.eq11_w(chosen_cfg(runs)))
    warmup = max(1, round(int(student.split("--warmup ")[1].split()[0]) * scale))   # as train_stage scales it
    base = _with_flags(student.split(), f"--steps {PAIR_SCAN_STEPS}")
    files, extra = {}, {}
    for i, (row, flags) in enumerate(PAIR_SCAN):
        out = os.path.join(runs, "pairs-scan", f"{i:02d}")
        if rows is None or i in rows:
            if not os.path.exists(os.path.join(out, "final")):
                train_stage(runs, "student", _with_flags(base, flags), out, scale, workers)
        done = os.path.join(out, f"ckpt-{at_step:07d}" if at_step else "final")
        if os.path.exists(done):
            files[row] = os.path.join(done, "student.safetensors")
            minutes = os.path.join(out, "final", "minutes.txt")
            extra[row] = (_dudt_ratio(out, warmup, at_step),
                          open(minutes).read().strip() if os.path.exists(minutes) and not at_step else "-")
    if train_only:
        return
    m = versus_teacher(runs, files, eval_size, teacher_steps=teacher_steps)
    lines = ["# Time pairs for long jumps (issue 42)", "",
             f"`python experiments/sweeps.py --pairs-scan` ({time.strftime('%Y-%m-%d')}): the miniature's student stage "
             f"({at_step or steps} steps, {warmup} of them at s = t) from the pipeline's teacher, changing how the s != t pairs are "
             f"drawn (`mfsr.sample_times`). On a {eval_size}^2 crop of each of the {len(HELD_OUT)} held-out photographs, "
             f"per setting: PSNR to the {teacher_steps}-step teacher's samples from the same noise (the flow map the "
             "student learns), "
             "then PSNR / LPIPS / speckle against the HR. du/dt ratio: the median over the logged steps of the JVP's "
             "time term over its secant at h = 0.1 (1 when du/dt is the flow's).", "",
             f"| row | Real-ESRGAN: vs teacher {teacher_steps} | PSNR / LPIPS / speckle | clean: vs teacher {teacher_steps} "
             "| PSNR / LPIPS / speckle "
             "| du/dt ratio | minutes |", "|---|---|---|---|---|---|---|"]
    for name, r in m.items():
        cells = [f"{r[s]['PSNR vs teacher']:.2f} | {r[s]['PSNR']:.2f} / {r[s]['LPIPS']:.3f} / {r[s]['speckle']:.2f}"
                 for s in SETTINGS]
        ratio, minutes = extra.get(name.split(":")[0], (float("nan"), "-"))
        lines.append(f"| {name} | {cells[0]} | {cells[1]} | {ratio:.2f} | {minutes} |")
        print(lines[-1], flush=True)
    _write_table(dest, lines)


# What a low-passed time embedding changes in a 1000 t teacher (MMDiTConfig.time_cutoff, for a
# teacher that cannot be retrained at c_noise = t, as SD3.5 / DiT4SR): the teacher's predictions and
# 40-step samples, and the MeanFlow target of a student made from it (at init: the teacher itself).
CUTOFFS = (0.0, 100.0, 20.0, 5.0)


@torch.no_grad()
def cutoff_check(teacher_file, vae_file, emb_dir, dest="docs/time_embedding.md", cutoffs=CUTOFFS, seeds=2, size=128,
                 label=None):
    """On a size^2 crop of every held-out photograph (Real-ESRGAN LR; one latent tile each) and
    `seeds` noises, per cutoff (rad per unit t; 0 none): the teacher's x-hat moved (MSE against the
    uncut teacher, over t = 0 .. 0.95) and its 40-step samples moved; the JVP's time term over its
    secant at h = 0.1 and du/dt's time share, at (t, s) = (0, 1); the MFD target's one-step
    endpoint z_0 + u_tgt(0, 1) against the 40-step teacher's (latent MSE, and cosine of
    u_tgt - v with the right correction). Printed, and written to `dest`."""
    import mfsr
    from dataclasses import replace
    v = checkpoints.load_vae(vae_file).eval()
    base = checkpoints.load_transformer(teacher_file).eval()
    embs = {e: checkpoints.load_embedding(os.path.join(emb_dir, e + ".safetensors"), checkpoints.zero_prompt(base.cfg))
            for e in ("prompt", "neg")}
    hr, lr = heldout_pairs(size, 1, 0, "realesrgan")
    z_hr, z_lr = v.encode(hr * 2 - 1), v.encode(bicubic_up(lr, hr.shape[-2:]) * 2 - 1)
    B = len(hr)
    cond = {e: checkpoints.prompt_rows(p, B)._replace(z_lr=z_lr) for e, p in embs.items()}
    c3 = cond["prompt"]
    cfg_scale, shift = sample.sampling_settings(base)["cfg"], sample.sampling_settings(base)["shift"]
    w = mfsr.eq11_w(cfg_scale)

    def teacher_at(cut):
        net = model.MMDiT(replace(base.cfg, time_cutoff=cut)).eval()
        net.load_state_dict(base.state_dict())
        return net
    ref, lines = {}, []
    head = ["# A low-passed time embedding for a 1000 t teacher", "",
            f"`python experiments/sweeps.py --cutoff-check` ({time.strftime('%Y-%m-%d')}): teacher {label or teacher_file} "
            f"(c_noise = {base.cfg.time_scale:g} t), a {size}^2 crop of each of the {B} held-out photographs "
            f"(Real-ESRGAN LR), {seeds} noises. x-hat moved: latent MSE of the cut teacher's prediction against "
            "the uncut one's, averaged over t = 0, 0.25, 0.5, 0.75, 0.95; 40-step moved: the same for its "
            f"40-step samples (CFG scale {cfg_scale:g}). At (t, s) = (0, 1), for the student made from it (at init "
            "the cut teacher with a zero s-embedder): the JVP's time term over its secant at h = 0.1 (1 when "
            "du/dt is the flow's), the time term's share of du/dt, and the MFD target's endpoint z_0 + u_tgt "
            "against the uncut teacher's 40-step sample (MSE; cosine of u_tgt - v with the correction the "
            "endpoint asks for). For scale, the 40-step samples of two noises differ by the last column.", "",
            "| cutoff (rad per unit t) | features kept | x-hat moved | 40-step moved | time term / secant "
            "| time share | target endpoint MSE | cosine | 40-step, seed to seed |", "|---|---|---|---|---|---|---|---|---|"]
    for cut in cutoffs:
        net = teacher_at(cut)
        xs, ends, stats = [], [], []
        for seed in range(seeds):
            g = torch.Generator().manual_seed(seed)
            eps = torch.randn(z_hr.shape, generator=g)
            for t0 in (0.0, 0.25, 0.5, 0.75, 0.95):
                t = torch.full((B,), t0)
                xs.append(mfsr.denoised(net)(t0 * z_hr + (1 - t0) * eps, t, c3))
            ends.append(mfsr.sample_teacher(net, cond["prompt"], cond["neg"], 40, cfg_scale, shift,
                                            torch.Generator().manual_seed(seed)))
            z0 = torch.randn(z_hr.shape, generator=torch.Generator().manual_seed(seed))  # sample_teacher's noise
            student = model.make_student(net, time_scale=net.cfg.time_scale, lora_rank=4, time_cutoff=cut).eval()
            t, s = torch.zeros(B), torch.ones(B)
            vel = mfsr.teacher_velocity("neg", z0, t, teacher=mfsr.velocity(net), cond=c3,
                                        cond_neg=cond["neg"], w=w)
            u = mfsr.average_velocity(student)
            d = mfsr.dudt_terms(u, z0, t, s, vel, cond=c3)
            _, u_tgt = mfsr.meanflow_target(u, z0, t, s, vel, cond=c3)
            stats.append((d["dudt_time"] / d["dudt_secant_time"], d["dudt_time"] / (d["dudt_time"] + d["dudt_noise"]),
                          u_tgt, vel, z0))
        if cut == 0:
            ref = {"x": xs, "end": ends}
        end_ref = ref["end"]
        x_moved = np.mean([mse(a, b).mean().item() for a, b in zip(xs, ref["x"])])
        e_moved = np.mean([mse(a, b).mean().item() for a, b in zip(ends, end_ref)])
        tgt = [(z0 + ut, (ut - vl).flatten(1), (e - z0 - vl).flatten(1)) for (_, _, ut, vl, z0), e in zip(stats, end_ref)]
        t_mse = np.mean([mse(a, b).mean().item() for (a, _, _), b in zip(tgt, end_ref)])
        cos = np.mean([torch.nn.functional.cosine_similarity(a, b).mean().item() for _, a, b in tgt])
        kept = int((torch.exp(-np.log(10000.0) * torch.arange(128) / 128) * base.cfg.time_scale <= cut).sum()) if cut else 128
        spread = mse(end_ref[0], end_ref[1]).mean().item() if seeds > 1 else float("nan")
        lines.append(f"| {cut:g}{' (none)' * (cut == 0)} | {2 * kept} / 256 | {x_moved:.2e} | {e_moved:.2e} | "
                     f"{np.mean([r for r, *_ in stats]):.2f} | {np.mean([f for _, f, *_ in stats]):.2f} | "
                     f"{t_mse:.3f} | {cos:.2f} | {spread:.3f} |")
        print(lines[-1], flush=True)
    _write_table(dest, head + lines)



# The students' latent tiles (`--tile-scan`, issue 44): each (tile, overlap) against one untiled pass
# (a 64^2 latent fits the position grid whole) on the held-out crops, 1 step as sample.py runs it:
# the distance to the untiled result (over the seed-to-seed distance), the seam measure below, the
# metrics against HR, and the network's time on a 750x500 photo's latent (3000x2000 out).

TILE_SCAN = ((32, 12), (32, 8), (32, 4), (32, 2), (32, 0), (48, 16), (48, 8))
TILE_SCAN_PHOTO = (500, 750)     # latent rows, cols of a 750x500 photo at x4 (the tiny VAE's factor 4: 3000x2000)


def overlap_middles(n, tile, overlap):
    """Latent positions along an axis of n where neighbouring tiles meet: the middle of each overlap,
    where their Gaussian weights are equal (a hard cut, overlap 0, is at the later tile's start)."""
    starts = tiling.tile_starts(n, tile, overlap)
    return sorted({(a + tile + b) // 2 for a, b in zip(starts, starts[1:])})


def seam_step(out, ref, tile, overlap, factor):
    """A seam measure: the mean step between neighbouring pixels across the latent boundaries where
    tiles meet, over the mean step across the other latent boundaries (every `factor` pixels), divided
    by the same ratio for `ref`, the untiled result. 1: no seam; a visible seam is well above.
    out, ref (B, 3, H, W); the larger of the two axes' values."""
    ratios = []
    for axis in (3, 2):
        n = out.shape[axis] // factor
        meet = overlap_middles(n, tile, overlap)
        other = [p for p in range(1, n) if p not in meet]

        def rel(y):
            d = y.diff(dim=axis).abs().mean([a for a in range(4) if a != axis])        # (H or W - 1,)
            return d[[p * factor - 1 for p in meet]].mean() / d[[p * factor - 1 for p in other]].mean()
        ratios.append((rel(out) / rel(ref)).item())
    return max(ratios)


@torch.no_grad()
def tile_scan(dest="docs/tiles.md", scan=TILE_SCAN, size=256, names=HELD_OUT, photo=TILE_SCAN_PHOTO):
    """The TILE_SCAN table for the shipped students (1 step; both settings' crops together); the
    network timed on a latent of `photo` (rows, cols)."""
    nets, v, embs = load_shipped()
    net = nets["student"]
    cond = checkpoints.prompt_rows(embs["prompt"])
    hr, lr = (torch.cat(t) for t in zip(*(heldout_pairs(size, 1, 0, s, names) for s in SETTINGS)))
    run = lambda tile, overlap, seed=0: upscale_crops(lr, net, v, cond, 1, seed=seed,  # noqa: E731
                                                      tile=tile, tile_overlap=overlap, start=0.0)   # from noise
    whole = size // v.cfg.factor
    ref, other = run(whole, 0), run(whole, 0, seed=1)
    seed_gap = (other - ref).abs().mean()
    z = torch.randn(1, net.cfg.in_channels, *photo)
    pooled, context = cond.pooled, cond.context
    out_size = f"{photo[1] * v.cfg.factor}x{photo[0] * v.cfg.factor}"
    lines = [f"# The shipped student's latent tiles (`python experiments/sweeps.py --tile-scan`, {time.strftime('%Y-%m-%d')})", "",
             f"{len(names)} held-out photographs x {len(SETTINGS)} settings, one {size}^2 crop each: 1 step from "
             f"t0 = 0 (the paper's start), as sample.py samples, against one untiled pass (a {whole}^2 latent fits the position grid). \"vs untiled\": mean "
             f"|tiled - untiled| over the seed-to-seed mean |seed 1 - seed 0| ({seed_gap:.4f}). \"seam\": "
             "sweeps.seam_step, the pixel step where tiles meet over that elsewhere, relative to untiled "
             f"(1: none). Network: TiledNet on the latent of a {out_size} output, "
             f"{torch.get_num_threads()} threads.", "",
             f"| tile | overlap | tiles at {out_size} | computed per latent pixel | network s | vs untiled | seam | PSNR | LPIPS |",
             "|---|---|---|---|---|---|---|---|---|"]
    for tile, overlap in [(whole, 0)] + list(scan):
        out = ref if tile == whole else run(tile, overlap)
        tiled = tiling.TiledNet(net, tile, overlap)
        n = len(tiled.tiles(*photo))
        t0 = time.perf_counter()
        tiled(z, torch.ones(1), pooled, context, lr=z, sigma_s=torch.zeros(1))
        secs = time.perf_counter() - t0
        cover = n * tile * tile / (photo[0] * photo[1])
        gap = (out - ref).abs().mean() / seed_gap
        seam = "-" if tile == whole else f"{seam_step(out, ref, tile, overlap, v.cfg.factor):.2f}"
        row = [tile, overlap, n, f"{cover:.2f}", f"{secs:.1f}", f"{gap:.3f}", seam,
               f"{metrics.psnr(out, hr).mean().item():.2f}", f"{metrics.lpips(out, hr).mean().item():.4f}"]
        lines.append("| " + " | ".join(map(str, row)) + " |")
        print(lines[-1], flush=True)
    _write_table(dest, lines)

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="runs/miniature", help="the miniature's working folder (python experiments/miniature.py --runs)")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every run's steps (0.01: a smoke run)")
    ap.add_argument("--workers", type=int, default=2, help="data-loading processes per run")
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--ablations", action="store_true", help="the paper's ablations (Tables 3, 4, c_noise, the "
                      "loss) from the trained teacher -> docs/ablations.md (with --scale other than 1: RUNS/ablations.md)")
    what.add_argument("--size-scan", action="store_true", help="teachers of other sizes (SIZE_SCAN), 40-step "
                      "quality -> docs/model_size.md (with --scale other than 1: RUNS/model_size.md)")
    what.add_argument("--teacher-samples", action="store_true", help="the shipped teacher's 40-step samples "
                      "against their mean -> docs/teacher_samples.md (with --scale other than 1: RUNS/teacher_samples.md)")
    what.add_argument("--length-scan", action="store_true", help="the smallest teacher at LENGTHS training steps, "
                      "40-step quality -> docs/teacher_length.md (with --scale other than 1: RUNS/teacher_length.md)")
    what.add_argument("--pairs-scan", action="store_true", help="students with other time-pair draws (PAIR_SCAN) "
                      "against the 40-step teacher -> docs/time_pairs.md (with --scale other than 1: RUNS/time_pairs.md)")
    what.add_argument("--tile-scan", action="store_true", help="the shipped student's latent tiles (TILE_SCAN) "
                      "against one untiled pass: seams, quality, time -> docs/tiles.md")
    what.add_argument("--cutoff-check", metavar="RELEASE", help="what a low-passed time embedding changes in the "
                      "1000 t teacher of RELEASE (a folder of weights, or a git revision: the miniature up to "
                      "8525646) -> docs/time_embedding.md")
    ap.add_argument("--rows", type=int, nargs="*", help="--pairs-scan: train only these rows (numbers), then stop")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (1 when runs share the cores)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.cutoff_check:
        from benches.quality import _previous_release
        rel = _previous_release(a.cutoff_check)
        cutoff_check(os.path.join(rel, "teacher.safetensors"), os.path.join(rel, "vae.safetensors"), rel,
                     label=f"of {a.cutoff_check}")
        sys.exit(0)
    if a.tile_scan:
        tile_scan()
        sys.exit(0)
    if a.pairs_scan:
        pairs_scan(a.runs, a.scale, a.workers, "docs/time_pairs.md" if a.scale == 1.0
                   else os.path.join(a.runs, "time_pairs.md"), rows=a.rows, train_only=a.rows is not None)
        sys.exit(0)
    name, fn = (("ablations", ablations) if a.ablations else ("model_size", size_scan) if a.size_scan
                else ("teacher_length", length_scan) if a.length_scan else ("teacher_samples", teacher_samples))
    fn(a.runs, a.scale, a.workers, f"docs/{name}.md" if a.scale == 1.0 else os.path.join(a.runs, name + ".md"))
    sys.exit(0)
