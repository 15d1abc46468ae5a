"""The miniature MFSR: the whole story of the paper at a size two CPU cores train in under two hours.

    pip install scikit-image                              # dev-only: photographs (and SSIM's reference)
    apt-get install $(python experiments/miniature.py --packages)     # Debian packages that ship photographs
    python experiments/miniature.py                 # data -> tiny VAE -> teacher -> CFG scan -> student (+ the
                                        # gt-target ablation) -> weights/mfsr-tiny/; resumes where it stopped
    python experiments/miniature.py --print-stages  # the same, as shell commands: `python train.py ...` per stage
    python experiments/bench.py quality             # the README tables and figure, from weights/mfsr-tiny/
    python experiments/sweeps.py --ablations        # the paper's ablations from the trained teacher -> docs/ablations.md
    python experiments/sweeps.py --size-scan        # teachers of other sizes, 40-step quality -> docs/model_size.md

The transformers' stages are train.py runs (the same code as the full-scale path), in order:
  1. vae      the tiny VAE (vae.py "tiny": x4, 16 latent channels, every convolution at latent
              resolution on 4 x 4 pixel patches), by tiny_vae.py: started as PCA of the patches, then
              trained: squared error + a tiny KL, 64^2 crops, learning rate annealed to 0 (cosine),
              EMA weights exported
  2. teacher  the LR-stream transformer (model.py "tiny") by rectified flow, 128^2 HR / 32^2 LR:
              70 % Real-ESRGAN pairs (degrade.py), 30 % clean bicubic x4 (what many users feed),
              the plain HR as target (no USM sharpening: the tables measure against the plain HR);
              caption dropout 0.2; SD3.5's sigma shift 3; 4000 pairs encoded once
              (--cache-latents); EMA weights. It predicts the clean latent as an offset from the
              LR latent (--prediction x, model.py), not SD3's velocity: at this size a velocity
              network leaves its errors in the sample as speckle (mfsr.py's convention block).
              It sees time as c_noise = t (§4.4's student convention), not SD3's 1000 t, so its
              student shares it and du/dt is the flow's (mfsr.py's time-embedding block)
  3. cfg      the teacher's CFG scale: the 40-step teacher on training crops at each of
              CFG_SCALES, the largest within CFG_TOLERANCE_DB of the best PSNR (scan_cfg)
  4. distill  the MFSR student: teacher-CFG target with the negative prompt (Eq. 11, w = scale - 1,
              the same guidance the teacher samples with), pseudo-Huber, s-embedder, c_noise = t
              as its teacher; the (t, s) pairs and the anchor share as STAGES says. Its first 200
              steps have s = t only (--warmup), where it equals its teacher. LoRA rank 64 (at width 128,
              half the rank of every layer: close to a full fine-tune, through the same code path
              as the real run), lr 1e-4, EMA 0.99
  5. distill with the ground-truth target (Table 3's first row), for the ablation in the table
  6. decoder  the VAE's decoder fine-tuned to decode noisy latents (std up to DECODER_NOISE) to the
              clean crop, encoder frozen (tune_decoder): the patch decoder turns every latent
              error into a 4 x 4 block, and the generators' samples carry such errors

Text at this size: there are no captions and no text encoders. The "prompt" is a fixed random
embedding given to every training image, the null prompt is zeros (caption dropout swaps it in),
and the negative prompt is another fixed random embedding that the teacher learns to associate
with the LR image as the target (train.py's neg_prob): in the paper the negative prompt means
"blurry, low-res, ...", and here it is taught to mean exactly that, so CFG (Eq. 11) pushes the
teacher away from the blurry answer as it does at full scale.

Data: PHOTOS (photos.csv), photographs of people, animals, buildings, text, foliage, landscapes and
objects from scikit-image and Debian packages, their licences recorded (and in the model card).
HELD_OUT photographs are never trained on: bench.py quality evaluates on them, and the README's
example image is cut from one of them (chelsea).
"""
import argparse
import csv
import glob
import json
import os
import shlex
import shutil
import sys
import time
from contextlib import contextmanager

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, ROOT)                                              # the core files at the root

import model
import metrics
import mfsr
import sample
import tiny_vae
import train
from plumbing.checkpoints import atomic_save
from plumbing import checkpoints, pairs
from plumbing import runs as run_lib

# The photographs: photos.csv beside this file, one row each: name, kind (of content), source, file,
# licence. Sources are packages an ordinary client installs:
#   pip install scikit-image
#   apt-get install opencv-doc palapeli-data lomiri-wallpapers-16.04 lomiri-wallpapers-20.04 mate-backgrounds
# "skimage" files are skimage.data names; the others are paths inside the Debian package, whose
# licence is the one its /usr/share/doc/<package>/copyright file states.
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "photos.csv"), newline="") as _f:
    PHOTOS = {r["name"]: (r["source"], r["file"], r["licence"]) for r in csv.DictReader(_f)}   # name -> (source, file, licence)
# Whole photographs never trained on: the quality table and the README's example (chelsea) use
# them; one of each kind of content.
HELD_OUT = ("chelsea", "coffee", "astronaut", "motorcycle", "copy_centre", "castle", "ladybird", "picos")
TRAIN = tuple(n for n in PHOTOS if n not in HELD_OUT)
SKIMAGE_HELD_OUT = tuple(n for n in HELD_OUT if PHOTOS[n][0] == "skimage")   # without the Debian packages
MAX_SIDE = 768                       # larger photographs are downscaled (Lanczos) to this long side
SHIP = "weights/mfsr-tiny"
TRAIN_SIZE = 128                     # HR crop side of the transformer stages (a 32^2 latent)
STUDENT_TILE_OVERLAP = 4             # the students' latent tile overlap: the smallest without a seam
                                     # (2 shows one; `sweeps.py --tile-scan`, docs/tiles.md); the teacher: DiT4SR's 3/8
STUDENT_START = 0.965                # the students' start time t0 (sample.py --start-time): the sweep of
                                     # `bench.py quality` (README), the smallest grain-free (speckle <= 1) start
CONTEXT_LEN = 4                      # tokens of the miniature's prompt embeddings
# The teacher's CFG scale (the sampler's standard v_neg + scale (v_c - v_neg)) is chosen by the
# "cfg" stage on training crops from these candidates; the student's Eq. 11 w is scale - 1.
CFG_SCALES = (1.0, 1.25, 1.5, 2.0, 3.0)
CFG_TOLERANCE_DB = 0.3               # the largest scale within this PSNR of the best one is taken

# (stage name, train.py flags); {size}, {runs}, {w} filled in by stage_flags; steps and cached pairs
# scaled by --scale (stage_argv). "vae", "cfg" and "decoder" are not train.py runs: VAE_RECIPE,
# scan_cfg, tune_decoder.
# The teacher keeps SD3.5's --time-shift 3 although a 32^2 latent (256 tokens) is SD3's unshifted
# case: shift 1 trains small sigma more and denoises better there, but its samples came out sharper
# and less faithful, 0.7-1.0 dB lower at 40 steps on the held-out set (docs/benchmarks.md).
# Teacher and students see time as §4.4's c_noise = t: a student then starts as its teacher exactly
# (u(z, t, t) = v) and its JVP's du/dt is the flow's. The former release's teacher saw SD3's 1000 t
# and its student kept it: du/dt then measured the time embedding's ripple, and the student moved
# little from the teacher's one step (docs/miniature.md).
# The student's pairs (docs/time_pairs.md, `sweeps.py --pairs-scan`): every other s != t pair jumps
# to the data (--time-pairs to-data, ratio 0.75) and a quarter of the rows regresses the one-step jump
# on the teacher's 40-step samples (--anchor 0.25). The paper's draw left the student at its
# teacher's one step; without the anchor, longer runs grew speckle beyond the teacher's own.
_PAIRS = "--cache-latents 4000 --clean-prob 0.3 --plain-gt --vae {runs}/vae/final/vae.safetensors"
STAGES = [
    ("vae", ""),
    ("teacher", "--stage teacher --preset tiny --size {size} --batch 8 --lr 5e-4 --lr-decay cosine --ema 0.999 "
                f"--steps 5000 --caption-dropout 0.2 --neg-prob 0.1 --time-shift 3 --prediction x --time-scale 1 {_PAIRS}"),
    ("cfg", ""),
    ("student", "--stage distill --preset tiny --size {size} --batch 8 --lr 1e-4 --steps 480 --warmup 200 --ema 0.99 "
                "--lora-rank 64 --target neg --cfg-w {w} --ratio 0.75 --time-pairs to-data --anchor 0.25 "
                "--loss pseudo_huber --time-scale 1 "
                f"--teacher {{runs}}/teacher/final/teacher.safetensors {_PAIRS}"),
    ("student_gt", "--stage distill --preset tiny --size {size} --batch 8 --lr 1e-4 --steps 600 --ema 0.99 "
                   "--lora-rank 64 --target gt --ratio 0.75 --time-pairs to-data --loss pseudo_huber --time-scale 1 "
                   f"--teacher {{runs}}/teacher/final/teacher.safetensors {_PAIRS}"),
    ("decoder", ""),
]
# The "vae" stage: tiny_vae.train_vae's arguments (its steps scaled by --scale).
VAE_RECIPE = dict(size=64, batch=16, lr=5e-4, ema=0.999, steps=3000)
# The "decoder" stage (tune_decoder): the patch VAE's decoder maps every latent element to a 4 x 4
# pixel block, so the generators' latent errors come out as a mosaic. It is fine-tuned to decode
# noisy latents of the training crops (noise std up to DECODER_NOISE, in model-space units) to the
# clean crop; the encoder, shift and scale stay as trained, so no latent of the earlier stages changes.
DECODER_NOISE = 0.3
DECODER_STEPS = 1000


def _skimage_image(name):
    try:
        import skimage.data
    except ImportError:
        raise SystemExit("error: the miniature's data include scikit-image's photographs: pip install scikit-image")
    a = getattr(skimage.data, name)()
    a = a[0] if isinstance(a, tuple) else a                           # stereo_motorcycle: (left, right, disp)
    a = np.stack([a] * 3, -1) if a.ndim == 2 else a[..., :3]           # gray -> RGB, drop alpha
    if a.dtype != np.uint8:                                           # e.g. float or bool images
        a = (a.astype(np.float64) / max(float(a.max()), 1e-8) * 255).round().astype(np.uint8)
    return a


def photo(name):
    """PHOTOS[name] as (H, W, 3) uint8, its long side at most MAX_SIDE."""
    source, file, _ = PHOTOS[name]
    if source == "skimage":
        a = _skimage_image(file)
    else:
        if not os.path.exists(file):
            raise SystemExit(f"error: {file} ({name}) is missing: the miniature's photographs come from "
                             f"Debian packages: apt-get install {' '.join(sorted(_packages()))}")
        with Image.open(file) as im:
            a = np.array(im.convert("RGB"))
    H, W = a.shape[:2]
    if max(H, W) > MAX_SIDE:
        k = MAX_SIDE / max(H, W)
        a = np.array(Image.fromarray(a).resize((round(W * k), round(H * k)), Image.LANCZOS))
    return a


def _packages():
    return {src for src, _, _ in PHOTOS.values() if src != "skimage"}


def prepare_data(runs):
    """runs/data/{train,heldout}/*.png and runs/emb/{null,prompt,neg}.safetensors (idempotent)."""
    for split, names in (("train", TRAIN), ("heldout", HELD_OUT)):
        os.makedirs(os.path.join(runs, "data", split), exist_ok=True)
        for name in names:
            path = os.path.join(runs, "data", split, name + ".png")
            if not os.path.exists(path):
                Image.fromarray(photo(name)).save(path + ".tmp.png")
                os.replace(path + ".tmp.png", path)
    cfg = model.CONFIGS["tiny"]
    os.makedirs(os.path.join(runs, "emb"), exist_ok=True)
    for name, seed in (("null", None), ("prompt", 1), ("neg", 2)):
        if seed is None:
            ctx, pooled = torch.zeros(CONTEXT_LEN, cfg.context_dim), torch.zeros(cfg.pooled_dim)
        else:
            g = torch.Generator().manual_seed(seed)
            ctx, pooled = torch.randn(CONTEXT_LEN, cfg.context_dim, generator=g), torch.randn(cfg.pooled_dim, generator=g)
        atomic_save({"context": ctx, "pooled": pooled}, os.path.join(runs, "emb", name + ".safetensors"),
                    {"format": "mfsr-embedding", "miniature": name})


def _final(out):
    """out/final -> the newest ckpt-* folder of a finished stage (a copy: ckpt folders rotate)."""
    last = sorted(glob.glob(os.path.join(out, "ckpt-*[0-9]")))[-1]
    if os.path.exists(os.path.join(out, "final")):
        shutil.rmtree(os.path.join(out, "final"))
    shutil.copytree(last, os.path.join(out, "final.tmp"))
    os.replace(os.path.join(out, "final.tmp"), os.path.join(out, "final"))


def run(runs, scale=1.0, only=None, workers=2):
    prepare_data(runs)
    for name, args in STAGES:
        if only and name not in only:
            continue
        out = os.path.join(runs, name)
        if os.path.exists(os.path.join(out, "final")):
            print(f"== {name}: done ({out}/final)")
            continue
        if name == "vae":
            train_vae(runs, scale)
            continue
        if name == "cfg":
            scan_cfg(runs, scale)
            continue
        if name == "decoder":
            tune_decoder(runs, scale)
            continue
        train_stage(runs, name, stage_flags(runs, args), out, scale, workers)


def stage_flags(runs, args, w=None):
    """A train.py stage of STAGES as a list of flags, {runs}, {size} and {w} filled in; w (Eq. 11's,
    the cfg stage's scale - 1) read from the cfg stage's result unless given. Split before filling in,
    so a --runs folder with spaces stays one argument."""
    if w is None and "{w}" in args:
        w = mfsr.eq11_w(chosen_cfg(runs))
    return [a.format(runs=runs, size=TRAIN_SIZE, w=w) for a in args.split()]


def stage_argv(runs, flags, out, scale=1.0, workers=2):
    """The train.py command line of a stage run into `out`: its flags with steps, warm-up and cached
    pairs scaled by `scale`, then the miniature's data, embeddings, output and logging, and --resume
    if `out` has checkpoints. train_stage runs it and --print-stages prints it: one recipe."""
    argv = list(flags)
    steps = max(2, round(int(argv[argv.index("--steps") + 1]) * scale))
    argv[argv.index("--steps") + 1] = str(steps)
    for flag, least in (("--cache-latents", 16), ("--warmup", 1)):   # a smoke run: fewer pairs, steps
        if flag in argv:
            i = argv.index(flag) + 1
            argv[i] = str(max(least, round(int(argv[i]) * scale)))
    emb = os.path.join(runs, "emb")
    argv += ["--data", os.path.join(runs, "data", "train"), "--out", out, "--workers", str(workers),
             "--save-every", str(max(1, steps // 5)), "--sample-every", str(max(1, steps // 5)),
             "--log-every", "50", "--diagnose-every", "50", "--keep", "2"]
    argv += ["--null-emb", f"{emb}/null.safetensors", "--prompt-emb", f"{emb}/prompt.safetensors",
             "--neg-emb", f"{emb}/neg.safetensors"]
    if glob.glob(os.path.join(out, "ckpt-*[0-9]")):
        argv.append("--resume")
    return argv


def train_stage(runs, name, flags, out, scale=1.0, workers=2):
    """One train.py run into `out` (stage_argv: resumed if it has checkpoints); then out/final and
    the minutes it took (summed over resumptions)."""
    argv = stage_argv(runs, flags, out, scale, workers)
    shared = os.path.join(runs, "teacher", "latents-0.safetensors")   # same pairs for every stage
    if "--cache-latents" in argv and os.path.exists(shared) and not os.path.exists(f"{out}/latents-0.safetensors"):
        os.makedirs(out, exist_ok=True)
        os.link(shared, os.path.join(out, "latents-0.safetensors"))
    print(f"== {name}: python train.py {shlex.join(argv)}", flush=True)
    with _minutes(out):
        train.main(argv)
    _final(out)
    _write_minutes(out, os.path.join(out, "final"))


# What the stages that are not train.py runs do (--print-stages says it beside their command).
OWN_STAGES = {"vae": "the tiny VAE (tiny_vae.train_vae with VAE_RECIPE)",
              "cfg": "the teacher's CFG scale (scan_cfg), whose Eq. 11 w the student's --cfg-w is",
              "decoder": "the VAE's decoder tuned on noisy latents (tune_decoder)"}


def print_stages(runs, scale=1.0, only=None, workers=2, ship=True):
    """--print-stages: the run `miniature.py --runs runs --scale scale` would make, as shell commands,
    one per stage: for a train.py stage the command line train_stage gives train.main (stage_argv),
    for the others this script limited to that stage. Pasted in order, they make the same run."""
    script = ["python", os.path.relpath(os.path.abspath(__file__)), "--runs", runs, "--scale", f"{scale:g}"]
    known = os.path.exists(os.path.join(runs, "cfg", "final", "cfg.json"))
    w = mfsr.eq11_w(chosen_cfg(runs)) if known else "<w>"
    print(f"# {shlex.join(script)}, one command per stage, to paste in order. Each run of the script\n"
          "# writes the photographs and prompt embeddings first; it trains on two threads, as train.py will with:")
    print("export OMP_NUM_THREADS=2")
    for name, args in STAGES:
        if only and name not in only:
            continue
        out = os.path.join(runs, name)
        done = " (done: the miniature skips it)" if os.path.exists(os.path.join(out, "final")) else ""
        if not args:
            print(f"# {name}{done}: {OWN_STAGES[name]}; not a train.py run: this script runs it")
            print(shlex.join(script + ["--only", name, "--no-ship"]))
            continue
        argv = stage_argv(runs, stage_flags(runs, args, w), out, scale, workers)
        notes = [f"{name}{done}"]
        if "{w}" in args and not known:
            notes.append("<w> is Eq. 11's w, the cfg stage's scale - 1: that stage prints it "
                         "(or print these commands again once it has run)")
        if "--cache-latents" in argv and name != "teacher":
            notes.append(f"the miniature links {runs}/teacher/latents-0.safetensors into {out} first: "
                         "the same pairs, not encoded again")
        print("# " + "\n#   ".join(notes))
        print(shlex.join(["python", os.path.relpath(os.path.join(ROOT, "train.py")), *argv]))
    if ship and not only:
        print("# ship: every stage done, the miniature copies the models to "
              + (SHIP + " and writes examples/" if scale == 1.0 else os.path.join(runs, "mfsr-tiny")))
        print(shlex.join(script))


@contextmanager
def _minutes(stage_dir):
    """Adds the minutes of the block to stage_dir/minutes.log, also when it is interrupted: a
    resumed stage's minutes add up over its runs."""
    t0 = time.time()
    try:
        yield
    finally:
        os.makedirs(stage_dir, exist_ok=True)
        with open(os.path.join(stage_dir, "minutes.log"), "a") as f:
            f.write(f"{(time.time() - t0) / 60:.2f}\n")


def _write_minutes(stage_dir, final):
    """final/minutes.txt: the stage's minutes over all its runs."""
    with open(os.path.join(stage_dir, "minutes.log")) as f:
        total = sum(float(line) for line in f if line.strip())
    with open(os.path.join(final, "minutes.txt"), "w") as f:
        f.write(f"{total:.1f}\n")


def train_vae(runs, scale=1.0):
    """The "vae" stage: tiny_vae.train_vae with VAE_RECIPE on the training photographs ->
    runs/vae/final/ (vae.safetensors, grid.png, steps.txt, minutes.txt). An interrupted run
    resumes from the state train_vae keeps in runs/vae/final.tmp."""
    stage = os.path.join(runs, "vae")
    out, tmp = os.path.join(stage, "final"), os.path.join(stage, "final.tmp")
    recipe = dict(VAE_RECIPE, steps=max(2, round(VAE_RECIPE["steps"] * scale)))
    print(f"== vae: tiny_vae.train_vae({recipe})", flush=True)
    with _minutes(stage):
        tiny_vae.train_vae(os.path.join(runs, "data", "train"), tmp, **recipe)
    _write_minutes(stage, tmp)
    os.replace(tmp, out)


@torch.no_grad()
def scan_cfg(runs, scale=1.0, crops=16, steps=40, seed=0):
    """The "cfg" stage: the 40-step teacher on `crops` training crops (one per photograph, Real-ESRGAN
    LR, seed fixed) at every CFG_SCALES scale; PSNR and texture (HF energy / HR) of each. The largest
    scale within CFG_TOLERANCE_DB of the best PSNR is written to runs/cfg/final/cfg.json."""
    import degrade
    t0 = time.time()
    steps = max(2, round(steps * min(1.0, scale * 10)))     # a smoke run samples with fewer steps
    v = checkpoints.load_vae(os.path.join(runs, "vae", "final", "vae.safetensors")).eval()
    net = checkpoints.load_transformer(os.path.join(runs, "teacher", "final", "teacher.safetensors")).eval()
    emb = {e: checkpoints.load_embedding(os.path.join(runs, "emb", e + ".safetensors"), checkpoints.zero_prompt(net.cfg))
           for e in ("prompt", "neg")}
    g = torch.Generator().manual_seed(seed)
    names = TRAIN[::max(1, len(TRAIN) // crops)][:crops]
    hr = torch.stack([degrade.random_crop_pair_source(torch.from_numpy(photo(n)).permute(2, 0, 1).float() / 255,
                                                      TRAIN_SIZE, g)[0] for n in names])
    _, lr, _ = degrade.degrade(hr, degrade.DegradeConfig(gt_size=TRAIN_SIZE, usm_gt=False), generator=g)
    lr_up = bicubic_up(lr, hr.shape[-2:])
    z_lr = v.encode(lr_up * 2 - 1)
    B = len(names)
    cond = {e: checkpoints.prompt_rows(p, B)._replace(z_lr=z_lr) for e, p in emb.items()}
    rows = []
    for cfg_scale in CFG_SCALES:
        z = mfsr.sample_teacher(net, cond["prompt"], cond["neg"], steps=steps, cfg=cfg_scale,
                                shift=sample.sampling_settings(net)["shift"], generator=torch.Generator().manual_seed(seed))
        out = v.decode(z).float().add(1).div(2).clamp(0, 1)
        rows.append({"cfg": cfg_scale, "PSNR": metrics.psnr(out, hr).mean().item(), "HF energy / HR": metrics.hf_ratio(out, hr).mean().item()})
        print(f"cfg {cfg_scale:g}: PSNR {rows[-1]['PSNR']:.2f} dB, HF energy / HR {rows[-1]['HF energy / HR']:.2f}", flush=True)
    best = max(r["PSNR"] for r in rows)
    chosen = max(r["cfg"] for r in rows if r["PSNR"] >= best - CFG_TOLERANCE_DB)
    out_dir = os.path.join(runs, "cfg", "final")
    os.makedirs(out_dir, exist_ok=True)
    info = {"cfg": chosen, "rows": rows, "crops": list(names), "teacher_steps": steps,
            "bicubic_PSNR": metrics.psnr(lr_up, hr).mean().item(), "minutes": (time.time() - t0) / 60}
    with open(os.path.join(out_dir, "cfg.json.tmp"), "w") as f:
        json.dump(info, f, indent=1)
    os.replace(os.path.join(out_dir, "cfg.json.tmp"), os.path.join(out_dir, "cfg.json"))
    with open(os.path.join(out_dir, "minutes.txt"), "w") as f:
        f.write(f"{info['minutes']:.1f}\n")
    print(f"== cfg: scale {chosen:g} (Eq. 11 w = {mfsr.eq11_w(chosen):g})", flush=True)


def tune_decoder(runs, scale=1.0, batch=16, size=64, lr=1e-4, ema=0.99, seed=0):
    """The "decoder" stage: the VAE's decoder trained to map z + sigma * eps (z the encoder's mean of a
    training crop, sigma ~ U(0, DECODER_NOISE) per crop, model-space units) back to the crop by
    squared error; encoder, shift and scale frozen. EMA weights -> runs/decoder/final/vae.safetensors."""
    import copy
    t0 = time.time()
    steps = max(2, round(DECODER_STEPS * scale))
    v = checkpoints.load_vae(os.path.join(runs, "vae", "final", "vae.safetensors")).eval().requires_grad_(False)
    dec = v.decoder.train().requires_grad_(True)
    avg = copy.deepcopy(dec).requires_grad_(False)
    opt = torch.optim.Adam(dec.parameters(), lr=lr)
    images = [torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1)
              for p in sorted(glob.glob(os.path.join(runs, "data", "train", "*.png")))]
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        x = torch.stack([pairs.random_crop(images[int(torch.randint(len(images), (1,), generator=g))], size, g)
                         for _ in range(batch)]) * 2 - 1                              # (B, 3, size, size)
        with torch.no_grad():
            z = v.encode(x)                                                           # model space, mean
            sigma = torch.rand(batch, 1, 1, 1, generator=g) * DECODER_NOISE
            z = z + sigma * torch.randn(z.shape, generator=g)
        loss = (v.decode(z, clamp=False).float() - x).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for a, p in zip(avg.parameters(), dec.parameters()):
                a.lerp_(p, 1 - ema)
        if step % 200 == 0 or step == steps - 1:
            print(f"decoder step {step + 1}/{steps}: loss {loss.item():.4f}", flush=True)
    v.decoder = avg.eval()
    out_dir = os.path.join(runs, "decoder", "final")
    os.makedirs(out_dir, exist_ok=True)
    checkpoints.save_vae(v, os.path.join(out_dir, "vae.safetensors"))
    with open(os.path.join(out_dir, "minutes.txt"), "w") as f:
        f.write(f"{(time.time() - t0) / 60:.1f}\n")
    with open(os.path.join(out_dir, "steps.txt"), "w") as f:
        f.write(f"{steps}\n")


def chosen_cfg(runs):
    """The CFG scale the cfg stage chose (the teacher's standard scale)."""
    with open(os.path.join(runs, "cfg", "final", "cfg.json")) as f:
        return json.load(f)["cfg"]


def ship(runs, dest=SHIP):
    """The trained models, stored in fp16 (loaders cast back to fp32), and the embeddings."""
    os.makedirs(dest, exist_ok=True)
    v = checkpoints.load_vae(os.path.join(runs, "decoder", "final", "vae.safetensors"))   # the tuned decoder
    tile = TRAIN_SIZE // v.cfg.factor    # sample.py's defaults: tiles of the training size, our w
    for name, file in (("student", "student"), ("student_gt", "student"), ("teacher", "teacher")):
        net = checkpoints.load_transformer(os.path.join(runs, name, "final", file + ".safetensors"))
        overlap = STUDENT_TILE_OVERLAP if name != "teacher" else run_lib.sample_overlap(tile, net.cfg.patch)
        net.sampling = {"tile": tile, "tile_overlap": overlap,
                        **({"cfg": chosen_cfg(runs), "shift": sample.sampling_settings(net)["shift"]}
                           if name == "teacher" else {"start": STUDENT_START})}
        checkpoints.save_transformer(net.half(), os.path.join(dest, name + ".safetensors"))
    checkpoints.save_vae(v.half(), os.path.join(dest, "vae.safetensors"))
    for e in ("null", "prompt", "neg"):
        shutil.copy(os.path.join(runs, "emb", e + ".safetensors"), os.path.join(dest, e + ".safetensors"))
    minutes, steps = {}, {}
    for name, _ in STAGES:
        p = os.path.join(runs, name, "final", "minutes.txt")
        minutes[name] = float(open(p).read()) if os.path.exists(p) else None
        p = os.path.join(runs, name, "final", "trainable.safetensors")
        if os.path.exists(p):                                # the cfg stage trains nothing
            with safe_open(p, "pt") as f:
                steps[name] = int(f.metadata()["step"])      # what ran (--scale changes it)
        elif os.path.exists(os.path.join(runs, name, "final", "steps.txt")):   # the vae and decoder stages
            steps[name] = int(open(os.path.join(runs, name, "final", "steps.txt")).read())
    with open(os.path.join(runs, "cfg", "final", "cfg.json")) as f:
        scan = json.load(f)
    w = mfsr.eq11_w(scan["cfg"])
    info = {"stages": {n: a.format(runs=runs, size=TRAIN_SIZE, w=w) for n, a in STAGES}, "vae_recipe": VAE_RECIPE,
            "steps": steps, "minutes": minutes, "cfg_scale": scan["cfg"], "eq11_w": w, "cfg_scan": scan,
            "train_images": list(TRAIN), "held_out_images": list(HELD_OUT), "torch": torch.__version__}
    with open(os.path.join(dest, "training.json"), "w") as f:
        json.dump(info, f, indent=1)
    write_card(dest, info)
    size = sum(os.path.getsize(p) for p in glob.glob(os.path.join(dest, "*")))
    print(f"shipped to {dest}: {size / 2 ** 20:.1f} MB")


def write_card(dest, info):
    """weights/mfsr-tiny/MODEL_CARD.md: what the files are, how they were made."""
    nets = {n: checkpoints.load_transformer(os.path.join(dest, n + ".safetensors")) for n in ("student", "teacher")}
    v = checkpoints.load_vae(os.path.join(dest, "vae.safetensors"))
    count = lambda m: f"{sum(p.numel() for p in m.parameters()):,}"                         # noqa: E731
    pred = ("predicts the clean latent as an offset from the LR latent (prediction x; the student's MFD loss "
            "is measured in x)" if nets["teacher"].cfg.prediction == "x" else "predicts SD3's velocity (prediction v)")
    lines = ["# mfsr-tiny: the miniature MFSR (made by `python experiments/miniature.py`)", "",
             "| file | what |", "|---|---|",
             f"| student.safetensors | the MFSR student (teacher-CFG target, Eq. 11), LoRA merged, "
             f"{count(nets['student'])} parameters, fp16 |",
             "| student_gt.safetensors | the same distilled with the `gt` target (the ablation) |",
             f"| teacher.safetensors | the LR-stream teacher, {count(nets['teacher'])} parameters, fp16 |",
             f"| vae.safetensors | the tiny VAE (x4 on 4 x 4 pixel patches, 16 latent channels, a "
             f"PCA-started linear code beside the convolutions; its decoder then tuned on noisy latents, "
             f"the decoder stage), {count(v)} parameters, shift {v.cfg.shift:.4f}, scale {v.cfg.scale:.4f}, fp16 |",
             "| prompt / null / neg .safetensors | the fixed prompt embedding (every training image), the "
             "null (zeros, caption dropout) and the negative prompt (taught to mean the LR image) |",
             "| training.json | the train.py arguments of every stage, their minutes, the data |", "",
             f"Transformer config: `{nets['student'].cfg}`; the network {pred}.", "",
             f"Data: {len(PHOTOS)} photographs from scikit-image and Debian packages "
             f"({', '.join(sorted(_packages()))}), long side at most {MAX_SIDE} px; {len(TRAIN)} for "
             f"training, {len(HELD_OUT)} whole photographs held out for evaluation and the example image "
             f"({', '.join(HELD_OUT)}). Training pairs: 128^2 HR crops, 70 % Real-ESRGAN degradation, "
             "30 % clean bicubic x4.", "",
             "| photograph | package | file | licence |", "|---|---|---|---|",
             *[f"| {n}{' (held out)' * (n in HELD_OUT)} | {src if src != 'skimage' else 'scikit-image'} | "
               f"`{os.path.basename(file) if src != 'skimage' else 'skimage.data.' + file}` | {lic} |"
               for n, (src, file, lic) in PHOTOS.items()], "",
             "Training steps: " + ", ".join(f"{k} {n}" for k, n in info["steps"].items())
             + "; every stage's train.py arguments (before --scale) are in training.json.", "",
             "Training on 2 CPU cores (minutes): " + ", ".join(
                 f"{k} {m:.0f}" if m is not None else f"{k} ?" for k, m in info["minutes"].items()) + ".", "",
             f"Sampling defaults recorded in the files (sample.py uses them): latent tiles of the training "
             f"size, the students' {nets['student'].sampling} (overlap: the smallest without a seam, docs/tiles.md; "
             f"start: the start time t0 of sample.py --start-time, README), "
             f"the teacher's overlap {nets['teacher'].sampling['tile_overlap']} (DiT4SR's 3/8), its sigma shift "
             f"{sample.sampling_settings(nets['teacher'])['shift']:g} (its training's) and CFG scale {info['cfg_scale']:g} "
             f"(v_neg + scale (v_c - v_neg)), chosen by the cfg stage (40-step teacher PSNR on training "
             f"crops: " + ", ".join(f"{r['cfg']:g}: {r['PSNR']:.2f} dB" for r in info["cfg_scan"]["rows"])
             + f"); the student distils Eq. 11 with w = scale - 1 = {info['eq11_w']:g} and sees time as "
             f"c_noise = {'' if nets['student'].cfg.time_scale == 1 else format(nets['student'].cfg.time_scale, 'g') + ' '}t.", "",
             "Metrics: metrics.md and figure.png, written by `python experiments/bench.py quality` (the "
             "repository's README shows the same table). The previous release (velocity prediction) is the "
             "git tag miniature-v1."]
    with open(os.path.join(dest, "MODEL_CARD.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def make_example(dest="examples", name="chelsea", top=24, left=136, size=256, seed=0):
    """examples/{name}_hr.png (a size^2 crop of a held-out photograph) and {name}_lr.png, its
    Real-ESRGAN degradation (x4, fixed seed): the README's main command upscales the LR one."""
    import degrade
    img = torch.from_numpy(photo(name)).permute(2, 0, 1).float() / 255
    hr = img[None, :, top:top + size, left:left + size]
    _, lr, _ = degrade.degrade(hr, degrade.DegradeConfig(gt_size=size, usm_gt=False),
                               generator=torch.Generator().manual_seed(seed))
    os.makedirs(dest, exist_ok=True)
    for tag, x in (("hr", hr), ("lr", lr)):
        path = os.path.join(dest, f"{name}_{tag}.png")
        Image.fromarray((x[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(path + ".tmp.png")
        os.replace(path + ".tmp.png", path)


# --------------------------------------------------------------------------------------------
# Evaluation (python experiments/bench.py quality): the held-out pairs, the table (its metrics: metrics.py)


def bicubic_up(lr, hw):
    """The bicubic baseline: lr (B, 3, h, w) in [0, 1] resized to hw, clamped to [0, 1]."""
    return torch.nn.functional.interpolate(lr, size=hw, mode="bicubic", align_corners=False).clamp(0, 1)


SETTINGS = {"realesrgan": "Real-ESRGAN degradation x4", "bicubic": "clean bicubic x4"}


def heldout_pairs(size=256, per_image=1, seed=0, setting="realesrgan", names=HELD_OUT):
    """(hr, lr): `per_image` random size^2 crops of every held-out photograph in `names` and their
    LR at 1/4: the Real-ESRGAN degradation (fixed seed) or the clean bicubic downscale. The crops
    are the same in both settings. HR is the plain crop (the LR is made from it)."""
    import degrade
    if setting not in SETTINGS:
        raise ValueError(f"setting {setting!r}: choose from {', '.join(SETTINGS)}")
    g = torch.Generator().manual_seed(seed)
    crops = []
    for name in names:
        img = torch.from_numpy(photo(name)).permute(2, 0, 1).float() / 255
        for _ in range(per_image):
            crops.append(degrade.random_crop_pair_source(img, size, g)[0])
    hr = torch.stack(crops)
    if setting == "bicubic":
        return hr, degrade.bicubic_down(hr)
    _, lr, _ = degrade.degrade(hr, degrade.DegradeConfig(gt_size=size, usm_gt=False), generator=g)
    return hr, lr


def load_shipped(dest=SHIP):
    """{name: net}, vae, {null, prompt, neg: a Cond without z_lr} of a shipped miniature; the nets
    with the fast paths sample.py runs (fastjvp.accelerate: the same numbers, its speed)."""
    import fastjvp
    nets = {n: fastjvp.accelerate(checkpoints.load_transformer(os.path.join(dest, n + ".safetensors")).eval())
            for n in ("teacher", "student", "student_gt")}
    v = checkpoints.load_vae(os.path.join(dest, "vae.safetensors")).eval()
    embs = {e: checkpoints.load_embedding(os.path.join(dest, e + ".safetensors"),
                                          checkpoints.zero_prompt(nets["student"].cfg)) for e in ("null", "prompt", "neg")}
    return nets, v, embs


def upscale_crops(lr, net, vae, cond, steps=1, **kw):
    """sample.upscale on each LR crop in turn, as sample.py runs an image: the checkpoint's sampling
    settings unless kw sets them, the VAE untiled (the crops are small). Concatenated along the batch."""
    kw = {**sample.sampling_settings(net), "vae_tile": 0, **kw}
    return torch.cat([sample.upscale(lr[i:i + 1], net, vae, cond, steps, **kw) for i in range(len(lr))])


@torch.no_grad()
def evaluate(dest=SHIP, size=256, per_image=1, teacher_steps=40, seed=0, setting="realesrgan", names=HELD_OUT,
             figure_crops=2, previous=None):
    """Rows of the README table for one setting, and the figure's rows (the first `figure_crops`
    crops). Every model runs through sample.upscale as sample.py runs it: latent tiles of the
    training size, AdaIN colour fix, the teacher at the CFG scale its file records. previous: the
    folder of an earlier release, whose teacher and student get rows of their own (with its VAE)."""
    models = {"": load_shipped(dest)}
    if previous:
        models["previous release: "] = load_shipped(previous)
    nets, v, _ = models[""]
    hr, lr = heldout_pairs(size, per_image, seed, setting, names)
    lr_up = bicubic_up(lr, hr.shape[-2:])
    cfg_scale = sample.sampling_settings(nets["teacher"])["cfg"]

    def run(net, steps, teacher=False, release="", grid="shifted", **kw):
        _, vae, embs = models[release]
        cond = {e: checkpoints.prompt_rows(p) for e, p in embs.items()}
        return upscale_crops(lr, net, vae, cond["prompt"], steps, teacher=teacher, cond_neg=cond["neg"], seed=seed,
                             grid=grid, **kw)

    through_vae = lambda x: v.decode(v.encode(x * 2 - 1)).float().add(1).div(2).clamp(0, 1)  # noqa: E731
    methods = {"bicubic": lambda: lr_up,
               "VAE(bicubic) (the latent path's cost)": lambda: through_vae(lr_up),
               "VAE(HR) (upper bound)": lambda: through_vae(hr)}
    for k in sorted({1, 4, teacher_steps}):
        methods[teacher_name(k, cfg_scale)] = lambda k=k: run(nets["teacher"], k, teacher=True)
    for k in (2, 4):        # the teacher's Euler on the student's grid (Alg. 2): what distillation must beat
        methods[teacher_name(k, cfg_scale) + ", uniform grid"] = \
            lambda k=k: run(nets["teacher"], k, teacher=True, grid="uniform")
    for k in (1, 2, 4):     # from the start the student's file records (sample.py's default)
        methods[f"student {k} step{'s' * (k > 1)}"] = lambda k=k: run(nets["student"], k)
    for k in (1, 2):        # from pure noise, the paper's Alg. 2
        methods[f"student {k} step{'s' * (k > 1)}, from noise (t0 = 0)"] = lambda k=k: run(nets["student"], k, start=0.0)
    for k in (1, 2):
        methods[f"student, gt target, {k} step{'s' * (k > 1)}"] = lambda k=k: run(nets["student_gt"], k)
    if previous:
        old_nets = models["previous release: "][0]
        old_cfg = sample.sampling_settings(old_nets["teacher"])["cfg"]
        for k in (1, teacher_steps):
            methods["previous release: " + teacher_name(k, old_cfg)] = \
                lambda k=k: run(old_nets["teacher"], k, True, "previous release: ")
        for k in (1, 2):
            methods[f"previous release: student {k} step{'s' * (k > 1)}"] = \
                lambda k=k: run(old_nets["student"], k, False, "previous release: ")
    B = hr.shape[0]
    outs, secs = {}, {}
    for name, fn in methods.items():
        t0 = time.perf_counter()
        outs[name] = fn()
        secs[name] = (time.perf_counter() - t0) / B
    ref = outs[teacher_name(teacher_steps, cfg_scale)]
    rows = [{"method": n, **metrics.table_row(o, hr),
             f"PSNR vs teacher {teacher_steps}": metrics.psnr(o, ref).mean().item() if o is not ref else float("inf"),
             "s / image": secs[n]}
            for n, o in outs.items()]
    k = min(figure_crops, B)
    figure = [torch.nn.functional.interpolate(lr[:k], size=hr.shape[-2:], mode="nearest"), lr_up[:k],
              outs[teacher_name(1, cfg_scale)][:k], ref[:k], outs["student 1 step"][:k],
              outs["student 2 steps"][:k], hr[:k]]
    return rows, figure


def teacher_name(steps, cfg_scale):
    return f"teacher {steps} step{'s' * (steps > 1)}, CFG scale {cfg_scale:g}"


def save_figure(figures, path):
    """One row per crop, the settings one after the other: LR | bicubic | teacher 1 | teacher 40 |
    student 1 | student 2 | HR; written atomically."""
    rows = [torch.cat([c[i].clamp(0, 1) for c in cols], 2) for cols in figures for i in range(len(cols[0]))]
    grid = torch.cat(rows, 1)
    tmp = path + ".tmp.png"
    Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(tmp)
    os.replace(tmp, path)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="runs/miniature", help="working folder (data, checkpoints)")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every stage's steps (0.01: a smoke run)")
    ap.add_argument("--only", nargs="*", choices=[n for n, _ in STAGES], help="run only these stages")
    ap.add_argument("--workers", type=int, default=2, help="data-loading processes per stage")
    ap.add_argument("--no-ship", action="store_true", help="do not copy the result to " + SHIP
                    + " (with --scale other than 1: to RUNS/mfsr-tiny)")
    ap.add_argument("--packages", action="store_true",
                    help="print the Debian packages the photographs come from (for apt-get install) and exit")
    ap.add_argument("--print-stages", action="store_true",
                    help="print the shell commands of this run, one per stage (`python train.py ...` for the "
                         "transformers' stages), and exit: pasted in order they make the same run")
    a = ap.parse_args()
    if a.packages:
        print(" ".join(sorted(_packages())))
        sys.exit(0)
    if a.print_stages:
        print_stages(a.runs, a.scale, a.only, a.workers, not a.no_ship)
        sys.exit(0)
    torch.set_num_threads(2)
    run(a.runs, a.scale, a.only, a.workers)
    if not a.no_ship:   # a scaled (smoke) run never replaces the shipped model or the example
        ship(a.runs, SHIP if a.scale == 1.0 else os.path.join(a.runs, "mfsr-tiny"))
        if a.scale == 1.0:
            make_example()
    sys.exit(0)
