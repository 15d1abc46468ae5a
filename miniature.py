"""The miniature MFSR: the whole story of the paper at a size two CPU cores train in about an hour.

    pip install scikit-image            # dev-only: its public-domain photographs are the data
    python miniature.py                 # data -> tiny VAE -> teacher -> student (+ the gt-target
                                        # ablation) -> weights/mfsr-tiny/; resumes where it stopped
    python bench.py quality             # the README table and figure, from weights/mfsr-tiny/

Every stage is a train.py run (the same code as the full-scale path), in order:
  1. vae      the tiny VAE (vae.py "tiny": x4, 16 latent channels, every convolution at latent
              resolution on 4 x 4 pixel patches), started by train.py as PCA of the patches, then
              trained: squared error + a tiny KL, 64^2 crops, learning rate annealed to 0 (cosine),
              EMA weights exported
  2. teacher  the LR-stream transformer (model.py "tiny") by rectified flow on Real-ESRGAN pairs
              (degrade.py), 128^2 HR / 32^2 LR, caption dropout 0.2; 1200 pairs encoded once
              (--cache-latents: the degradation and the VAE run once per pair, not every step)
  3. distill  the MFSR student: teacher-CFG target with the negative prompt (Eq. 11, w = CFG_W),
              ratio 0.5, pseudo-Huber, s-embedder, c_noise(t) = t, LoRA rank 64 (at width 128 that
              is half the rank of every layer: close to a full fine-tune, through the same code
              path as the real run), lr 1e-4 and an EMA of 0.99 (without it the student's quality
              swung by up to 5 dB between checkpoints 200 steps apart)
  4. distill with the ground-truth target (Table 3's first row), for the ablation in the table

Text at this size: there are no captions and no text encoders. The "prompt" is a fixed random
embedding given to every training image, the null prompt is zeros (caption dropout swaps it in),
and the negative prompt is another fixed random embedding that the teacher learns to associate
with the LR image as the target (train.py --neg-prob): in the paper the negative prompt means
"blurry, low-res, ...", and here it is taught to mean exactly that, so CFG (Eq. 11) pushes the
teacher away from the blurry answer as it does at full scale.

Data: scikit-image's bundled photographs (public domain / CC0, see DATA below). Training uses
TRAIN; HELD_OUT images (a cat and a cup of coffee) are never trained on: bench.py quality
evaluates on them and the example image is cut from one of them.
"""
import argparse
import glob
import json
import os
import shutil
import sys
import time

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open

import model
import train
import vae as vae_lib
from checkpoint import atomic_save

# scikit-image's data names and their licences, as its docstrings state them
TRAIN = {"astronaut": "public domain (NASA)", "hubble_deep_field": "public domain (NASA)",
         "rocket": "public domain (SpaceX)", "retina": "CC0", "immunohistochemistry": "no known restrictions",
         "camera": "CC0 (Lav Varshney)", "coins": "no known restrictions", "brick": "CC0 (CC0Textures)",
         "grass": "CC0", "gravel": "CC0 (CC0Textures)", "clock": "public domain (Stefan van der Walt)",
         "cell": "CC0"}
HELD_OUT = {"chelsea": "CC0 (Stefan van der Walt)", "coffee": "CC0 (Rachel Michetti)"}
SHIP = "weights/mfsr-tiny"
TRAIN_SIZE = 128                     # HR crop side of the transformer stages (a 32^2 latent)
CONTEXT_LEN = 4                      # tokens of the miniature's prompt embeddings
# w of Eq. 11, for the student's target and the teacher's CFG sampling. Chosen on training crops
# (one 128^2 crop per training image), 40-step teacher PSNR for w = 1 / 1.25 / 1.5 / 2: 20.1 / 19.2 /
# 18.0 / 15.5 dB; 1.25 is the largest w within 1 dB of unguided sampling. w = 3, tried first, made the
# 40-step teacher diverge (held-out PSNR 9 dB, 6.5x the HR's high-frequency energy): this teacher
# has far less to give CFG than DiT4SR (w = 8).
# (Scanned with the teacher of the earlier VAE recipe; not rescanned since the VAE was retrained.)
CFG_W = 1.25

# (stage name, train.py arguments); {size}, {runs} filled in by run(); steps and cached pairs scaled by --scale
STAGES = [
    ("vae", "--stage vae --preset tiny --size 64 --batch 16 --lr 5e-4 --lr-decay cosine --ema 0.999 --steps 3000"),
    ("teacher", "--stage teacher --preset tiny --size {size} --batch 8 --lr 5e-4 --steps 4000 --cache-latents 1200 "
                "--vae {runs}/vae/final/vae.safetensors --caption-dropout 0.2 --neg-prob 0.1"),
    ("student", "--stage distill --preset tiny --size {size} --batch 8 --lr 1e-4 --steps 400 --ema 0.99 --lora-rank 64 --cache-latents 1200 "
                f"--target neg --cfg-w {CFG_W} --ratio 0.5 --loss pseudo_huber "
                "--vae {runs}/vae/final/vae.safetensors --teacher {runs}/teacher/final/teacher.safetensors"),
    ("student_gt", "--stage distill --preset tiny --size {size} --batch 8 --lr 1e-4 --steps 400 --ema 0.99 --lora-rank 64 --cache-latents 1200 "
                   "--target gt --ratio 0.5 --loss pseudo_huber "
                   "--vae {runs}/vae/final/vae.safetensors --teacher {runs}/teacher/final/teacher.safetensors"),
]


def _skimage_image(name):
    try:
        import skimage.data
    except ImportError:
        raise SystemExit("error: the miniature's data are scikit-image's photographs: pip install scikit-image")
    a = getattr(skimage.data, name)()
    a = np.stack([a] * 3, -1) if a.ndim == 2 else a[..., :3]           # gray -> RGB, drop alpha
    if a.dtype != np.uint8:                                           # e.g. float or bool images
        a = (a.astype(np.float64) / max(float(a.max()), 1e-8) * 255).round().astype(np.uint8)
    return a


def prepare_data(runs):
    """runs/data/{train,heldout}/*.png and runs/emb/{null,prompt,neg}.safetensors (idempotent)."""
    for split, names in (("train", TRAIN), ("heldout", HELD_OUT)):
        os.makedirs(os.path.join(runs, "data", split), exist_ok=True)
        for name in names:
            path = os.path.join(runs, "data", split, name + ".png")
            if not os.path.exists(path):
                Image.fromarray(_skimage_image(name)).save(path + ".tmp.png")
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
    emb = os.path.join(runs, "emb")
    for name, args in STAGES:
        if only and name not in only:
            continue
        out = os.path.join(runs, name)
        if os.path.exists(os.path.join(out, "final")):
            print(f"== {name}: done ({out}/final)")
            continue
        argv = args.format(runs=runs, size=TRAIN_SIZE).split()
        steps = max(2, round(int(argv[argv.index("--steps") + 1]) * scale))
        argv[argv.index("--steps") + 1] = str(steps)
        if "--cache-latents" in argv:   # a smoke run need not encode the full set of pairs
            i = argv.index("--cache-latents") + 1
            argv[i] = str(max(16, round(int(argv[i]) * scale)))
        argv += ["--data", os.path.join(runs, "data", "train"), "--out", out, "--workers", str(workers),
                 "--save-every", str(max(1, steps // 5)), "--sample-every", str(max(1, steps // 5)),
                 "--log-every", "50", "--keep", "2"]
        if not name.startswith("vae"):
            argv += ["--null-emb", f"{emb}/null.safetensors", "--prompt-emb", f"{emb}/prompt.safetensors",
                     "--neg-emb", f"{emb}/neg.safetensors"]
        if glob.glob(os.path.join(out, "ckpt-*[0-9]")):
            argv.append("--resume")
        shared = os.path.join(runs, "teacher", "latents-0.safetensors")   # same pairs for every stage
        if "--cache-latents" in argv and os.path.exists(shared) and not os.path.exists(f"{out}/latents-0.safetensors"):
            os.makedirs(out, exist_ok=True)
            os.link(shared, os.path.join(out, "latents-0.safetensors"))
        print(f"== {name}: python train.py {' '.join(argv)}", flush=True)
        t0 = time.time()
        try:
            train.main(argv)
        finally:   # an interrupted stage resumes: its minutes add up over the runs
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, "minutes.log"), "a") as f:
                f.write(f"{(time.time() - t0) / 60:.2f}\n")
        _final(out)
        with open(os.path.join(out, "minutes.log")) as f:
            total = sum(float(line) for line in f if line.strip())
        with open(os.path.join(out, "final", "minutes.txt"), "w") as f:
            f.write(f"{total:.1f}\n")


def ship(runs, dest=SHIP):
    """The trained models, stored in fp16 (loaders cast back to fp32), and the embeddings."""
    os.makedirs(dest, exist_ok=True)
    v = vae_lib.load_vae(os.path.join(runs, "vae", "final", "vae.safetensors"))
    tile = TRAIN_SIZE // v.cfg.factor    # sample.py's defaults: tiles of the training size, our w
    for name, file in (("student", "student"), ("student_gt", "student"), ("teacher", "teacher")):
        net = model.load_transformer(os.path.join(runs, name, "final", file + ".safetensors"))
        net.sampling = {"tile": tile, "tile_overlap": train.sample_overlap(tile, net.cfg.patch),
                        **({"cfg": CFG_W} if name == "teacher" else {})}
        model.save_transformer(net.half(), os.path.join(dest, name + ".safetensors"))
    vae_lib.save_vae(v.half(), os.path.join(dest, "vae.safetensors"))
    for e in ("null", "prompt", "neg"):
        shutil.copy(os.path.join(runs, "emb", e + ".safetensors"), os.path.join(dest, e + ".safetensors"))
    minutes, steps = {}, {}
    for name, _ in STAGES:
        p = os.path.join(runs, name, "final", "minutes.txt")
        minutes[name] = float(open(p).read()) if os.path.exists(p) else None
        with safe_open(os.path.join(runs, name, "final", "trainable.safetensors"), "pt") as f:
            steps[name] = int(f.metadata()["step"])          # what ran (--scale changes it)
    info = {"stages": {n: a.format(runs=runs, size=TRAIN_SIZE) for n, a in STAGES}, "steps": steps,
            "minutes": minutes, "cfg_w": CFG_W,
            "train_images": TRAIN, "held_out_images": HELD_OUT, "torch": torch.__version__}
    with open(os.path.join(dest, "training.json"), "w") as f:
        json.dump(info, f, indent=1)
    write_card(dest, info)
    size = sum(os.path.getsize(p) for p in glob.glob(os.path.join(dest, "*")))
    print(f"shipped to {dest}: {size / 2 ** 20:.1f} MB")


def write_card(dest, info):
    """weights/mfsr-tiny/MODEL_CARD.md: what the files are, how they were made."""
    nets = {n: model.load_transformer(os.path.join(dest, n + ".safetensors")) for n in ("student", "teacher")}
    v = vae_lib.load_vae(os.path.join(dest, "vae.safetensors"))
    count = lambda m: f"{sum(p.numel() for p in m.parameters()):,}"                         # noqa: E731
    lines = ["# mfsr-tiny: the miniature MFSR (made by `python miniature.py`)", "",
             "| file | what |", "|---|---|",
             f"| student.safetensors | the MFSR student (teacher-CFG target, Eq. 11), LoRA merged, "
             f"{count(nets['student'])} parameters, fp16 |",
             "| student_gt.safetensors | the same distilled with the `gt` target (the ablation) |",
             f"| teacher.safetensors | the LR-stream teacher, {count(nets['teacher'])} parameters, fp16 |",
             f"| vae.safetensors | the tiny VAE (x4 on 4 x 4 pixel patches, 16 latent channels, a "
             f"PCA-started linear code beside the convolutions), {count(v)} parameters, "
             f"shift {v.cfg.shift:.4f}, scale {v.cfg.scale:.4f}, fp16 |",
             "| prompt / null / neg .safetensors | the fixed prompt embedding (every training image), the "
             "null (zeros, caption dropout) and the negative prompt (taught to mean the LR image) |",
             "| training.json | the train.py arguments of every stage, their minutes, the data |", "",
             f"Transformer config: `{nets['student'].cfg}`", "",
             "Data: scikit-image's photographs, training: " + ", ".join(f"{k} ({v})" for k, v in TRAIN.items())
             + "; held out (evaluation and the example image): "
             + ", ".join(f"{k} ({v})" for k, v in HELD_OUT.items()) + ".", "",
             "Training steps: " + ", ".join(f"{k} {n}" for k, n in info["steps"].items())
             + "; every stage's train.py arguments (before --scale) are in training.json.", "",
             "Training on 2 CPU cores (minutes): " + ", ".join(
                 f"{k} {m:.0f}" if m is not None else f"{k} ?" for k, m in info["minutes"].items()) + ".", "",
             f"Sampling defaults recorded in the files (sample.py uses them): latent tiles of the training "
             f"size, {nets['student'].sampling}; the teacher's CFG w = {info['cfg_w']:g}.", "",
             "Metrics: metrics.md and figure.png, written by `python bench.py quality` (the repository's "
             "README shows the same table)."]
    with open(os.path.join(dest, "MODEL_CARD.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def make_example(dest="examples", name="chelsea", top=24, left=136, size=256, seed=0):
    """examples/{name}_hr.png (a size^2 crop of a held-out photograph) and {name}_lr.png, its
    Real-ESRGAN degradation (x4, fixed seed): the README's main command upscales the LR one."""
    import degrade
    img = torch.from_numpy(_skimage_image(name)).permute(2, 0, 1).float() / 255
    hr = img[None, :, top:top + size, left:left + size]
    _, lr, _ = degrade.degrade(hr, degrade.DegradeConfig(gt_size=size, usm_gt=False),
                               generator=torch.Generator().manual_seed(seed))
    os.makedirs(dest, exist_ok=True)
    for tag, x in (("hr", hr), ("lr", lr)):
        path = os.path.join(dest, f"{name}_{tag}.png")
        Image.fromarray((x[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(path + ".tmp.png")
        os.replace(path + ".tmp.png", path)


# --------------------------------------------------------------------------------------------
# Evaluation (python bench.py quality): our own metrics, the held-out pairs, the table


def psnr(x, y):
    """Per image PSNR in dB of images in [0, 1], (B, 3, H, W) -> (B,)."""
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1 / mse.clamp_min(1e-12))


def _gauss_window(size, sigma):
    a = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    w = torch.exp(-a ** 2 / (2 * sigma ** 2))
    return w / w.sum()


def ssim(x, y, size=11, sigma=1.5):
    """Per image SSIM (Wang et al. 2004) of images in [0, 1], (B, C, H, W) -> (B,): Gaussian window,
    K1 = 0.01, K2 = 0.03, population (co)variances, averaged over the channels and the positions
    whose window lies inside the image."""
    x, y = x.double(), y.double()
    C = x.shape[1]
    w = _gauss_window(size, sigma)
    k = (w[:, None] * w[None, :]).expand(C, 1, size, size)
    f = lambda a: torch.nn.functional.conv2d(a, k, groups=C)             # noqa: E731  valid windows
    mx, my = f(x), f(y)
    vx, vy, cxy = f(x * x) - mx ** 2, f(y * y) - my ** 2, f(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


def hf_ratio(x, hr, cutoff=0.25):
    """Texture: spectral energy above `cutoff` cycles/pixel (half Nyquist) of x over HR's, per image
    on the luma; 1.0 = as much fine detail as the truth, < 1 smoother, > 1 noisier or sharper."""
    def energy(a):
        g = (0.299 * a[:, 0] + 0.587 * a[:, 1] + 0.114 * a[:, 2]).double()
        P = torch.fft.fft2(g - g.mean((-2, -1), keepdim=True)).abs() ** 2
        fy, fx = torch.fft.fftfreq(g.shape[-2]), torch.fft.fftfreq(g.shape[-1])
        return (P * ((fy[:, None] ** 2 + fx[None, :] ** 2).sqrt() > cutoff)).sum((-2, -1))
    return energy(x) / energy(hr)


def heldout_pairs(size=256, per_image=3, seed=0):
    """(hr, lr): `per_image` random size^2 crops of every HELD_OUT photograph and their Real-ESRGAN
    degradation (x4), all from one fixed seed. HR is the plain crop (the LR is made from it)."""
    import degrade
    g = torch.Generator().manual_seed(seed)
    crops = []
    for name in HELD_OUT:
        img = torch.from_numpy(_skimage_image(name)).permute(2, 0, 1).float() / 255
        for _ in range(per_image):
            crops.append(degrade.random_crop_pair_source(img, size, g)[0])
    hr = torch.stack(crops)
    _, lr, _ = degrade.degrade(hr, degrade.DegradeConfig(gt_size=size, usm_gt=False), generator=g)
    return hr, lr


def load_shipped(dest=SHIP):
    """{name: net}, vae, {null, prompt, neg: (context, pooled)} of a shipped miniature."""
    nets = {n: model.load_transformer(os.path.join(dest, n + ".safetensors")).eval()
            for n in ("teacher", "student", "student_gt")}
    v = vae_lib.load_vae(os.path.join(dest, "vae.safetensors")).eval()
    embs = {e: train.load_embedding(os.path.join(dest, e + ".safetensors"),
                                    (torch.zeros(1, nets["student"].cfg.context_dim),
                                     torch.zeros(nets["student"].cfg.pooled_dim)))
            for e in ("null", "prompt", "neg")}
    return nets, v, embs


@torch.no_grad()
def evaluate(dest=SHIP, size=256, per_image=3, teacher_steps=40, seed=0):
    """Rows of the README table and the figure's columns (first crop). Every model runs through
    sample.upscale as sample.py runs it: latent tiles of the training size, AdaIN colour fix."""
    import sample
    nets, v, embs = load_shipped(dest)
    hr, lr = heldout_pairs(size, per_image, seed)
    lr_up = torch.nn.functional.interpolate(lr, size=hr.shape[-2:], mode="bicubic", align_corners=False).clamp(0, 1)
    cond = {e: (p[None], c[None]) for e, (c, p) in embs.items()}

    def run(net, steps, teacher=False):
        kw = {**sample.sampling_settings(net), "cfg": CFG_W}
        return torch.cat([sample.upscale(lr[i:i + 1], net, v, cond["prompt"], steps, teacher=teacher,
                                         cond_neg=cond["neg"], seed=seed, vae_tile=0, **kw) for i in range(len(lr))])

    methods = {"bicubic": lambda: lr_up,
               "VAE(HR) (upper bound)": lambda: v.decode(v.encode(hr * 2 - 1, tile=0), tile=0).float().add(1).div(2).clamp(0, 1)}
    for k in sorted({1, 4, teacher_steps}):
        methods[_teacher_name(k)] = lambda k=k: run(nets["teacher"], k, teacher=True)
    for k in (1, 2, 4):
        methods[f"student {k} step{'s' * (k > 1)}"] = lambda k=k: run(nets["student"], k)
    for k in (1, 2):
        methods[f"student, gt target, {k} step{'s' * (k > 1)}"] = lambda k=k: run(nets["student_gt"], k)
    B = hr.shape[0]
    outs, secs = {}, {}
    for name, fn in methods.items():
        t0 = time.perf_counter()
        outs[name] = fn()
        secs[name] = (time.perf_counter() - t0) / B
    ref = outs[_teacher_name(teacher_steps)]
    rows = [{"method": n, "PSNR": psnr(o, hr).mean().item(), "SSIM": ssim(o, hr).mean().item(),
             f"PSNR vs teacher {teacher_steps}": psnr(o, ref).mean().item() if o is not ref else float("inf"),
             "HF energy / HR": hf_ratio(o, hr).mean().item(), "s / image": secs[n]}
            for n, o in outs.items()]
    figure = [torch.nn.functional.interpolate(lr[:1], size=hr.shape[-2:], mode="nearest"), lr_up[:1],
              outs[_teacher_name(1)][:1], ref[:1], outs["student 1 step"][:1],
              outs["student 2 steps"][:1], hr[:1]]
    return rows, figure


def _teacher_name(k):
    return f"teacher {k} step{'s' * (k > 1)}, CFG {CFG_W:g}"


def save_figure(cols, path):
    """LR | bicubic | teacher 1 | teacher 40 | student 1 | student 2 | HR, one row, atomically."""
    row = torch.cat([c[0].clamp(0, 1) for c in cols], 2)
    tmp = path + ".tmp.png"
    Image.fromarray((row.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(tmp)
    os.replace(tmp, path)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="runs/miniature", help="working folder (data, checkpoints)")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every stage's steps (0.01: a smoke run)")
    ap.add_argument("--only", nargs="*", choices=[n for n, _ in STAGES], help="run only these stages")
    ap.add_argument("--workers", type=int, default=2, help="data-loading processes per stage")
    ap.add_argument("--no-ship", action="store_true", help="do not copy the result to " + SHIP
                    + " (with --scale other than 1: to RUNS/mfsr-tiny)")
    a = ap.parse_args()
    torch.set_num_threads(2)
    run(a.runs, a.scale, a.only, a.workers)
    if not a.no_ship:   # a scaled (smoke) run never replaces the shipped model or the example
        ship(a.runs, SHIP if a.scale == 1.0 else os.path.join(a.runs, "mfsr-tiny"))
        if a.scale == 1.0:
            make_example()
    sys.exit(0)
