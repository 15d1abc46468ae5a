"""Train MFSR: the DiT4SR-style LR-stream teacher (--stage teacher) or the one-step student
distilled from it with the MeanFlow identity (--stage distill, MFSR Alg. 1; the default).

    python train.py --preset tiny --data DIR --stage teacher --vae weights/mfsr-tiny/vae.safetensors \
        --steps 200 --out runs/teacher
    python train.py --preset tiny --data DIR --vae weights/mfsr-tiny/vae.safetensors \
        --teacher runs/teacher/ckpt-0000200/teacher.safetensors --out runs/student
    python train.py --ckpt sd3.5_medium.safetensors --teacher dit4sr_q/ --data HR_DIR ...   # full scale
    torchrun --nproc_per_node 8 train.py ...                                              # many GPUs

Pairs are made on the fly (paper §5.1): a random HR crop, USM-sharpened, degraded with the Real-ESRGAN
pipeline (degrade.py) to LR at 1/4; LR bicubic-upsampled x4; both VAE-encoded. Conditioning comes
from embedding files beside the images (`name.safetensors` with `context` (L, context_dim) and
`pooled` (pooled_dim)), else --prompt-emb's, else the null embedding (--null-emb, zeros if absent).

Randomness is a function of (seed, step, rank): which images, crops, degradations, noise and times a
step sees. So `--resume` only needs the weights, the optimizer state and the step, and a resumed run
repeats the uninterrupted one exactly.
"""
import argparse
import copy
import glob
import inspect
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image

import degrade
import fastjvp
import model
import mfsr
import vae as vae_lib
from model import CheckpointError, SafetensorsFiles, atomic_save
from sample import EXTS as IMAGE_EXTS, load_embedding, peak_memory_mb

CACHE_BYTES = 512 * 2 ** 20     # decoded images each data worker keeps in memory
MAX_NAMED = 20                  # skipped images named one by one before a count


@dataclass
class TrainConfig:
    stage: str = "distill"          # "distill" (MFSR) | "teacher" (rectified flow)
    preset: str = "full"            # "full" (SD3.5-medium / DiT4SR, 512 crops) | "tiny" (CPU)
    data: str = ""                  # folder(s) of HR images, comma-separated, searched recursively
    out: str = "runs/mfsr"          # run folder: checkpoints, log.jsonl, progress grids
    ckpt: str = ""                  # SD3.5 single file or diffusers folder (base transformer + VAE)
    teacher: str = ""               # DiT4SR / our teacher transformer (distill stage)
    teacher_mode: str = "v1"        # DiT4SR key mode of the teacher file (v1 | r1)
    vae: str = ""                   # VAE file / folder, else the one inside --ckpt
    untrained_vae: bool = False     # --preset tiny without --vae / --ckpt: a random VAE (smoke runs only)
    null_emb: str = ""              # safetensors with context / pooled of the empty prompt
    neg_emb: str = ""               # ... of the negative prompt (Eq. 11)
    prompt_emb: str = ""            # ... for images without their own embedding file (else the null)
    neg_prob: float = 0.0           # teacher stage: share of rows taught "negative prompt -> the LR latent"
    clean_prob: float = 0.0         # share of pairs whose LR is the plain bicubic x4 (degrade.bicubic_down)
    plain_gt: bool = False          # supervise with the HR crop itself, not Real-ESRGAN's USM-sharpened one
    cache_latents: int = 0          # > 0: encode this many pairs once and train on them (no per-step VAE)
    size: int = 0                   # HR crop; 0 = 512 (full) / 64 (tiny)
    depth: int = 0                  # tiny teacher from scratch: joint blocks (0: model.CONFIGS["tiny"]'s)
    heads: int = 0                  # ... and heads of 64 channels (0: the tiny config's); a size scan
    prediction: str = "v"           # ... and its output: v (SD3's eps - x0) or x (x0 - z_LR, mfsr.py's top)
    batch: int = 10                 # per process (paper: 80 over 8 GPUs)
    steps: int = 12000              # App. B: 12K iterations
    lr: float = 5e-5                # Adam (distill, App. B); teacher stage: AdamW like DiT4SR
    lr_decay: str = "none"          # none (constant, as the paper) | cosine (to 0 at --steps; the tiny VAE)
    lora_rank: int = 64             # distill: rank of the student's LoRA (App. B)
    time_scale: float = 1.0         # c_noise(t) = time_scale * t of the student (§4.4: 1; SD3.5's teacher: 1000)
                                    # and of a tiny teacher trained from scratch
    time_cutoff: float = 0.0        # distill: drop the student's time features above this many rad per unit t
                                    # (0: none; for a 1000 t teacher that cannot be retrained, not the paper's)
    ratio: float = 0.5              # share of rows with s != t (Table 4)
    warmup: int = 0                 # distill: first steps at ratio 0 (s = t: the rescaled time embedding
                                    # fitted to the teacher's velocity before the MeanFlow target)
    anchor: float = 0.0             # distill: share of rows trained at (t, s) = (0, 1) on the teacher's 40-step
                                    # endpoint from their noise instead of Eq. 12 (0: none, the paper's)
    time_pairs: str = "uniform"     # distill: how the s != t pairs are drawn (mfsr.sample_times; uniform is the paper's)
    gap_ramp: int = 0               # distill: s - t at most (steps after --warmup) / gap_ramp, a short-to-long
                                    # curriculum (0: no cap)
    target: str = "neg"             # teacher velocity: gt | meanflow | null | neg (Table 3)
    cfg_w: float = 6.0              # w of Eq. 9 / 10 / 11 (a sampler's standard CFG scale is w + 1: mfsr.eq11_w)
    time_shift: float = mfsr.SD35_SHIFT   # teacher stage: SD3's shift of the logit-normal sigma (3 as SD3.5, 1 none)
    kappa: float = 0.0              # kappa of MeanFlow's CFG (Eq. 9, --target meanflow; MeanFlow: w 1, kappa 0.83)
    cond_drop: float = 0.0          # distill: share of rows trained on the null prompt, unguided (MeanFlow: 0.1)
    loss: str = "pseudo_huber"      # pseudo_huber | l2 | adaptive
    mode: str = "split"             # JVP execution: split | fused
    caption_dropout: float = 0.2    # teacher stage
    grad_clip: float = 1.0          # clip the gradient's global norm to this
    accum: int = 1                  # gradient accumulation steps
    ema: float = 0.0                # EMA decay of trainable weights (0 = off)
    dtype: str = "bf16"             # autocast dtype on GPU (CPU runs fp32)
    compile: bool = False           # torch.compile the trained network
    grad_ckpt: bool = False         # gradient checkpointing per block (less memory, ~1.3x time)
    workers: int = 2                # data-loading processes per training process
    seed: int = 0                   # every draw (data, degradation, noise, times) follows from it
    log_every: int = 10             # print a line every this many steps (log.jsonl has every step)
    sample_every: int = 500         # write a progress grid PNG every this many steps
    save_every: int = 1000          # write a checkpoint every this many steps
    keep: int = 3                   # checkpoints kept
    max_bad: int = 5                # stop after this many non-finite losses in a row
    resume: bool = False            # continue from the newest readable checkpoint in --out


# --------------------------------------------------------------------------------------------
# Data: HR images -> (gt, lr) pairs made in worker processes (paper §5.1): a random HR crop,
# degraded by degrade.py to LR at 1/4, or with probability clean_prob the plain bicubic x4.


def find_images(data):
    paths = []
    for root in [d for d in data.split(",") if d]:
        if not os.path.isdir(root):
            raise SystemExit(f"error: --data {root}: no such folder")
        paths += sorted(p for p in glob.glob(os.path.join(root, "**", "*"), recursive=True)
                        if p.lower().endswith(IMAGE_EXTS))
    if not paths:
        raise SystemExit(f"error: --data {data}: no images ({', '.join(IMAGE_EXTS)}) found")
    return paths


def usable_images(paths, size, say=print):
    """(the paths Pillow opens whose shorter side is at least `size`, {every other path: why}). Each
    skipped file is named through `say` (MAX_NAMED of them, then a count); SystemExit if none is left."""
    usable, skipped = [], {}
    for p in paths:
        try:
            with Image.open(p) as im:                     # the header only
                W, H = im.size
        except Exception as e:                            # PIL raises many types for corrupt files
            skipped[p] = f"unreadable ({e})"
            continue
        if min(W, H) < size:
            skipped[p] = f"{W}x{H}, smaller than the {size}x{size} crop (upscaling it would teach blur)"
        else:
            usable.append(p)
    for p, why in list(skipped.items())[:MAX_NAMED]:
        say(f"warning: skipping {p}: {why}")
    if len(skipped) > MAX_NAMED:
        say(f"warning: ... and {len(skipped) - MAX_NAMED} more images skipped")
    if not usable:
        raise SystemExit(f"error: none of the {len(paths)} images in --data is usable: {len(skipped)} skipped "
                         f"(unreadable, or smaller than the {size}x{size} crop)")
    return usable, skipped


def random_crop(img, size, g):
    """(3, H, W) uint8 or in [0, 1] -> a random (3, size, size) crop in [0, 1]: degrade's crop, which
    upscales smaller images (bicubic); of a large uint8 image only the crop is converted to float."""
    if min(img.shape[1:]) < size and img.dtype == torch.uint8:
        img = img.float() / 255
    crop = degrade.random_crop_pair_source(img, size, g)[0]
    return crop.float() / 255 if crop.dtype == torch.uint8 else crop


class PairDataset(torch.utils.data.Dataset):
    """Item (index, seed) -> dict(gt, lr, context, pooled, name), or dict(unreadable=path, why=...).
    default: the (context, pooled) of images without an embedding file. A share clean_prob of the
    items gets the clean bicubic x4 LR instead of the Real-ESRGAN one."""

    def __init__(self, paths, size, default, degrade_cfg, clean_prob=0.0):
        self.paths, self.size, self.default, self.degrade_cfg = paths, size, default, degrade_cfg
        self.clean_prob = clean_prob
        self.decoded, self.decoded_bytes = {}, 0    # decoded images kept per worker, up to CACHE_BYTES

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, key):
        i, seed = key
        path = self.paths[i]
        arr = self.decoded.get(path)
        if arr is None:
            try:
                with Image.open(path) as im:
                    arr = np.array(im.convert("RGB"))                     # (H, W, 3) uint8
            except Exception as e:  # PIL raises many types for truncated / odd files
                return dict(unreadable=path, why=str(e))
            if self.decoded_bytes + arr.nbytes <= CACHE_BYTES:   # small data sets: decode each file once
                self.decoded[path] = arr
                self.decoded_bytes += arr.nbytes
        g = torch.Generator().manual_seed(seed)
        hr = random_crop(torch.from_numpy(arr).permute(2, 0, 1), self.size, g)
        if self.clean_prob > 0 and torch.rand((), generator=g) < self.clean_prob:
            gt, lr = hr[None], degrade.bicubic_down(hr[None], self.degrade_cfg.scale)
        else:
            gt, lr, _ = degrade.degrade(hr[None], self.degrade_cfg, generator=g)
        context, pooled = load_embedding(os.path.splitext(path)[0] + ".safetensors", self.default)
        return dict(gt=gt[0], lr=lr[0], context=context, pooled=pooled, name=path)


def pad_tokens(context, L):
    """context (..., l, D) zero-padded to L tokens (zero rows are padding)."""
    return F.pad(context, (0, 0, 0, L - context.shape[-2]))


def collate(items):
    """A batch dict; `unreadable`: (path, why) of the items that could not be read (an all-unreadable
    batch has nothing else)."""
    unreadable = [(it["unreadable"], it["why"]) for it in items if "unreadable" in it]
    items = [it for it in items if "unreadable" not in it]
    if not items:
        return dict(unreadable=unreadable)
    L = max(it["context"].shape[0] for it in items)
    return dict(gt=torch.stack([it["gt"] for it in items]), lr=torch.stack([it["lr"] for it in items]),
                context=torch.stack([pad_tokens(it["context"], L) for it in items]),
                pooled=torch.stack([it["pooled"] for it in items]),
                names=[it["name"] for it in items], unreadable=unreadable)


def step_batches(n, batch, seed, rank, start, stop):
    """For each step k in [start, stop): `batch` (index, seed) keys of n items, drawn from a generator
    seeded by (seed, k, rank), so a resumed run draws what an uninterrupted one would."""
    for k in range(start, stop):
        g = torch.Generator().manual_seed(mix(seed, k, rank))
        idx = torch.randint(n, (batch,), generator=g).tolist()
        seeds = torch.randint(2 ** 62, (batch,), generator=g).tolist()
        yield list(zip(idx, seeds))


def mix(*xs):
    h = 0
    for x in xs:
        h = (h * 1_000_003 + int(x) + 1) % (2 ** 62)
    return h


def training_images(cfg, rank):
    """(usable image paths of --data, {skipped path: why}); rank 0 names each skipped file and warns
    about captions that have no embedding file yet."""
    say = (lambda m: print(m, file=sys.stderr)) if rank == 0 else (lambda m: None)
    paths, skipped = usable_images(find_images(cfg.data), cfg.size, say)
    uncoded = [q for q in paths if os.path.exists(os.path.splitext(q)[0] + ".txt")
               and not os.path.exists(os.path.splitext(q)[0] + ".safetensors")]
    if uncoded and rank == 0:
        print(f"warning: {len(uncoded)} captions (e.g. {os.path.splitext(uncoded[0])[0]}.txt) have no embedding "
              "file; they train with the default prompt. Encode them first: "
              "python tools/text.py --data DIR --encoders ...")
    return paths, skipped


def training_batches(cfg, paths, prompt, vae, device, rank, start):
    """The batches of the steps from `start` on: pairs made by worker processes, or latent cache rows."""
    data = PairDataset(paths, cfg.size, prompt, degrade.DegradeConfig(usm_gt=not cfg.plain_gt), cfg.clean_prob)
    if cfg.cache_latents:
        return cached_batches(latent_cache(cfg, data, vae, device, rank), cfg, rank, start)
    keys = step_batches(len(paths), cfg.batch * cfg.accum, cfg.seed, rank, start, cfg.steps)
    return torch.utils.data.DataLoader(data, batch_sampler=keys, collate_fn=collate, num_workers=cfg.workers)


# --------------------------------------------------------------------------------------------
# cache_latents (the miniature's, CODE_ONLY): a fixed set of pairs encoded once


def latent_cache(cfg, data, vae, device, rank):
    """cache_latents = N: N pairs drawn, degraded and VAE-encoded once, then reused by every step (a
    fixed set of degradations: much faster when the VAE dominates a step, as at small model sizes).
    Kept in out/latents-{rank}.safetensors, reused by a rerun or --resume with the same settings."""
    path = os.path.join(cfg.out, f"latents-{rank}.safetensors")
    key = json.dumps({k: getattr(cfg, k) for k in ("cache_latents", "size", "seed", "data", "vae", "ckpt",
                                                   "prompt_emb", "null_emb", "clean_prob", "plain_gt")})
    if os.path.exists(path):
        f = SafetensorsFiles(path)
        if f.metadata.get("key") == key:
            return {k: f.get(k).to(device) for k in f.keys()}
        print(f"warning: {path} was made with other settings; encoding again")
    n, parts, t0 = cfg.cache_latents, [], time.time()
    keys = step_batches(len(data), cfg.batch, mix(cfg.seed, 1), rank, 0, math.ceil(n / cfg.batch))
    loader = torch.utils.data.DataLoader(data, batch_sampler=keys, collate_fn=collate, num_workers=cfg.workers)
    for k, batch in enumerate(loader):
        if "gt" not in batch:
            continue
        g = torch.Generator().manual_seed(mix(cfg.seed, k, rank, 11))
        z_hr, z_lr = encode_pair(vae, {k: batch[k].to(device) for k in ("gt", "lr")}, g)
        parts.append(dict(z_hr=z_hr.cpu(), z_lr=z_lr.cpu(), context=batch["context"], pooled=batch["pooled"]))
        if rank == 0 and (k + 1) % 20 == 0:
            print(f"cache: {(k + 1) * cfg.batch}/{n} pairs encoded ({time.time() - t0:.0f} s)", flush=True)
    L = max(p["context"].shape[1] for p in parts)
    cache = {k: torch.cat([pad_tokens(p[k], L) if k == "context" else p[k] for p in parts])[:n].contiguous()
             for k in parts[0]}
    atomic_save(cache, path, {"key": key})
    return {k: v.to(device) for k, v in cache.items()}


def cached_batches(cache, cfg, rank, start):
    """For step k: `batch` rows of the latent cache, drawn from a generator seeded by (seed, k, rank)."""
    n = cache["z_hr"].shape[0]
    for k in range(start, cfg.steps):
        g = torch.Generator().manual_seed(mix(cfg.seed, k, rank, 3))
        idx = torch.randint(n, (cfg.batch * cfg.accum,), generator=g).to(cache["z_hr"].device)
        yield {name: v[idx] for name, v in cache.items()} | {"names": [f"cached pair {i}" for i in idx.tolist()]}


# --------------------------------------------------------------------------------------------
# Models


def build_models(cfg, device):
    """(trained net, frozen teacher or None, frozen vae)."""
    tiny = cfg.preset == "tiny"
    if cfg.vae or cfg.ckpt:
        vae = vae_lib.load_vae(cfg.vae or cfg.ckpt)
    else:
        if not tiny:
            raise SystemExit("error: give --ckpt (SD3.5 with its VAE) or --vae; only --preset tiny runs without")
        if not cfg.untrained_vae:
            raise SystemExit(f"error: --stage {cfg.stage} trains on VAE latents: give --vae (a VAE file, e.g. "
                             "weights/mfsr-tiny/vae.safetensors); --untrained-vae runs "
                             "on a random tiny VAE (reconstructions near 11.5 dB: a smoke run, not a model)")
        torch.manual_seed(cfg.seed)
        vae = vae_lib.VAE(vae_lib.CONFIGS["tiny"])
    vae = vae.to(device).eval().requires_grad_(False)
    if cfg.stage == "teacher":
        if cfg.teacher:    # continue training a teacher (e.g. the shipped one)
            net = model.load_transformer(cfg.teacher, lr_key_mode=cfg.teacher_mode)
        elif cfg.ckpt:
            net = model.add_lr_stream(model.load_transformer(cfg.ckpt))
        else:              # from scratch; a tiny one with the size scan's depth / heads / prediction if given
            torch.manual_seed(cfg.seed)
            t = model.CONFIGS["tiny"]
            net = model.MMDiT(replace(t, depth=cfg.depth or t.depth, heads=cfg.heads or t.heads,
                                      prediction=cfg.prediction, time_scale=cfg.time_scale)
                              if tiny else model.CONFIGS["dit4sr"])
        dead = set(model.dead_lr_params(net))
        for name, p in net.named_parameters():      # DiT4SR trains only the control layers
            p.requires_grad_(name not in dead and ("control" in name or (tiny and not cfg.ckpt)))
        return net.to(device), None, vae
    if cfg.teacher:
        teacher = model.load_transformer(cfg.teacher, lr_key_mode=cfg.teacher_mode)
    elif tiny:
        torch.manual_seed(cfg.seed)
        teacher = model.MMDiT(model.CONFIGS["tiny"])
        print("warning: no --teacher: distilling a random tiny teacher (a smoke run, not a model)")
    else:
        raise SystemExit("error: --stage distill needs --teacher (a DiT4SR or teacher-stage checkpoint)")
    if not teacher.cfg.lr_stream or teacher.cfg.two_times:
        raise SystemExit(f"error: --teacher {cfg.teacher}: needs a one-time model with the LR stream")
    teacher = teacher.to(device).eval()
    student = model.make_student(teacher, lora_rank=cfg.lora_rank, time_scale=cfg.time_scale,
                                 time_cutoff=cfg.time_cutoff)
    teacher.requires_grad_(False)
    return student, teacher, vae


def conditioning(cfg, mcfg):
    """Null, negative and default (context, pooled): zeros for the null, the null for the others
    when their files are not given."""
    null = load_embedding(cfg.null_emb, (torch.zeros(1, mcfg.context_dim), torch.zeros(mcfg.pooled_dim)))
    if not cfg.neg_emb and ((cfg.stage == "distill" and cfg.target == "neg") or cfg.neg_prob > 0):
        print("warning: no --neg-emb: the negative prompt is the null prompt (Eq. 11 = Eq. 10)")
    return null, load_embedding(cfg.neg_emb, null), load_embedding(cfg.prompt_emb, null)


# --------------------------------------------------------------------------------------------
# One step of each stage


def encode_pair(vae, batch, g):
    """HR and bicubic-upsampled LR to latents (DiT4SR: posterior samples)."""
    gt, lr = batch["gt"], batch["lr"]
    lr_up = F.interpolate(lr, size=gt.shape[-2:], mode="bicubic", align_corners=False).clamp(0, 1)
    with torch.no_grad():
        z_hr = vae.encode(gt * 2 - 1, generator=g, sample=True)
        z_lr = vae.encode(lr_up * 2 - 1, generator=g, sample=True)
    return z_hr, z_lr


def teacher_loss(net, z_hr, z_lr, context, pooled, null, cfg, g, neg=None):
    """DiT4SR's rectified flow: logit-normal t with SD3's shift (cfg.time_shift), x0-MSE (= sigma^2-
    weighted velocity). A share caption_dropout of the rows gets the null prompt; with neg_prob > 0
    (the miniature) another share gets the negative prompt and the LR latent as its target, so the
    negative prompt ("blurry, low-res, ...") means what it says and CFG can push away from it."""
    B = z_hr.shape[0]
    r = torch.rand(B, generator=g)
    context, pooled = _with_rows(context, pooled, r < cfg.caption_dropout, null)
    target = z_hr
    if neg is not None and cfg.neg_prob > 0:
        to_neg = (r >= cfg.caption_dropout) & (r < cfg.caption_dropout + cfg.neg_prob)
        context, pooled = _with_rows(context, pooled, to_neg, neg)
        target = torch.where(to_neg[:, None, None, None], z_lr, z_hr)
    u = torch.sigmoid(torch.randn(B, generator=g))
    a = cfg.time_shift
    sigma = (a * u / (1 + (a - 1) * u)).to(z_hr)                      # SD3's shifted sigma
    eps = torch.randn(z_hr.shape, generator=g).to(z_hr)
    x = (1 - sigma.view(-1, 1, 1, 1)) * target + sigma.view(-1, 1, 1, 1) * eps
    x0 = mfsr.denoised(net)(x, 1 - sigma, (z_lr, pooled, context))
    return (x0.float() - target.float()).pow(2).mean(), None


def _with_rows(context, pooled, rows, emb):
    """context (B, L, D) / pooled (B, P) with the rows `rows` replaced by emb = (context, pooled)."""
    L = max(context.shape[1], emb[0].shape[0])
    context, e = pad_tokens(context, L), pad_tokens(emb[0], L)[None].to(context)
    return torch.where(rows[:, None, None], e, context), torch.where(rows[:, None], emb[1][None].to(pooled), pooled)


def distill_loss(student, raw_student, teacher, z_hr, z_lr, context, pooled, null, neg, cfg, g, log=None, step=0,
                 diagnose=False):
    """MFSR Alg. 1: t, s; z_t; the teacher's CFG velocity; the MeanFlow target by JVP; the loss.
    log: a dict that gets the step's jvp_term (see mfsr.mfd_loss), the largest over micro-batches,
    and with `diagnose` du/dt's time and noise terms and their secants (mfsr.dudt_terms).
    During the first cfg.warmup steps every row has s = t (no JVP). A share cfg.cond_drop of the rows
    gets the null prompt and the unguided velocity as target (MeanFlow's condition dropout: it
    trains u(. | null), which Eq. 9's target calls). After the warm-up a share cfg.anchor of the rows
    (the last ones) is trained by anchor_loss instead."""
    B = z_hr.shape[0]
    n = min(B - 1, round(cfg.anchor * B)) if step >= cfg.warmup else 0
    anchor_rows = (z_lr[B - n:], pooled[B - n:], context[B - n:])
    z_hr, z_lr, context, pooled, B = z_hr[:B - n], z_lr[:B - n], context[:B - n], pooled[:B - n], B - n
    ratio = 0.0 if step < cfg.warmup else cfg.ratio
    gap = min(1.0, (step - cfg.warmup + 1) / cfg.gap_ramp) if cfg.gap_ramp else 1.0
    t, s = (x.to(z_hr) for x in mfsr.sample_times(B, ratio, g, pairs=cfg.time_pairs, max_gap=gap))
    eps = torch.randn(z_hr.shape, generator=g).to(z_hr)
    z_t = t.view(-1, 1, 1, 1) * z_hr + (1 - t.view(-1, 1, 1, 1)) * eps
    drop = torch.zeros(B, dtype=torch.bool, device=z_hr.device)
    if cfg.cond_drop > 0:
        drop = (torch.rand(B, generator=g) < cfg.cond_drop).to(z_hr.device)
        context, pooled = _with_rows(context, pooled, drop, null)
    c = (z_lr, pooled, context)
    expand = lambda e: (z_lr, e[1][None].expand_as(pooled).to(pooled),
                        pad_tokens(e[0], context.shape[1])[None].expand_as(context).to(context))
    # dropped rows take the null prompt as their negative too: Eq. 10 / 11 then reduce to v(z | null)
    _, neg_pooled, neg_context = expand(neg)
    cond_neg = (z_lr, *_with_rows(neg_context, neg_pooled, drop, null)[::-1])
    v = mfsr.teacher_velocity(cfg.target, z_t, t, z_hr=z_hr, eps=eps, teacher=mfsr.velocity(teacher),
                              student_u=mfsr.average_velocity(raw_student), cond=c, cond_neg=cond_neg,
                              cond_null=expand(null), w=cfg.cfg_w, kappa=cfg.kappa).float()   # the JVP tangent: fp32
    if cfg.target == "meanflow" and drop.any():    # Eq. 9 guides conditioned rows; dropped ones learn v itself
        v = torch.where(drop.view(-1, 1, 1, 1), (z_hr - eps).float(), v)
    with fastjvp.detached_tangents():   # the target's du/dt is detached: its tangent rules need no backward
        res = mfsr.mfd_loss(mfsr.average_velocity(student), z_t, t, s, v, cond=c, mode=cfg.mode, loss=cfg.loss,
                            u_fn_jvp=mfsr.average_velocity(raw_student), scale=mfsr.error_scale(raw_student, t))
    if log is not None:
        log["jvp_term"] = max(log.get("jvp_term", 0.0), res["jvp_term"])
        if diagnose:
            log.update(mfsr.dudt_terms(mfsr.average_velocity(raw_student), z_t, t, s, v, cond=c))
    if not n or res["loss"] is None:
        return res["loss"], res["n_nonfinite"]
    anchor = anchor_loss(student, teacher, *anchor_rows, neg, cfg, g)
    if log is not None:
        log["anchor_loss"] = anchor.item()
    return (res["loss"] * B + anchor * n) / (B + n), res["n_nonfinite"]


def anchor_loss(student, teacher, z_lr, pooled, context, neg, cfg, g):
    """Consistency mid-training, beyond the paper (--anchor): the one-step jump u(z_0, 0, 1)
    regressed on the teacher's own 40-step sample from the same noise, z_1 - z_0 (its CFG scale
    cfg_w + 1, its sampling shift), with the MFD distance. Eq. 12 reaches the flow map only through
    its own derivatives; this pins the one-step corner to where the teacher's samples land."""
    z0 = torch.randn(z_lr.shape, generator=g).to(z_lr)
    c_neg = (neg[1][None].expand_as(pooled).to(pooled), pad_tokens(neg[0], context.shape[1])[None].expand_as(context).to(context))
    with torch.no_grad():
        z1 = mfsr.sample_teacher(teacher, z_lr, (pooled, context), c_neg, steps=40, cfg=cfg.cfg_w + 1,
                                 shift=(getattr(teacher, "sampling", None) or {}).get("shift", mfsr.SD35_SHIFT), noise=z0)
    t = torch.zeros(z_lr.shape[0], device=z_lr.device, dtype=z_lr.dtype)
    u = mfsr.average_velocity(student)(z0, t, t + 1, (z_lr, pooled, context))
    return mfsr.LOSSES[cfg.loss](u.float(), (z1 - z0).float())[0]


# --------------------------------------------------------------------------------------------
# Many processes: the trainable parameters' gradients are averaged by hand after backward (as
# py-meanflow does). DDP is not used: the JVP runs on the raw module (mfsr's u_fn_jvp), and the
# fused mode trains the primal output of that JVP. Each rank runs the raw module on its own shard.


def all_reduce_grads(params):
    """Average the gradients of `params` over all ranks; a missing gradient counts as zeros."""
    world = dist.get_world_size()
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad /= world


def any_rank(params, flag):
    """True on every rank if `flag` is true on any (so all skip a step together); `params` is the
    synchronised parameter list, None in a single process."""
    if params is None:
        return flag
    t = torch.tensor([float(flag)], device=params[0].device)
    dist.all_reduce(t)
    return bool(t.item() > 0)


# --------------------------------------------------------------------------------------------
# Checkpoints: trainable weights + config; optimizer state; a full export for sample.py


def optimizer_tensors(opt, prefix=""):
    """opt.state_dict() as safetensors can hold it: {prefix + "param index.name": tensor} (0-d
    tensors as (1,)) and the param groups as JSON."""
    state = opt.state_dict()
    tensors = {f"{prefix}{i}.{k}": v.detach().cpu().reshape(-1) if v.ndim == 0 else v.detach().cpu()
               for i, st in state["state"].items() for k, v in st.items()}
    return tensors, json.dumps(state["param_groups"])


def load_optimizer(opt, tensors, groups, prefix=""):
    """Restore `opt` from optimizer_tensors' entries (the keys starting with `prefix`) and its
    param groups (the parsed JSON)."""
    state = {}
    for k, v in tensors.items():
        if k.startswith(prefix):
            i, name = k[len(prefix):].split(".", 1)
            state.setdefault(int(i), {})[name] = v.reshape(()) if name == "step" else v
    opt.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(cfg, net, opt, ema, step, rank, embs, vae):
    """out/ckpt-{step}/, whole or not at all: trainable.safetensors (+ EMA) and optimizer.safetensors
    to resume from, and the export sample.py reads: student.safetensors / teacher.safetensors with the
    null, negative and default prompt embeddings it was trained with, and a VAE that came from no file."""
    if rank != 0:
        return
    final = os.path.join(cfg.out, f"ckpt-{step:07d}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    meta = {"train_config": json.dumps(asdict(cfg)), "model_config": json.dumps(asdict(net.cfg)),
            "lora": json.dumps(getattr(net, "lora", None)), "step": str(step)}
    train = {n: p.detach().cpu().contiguous() for n, p in net.named_parameters() if p.requires_grad}
    train.update({"ema." + n: v.cpu() for n, v in (ema or {}).items()})
    atomic_save(train, os.path.join(tmp, "trainable.safetensors"), meta)
    tensors, groups = optimizer_tensors(opt)
    atomic_save(tensors, os.path.join(tmp, "optimizer.safetensors"), {"param_groups": groups, "step": str(step)})
    latent = cfg.size // vae.cfg.factor
    sampling = {"tile": latent, "tile_overlap": sample_overlap(latent, net.cfg.patch),
                **({"shift": cfg.time_shift} if cfg.stage == "teacher" else {})}   # its sampler's grid
    save_full(net, os.path.join(tmp, f"{'teacher' if cfg.stage == 'teacher' else 'student'}.safetensors"),
              sampling, ema)
    if not (cfg.vae or cfg.ckpt):
        vae_lib.save_vae(vae, os.path.join(tmp, "vae.safetensors"))
    for name, (context, pooled) in zip(("null", "neg", "prompt"), embs):
        atomic_save({"context": context.contiguous(), "pooled": pooled.contiguous()},
                    os.path.join(tmp, f"{name}.safetensors"), {"format": "mfsr-embedding"})
    if os.path.exists(final):   # a rerun of this step: replaced only now that the new one is whole
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in sorted(glob.glob(os.path.join(cfg.out, "ckpt-*[0-9]")))[:-cfg.keep]:
        shutil.rmtree(old)


def sample_overlap(tile, patch):
    """DiT4SR's tile overlap ratio (24 / 64) for another tile size, in whole patches."""
    return patch * round(tile * 3 / 8 / patch)


def save_full(net, path, sampling=None, ema=None):
    """The whole model, LoRA merged, loadable by load_transformer / sample.py, with the EMA weights
    where `ema` (name -> tensor) has them: the ones to sample with. `sampling`: its sampler's defaults."""
    full = copy.deepcopy(net).cpu()
    with torch.no_grad():
        for n, p in full.named_parameters():
            if ema and n in ema:
                p.copy_(ema[n])
    full.sampling = sampling
    if getattr(full, "lora", None):
        model.merge_lora(full)
    model.save_transformer(full, path)


def load_checkpoint(cfg, net, opt, rank=0):
    """The newest readable ckpt-* in --out into `net` and `opt`; returns (step, ema). One that cannot be
    read (a file truncated by a crash or a full disk) is moved aside to NAME.broken, never deleted, and
    the one before it is used."""
    found = sorted(glob.glob(os.path.join(cfg.out, "ckpt-*[0-9]")))
    if not found:
        raise SystemExit(f"error: --resume: no ckpt-* folder in {cfg.out}")
    for folder in reversed(found):
        try:
            files = [SafetensorsFiles(os.path.join(folder, f"{f}.safetensors")) for f in ("trainable", "optimizer")]
            tensors, otensors = ({k: f.get(k) for k in f.keys()} for f in files)
            step, groups = int(files[0].metadata["step"]), json.loads(files[1].metadata["param_groups"])
        except (CheckpointError, OSError, KeyError, ValueError, RuntimeError) as e:   # unreadable: the one before
            aside = next(a for a in (f"{folder}.broken{i or ''}" for i in range(1000)) if not os.path.exists(a))
            if rank == 0:
                os.replace(folder, aside)
                print(f"warning: --resume: {folder} is not a whole checkpoint ({str(e).splitlines()[0]}); "
                      f"kept as {aside}")
            continue
        params = dict(net.named_parameters())
        train = {k for k, p in params.items() if p.requires_grad}
        if set(k for k in tensors if not k.startswith("ema.")) != train:
            raise CheckpointError(f"{folder}: its trainable set differs from this run's (other stage or LoRA?)")
        with torch.no_grad():
            for k in train:
                params[k].copy_(tensors[k])
        ema = {k[4:]: v.to(params[k[4:]].device) for k, v in tensors.items() if k.startswith("ema.")} or None
        load_optimizer(opt, otensors, groups)
        if folder != found[-1]:
            print(f"warning: --resume: resuming from {folder} (step {step})")
        return step, ema
    raise SystemExit(f"error: --resume: no readable checkpoint in {cfg.out} (the broken ones are kept as *.broken)")


def trim_log(path, step):
    """log.jsonl without the lines after `step` (or cut by the crash): a resumed run logs those steps again."""
    if not os.path.exists(path):
        return
    def before(line):
        try:
            return json.loads(line)["step"] <= step
        except (ValueError, KeyError, TypeError):
            return False
    with open(path) as f:
        keep = [line for line in f if before(line)]
    with open(path + ".tmp", "w") as f:
        f.writelines(keep)
    os.replace(path + ".tmp", path)


# --------------------------------------------------------------------------------------------
# Progress: a PNG grid to look at


@torch.no_grad()
def save_grid(path, vae, net, stage, batch, z_lr, null):
    """Rows of LR (upsampled) | 1 step | 2 steps (distill) or 4 Euler steps (teacher) | HR."""
    if "gt" not in batch:   # cached latents: the HR and (bicubic-upsampled) LR images through the VAE
        batch = dict(batch, gt=vae.decode(batch["z_hr"][:4]).float().add(1).div(2).clamp(0, 1),
                     lr=vae.decode(batch["z_lr"][:4]).float().add(1).div(2).clamp(0, 1))
    n = min(4, batch["gt"].shape[0])
    gt = batch["gt"][:n]
    g = torch.Generator().manual_seed(0)
    ctx, pooled = batch["context"][:n], batch["pooled"][:n]
    if stage == "distill":
        outs = [mfsr.sample_student(net, z_lr[:n], pooled, ctx, steps=k, generator=g) for k in (1, 2)]
    else:
        nctx, npooled = _with_rows(ctx, pooled, torch.ones(n, dtype=torch.bool), null)
        outs = [mfsr.sample_teacher(net, z_lr[:n], (pooled, ctx), (npooled, nctx), steps=k, cfg=1.0,
                                    generator=g) for k in (1, 4)]
    lr_up = F.interpolate(batch["lr"][:n], size=gt.shape[-2:], mode="bicubic")
    cols = [lr_up] + [vae.decode(o.to(z_lr)).float().add(1).div(2) for o in outs] + [gt]
    rows = torch.cat([torch.cat([c[i].cpu().clamp(0, 1) for c in cols], 2) for i in range(n)], 1)  # (3, nH, kW)
    tmp = path + ".tmp.png"
    Image.fromarray((rows.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(tmp)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# The command line: every TrainConfig field is a flag (but CODE_ONLY), its comment the help text


CHOICES = dict(stage=("distill", "teacher"), preset=("full", "tiny"), target=("gt", "meanflow", "null", "neg"),
               loss=tuple(mfsr.LOSSES), mode=("split", "fused"), dtype=("bf16", "fp16", "fp32"),
               teacher_mode=("v1", "r1"), lr_decay=("none", "cosine"), prediction=("v", "x"),
               time_pairs=mfsr.TIME_PAIRS)
# Settings only the miniature and the sweeps use (experiments/): they pass them to main() in code,
# and the command line, which a full-scale run reads, does not carry them.
CODE_ONLY = ("cache_latents", "clean_prob", "plain_gt", "neg_prob", "depth", "heads", "prediction")
FLAG_GROUPS = {   # --help's sections, each flag in one
    "data": ("data", "size", "null_emb", "neg_emb", "prompt_emb"),
    "model": ("preset", "ckpt", "teacher", "teacher_mode", "vae", "untrained_vae", "lora_rank", "time_scale",
              "time_cutoff"),
    "stage": ("stage", "target", "cfg_w", "kappa", "cond_drop", "ratio", "warmup", "time_pairs", "gap_ramp", "anchor",
              "loss", "time_shift", "caption_dropout"),
    "optimisation": ("batch", "accum", "steps", "lr", "lr_decay", "grad_clip", "ema", "seed", "max_bad"),
    "checkpoints and logs": ("out", "resume", "save_every", "keep", "log_every", "sample_every"),
    "distributed and speed (torchrun runs one process per GPU; every flag is per process)":
        ("dtype", "compile", "grad_ckpt", "mode", "workers"),
}


def field_help():
    """{field: its comment in TrainConfig, which may go on over the next lines}."""
    helps, last = {}, None
    for line in inspect.getsource(TrainConfig).splitlines()[2:]:
        code, _, comment = line.partition("#")
        if code.strip():
            last = code.split(":")[0].strip()
            helps[last] = comment.strip()
        elif comment and last:
            helps[last] += " " + comment.strip()
    return helps


def parse_args(argv=None, **code_only):
    """The TrainConfig of the command line `argv`, with the CODE_ONLY settings given as keywords."""
    unknown = set(code_only) - set(CODE_ONLY)
    if unknown:
        raise TypeError(f"parse_args: {', '.join(sorted(unknown))}: not among train.CODE_ONLY "
                        f"({', '.join(CODE_ONLY)}); the other settings are flags in argv")
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False,
                                epilog="Every flag is a field of train.TrainConfig; the resolved config is "
                                       "printed and stored in every checkpoint.")
    helps, defaults = field_help(), {f.name: f for f in fields(TrainConfig)}
    for group, names in FLAG_GROUPS.items():
        g = p.add_argument_group(group)
        for name in names:
            f = defaults[name]
            flag, text = "--" + name.replace("_", "-"), helps[name].replace("%", "%%")
            if f.type is bool or isinstance(f.default, bool):
                g.add_argument(flag, action="store_true", help=text)
            else:
                shown = f" (choices: {', '.join(CHOICES[name])})" if name in CHOICES else ""
                g.add_argument(flag, type=type(f.default), default=f.default, metavar=name.upper(),
                               help=f"{text}{shown} [default: {f.default if f.default != '' else 'none'}]")
    args = p.parse_args(argv)
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig) if f.name not in CODE_ONLY},
                      **code_only)
    for name, allowed in CHOICES.items():
        if getattr(cfg, name) not in allowed:
            flag = name if name in CODE_ONLY else "--" + name.replace("_", "-")
            p.error(f"{flag} {getattr(cfg, name)!r}: choose from {', '.join(allowed)}")
    if not cfg.data:
        p.error("--data is required (a folder of HR images)")
    if cfg.size == 0:
        cfg.size = 64 if cfg.preset == "tiny" else 512
    if not 0 <= cfg.anchor < 1:
        p.error(f"--anchor {cfg.anchor}: a share of the batch, in [0, 1)")
    if cfg.gap_ramp < 0 or cfg.time_cutoff < 0:
        p.error(f"--gap-ramp {cfg.gap_ramp}, --time-cutoff {cfg.time_cutoff}: must be >= 0")
    if not cfg.time_shift > 0:
        p.error(f"--time-shift {cfg.time_shift}: must be > 0 (SD3's sigma shift; 1 is none)")
    if (cfg.depth or cfg.heads or cfg.prediction != "v") and not (cfg.preset == "tiny" and cfg.stage == "teacher"
                                                                 and not cfg.teacher):
        p.error("depth / heads / prediction shape a tiny teacher trained from scratch (--preset tiny --stage "
                "teacher, no --teacher); other models take theirs from their checkpoint")
    if cfg.depth < 0 or cfg.heads < 0:
        p.error(f"depth {cfg.depth}, heads {cfg.heads}: must be positive")
    if cfg.size % 32:
        p.error(f"--size {cfg.size}: must be a multiple of 32 (x4 LR, latent patches)")
    out = os.path.realpath(cfg.out)
    for d in (d for d in cfg.data.split(",") if d):   # progress grids would become training images
        root = os.path.realpath(d)
        if os.path.commonpath([out, root]) == root:
            p.error(f"--out {cfg.out} is inside --data {d}: its images would be trained on; choose another folder")
    for name in ("null_emb", "neg_emb", "prompt_emb"):   # a mistyped path must not train on the null prompt
        if getattr(cfg, name) and not os.path.isfile(getattr(cfg, name)):
            p.error(f"--{name.replace('_', '-')} {getattr(cfg, name)}: no such file")
    return cfg


# --------------------------------------------------------------------------------------------
# The run


def learning_rate(cfg, step):
    """--lr, constant, or on a half cosine from --lr at step 0 to 0 at --steps."""
    if cfg.lr_decay == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
    return cfg.lr


def update(cfg, net, opt, ema, trainable, sync, step):
    """After backward: the gradients averaged over ranks and clipped, Adam at the step's learning rate,
    the EMA. Returns the gradient norm."""
    if sync is not None:
        all_reduce_grads(sync)
    gnorm = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
    for group in opt.param_groups:
        group["lr"] = learning_rate(cfg, step)
    opt.step()
    if ema is not None:
        with torch.no_grad():
            for n, p in net.named_parameters():
                if n in ema:
                    ema[n].lerp_(p.detach(), 1 - cfg.ema)
    return gnorm


def log_step(cfg, log, done, start, t0, loss, gnorm, lr, device, extra):
    """One line of log.jsonl per step, a printed line every --log-every steps."""
    peak = peak_memory_mb(device)   # NaN where the system does not report it
    rec = {"step": done, "loss": loss, "grad_norm": float(gnorm), "lr": lr,
           "peak_mb": None if math.isnan(peak) else round(peak), **extra}
    log.write(json.dumps(rec) + "\n")
    log.flush()
    if done % cfg.log_every == 0 or done == cfg.steps:
        rate = (done - start) / (time.time() - t0)
        print(f"step {done}/{cfg.steps}  loss {loss:.4f}  grad {float(gnorm):.3f}  "
              f"{rate:.2f} it/s  ETA {(cfg.steps - done) / max(rate, 1e-9) / 60:.1f} min  "
              f"peak {rec['peak_mb']} MB" + (f"  du/dt: time {extra['dudt_time']:.3g} (secant "
              f"{extra['dudt_secant_time']:.3g}), noise {extra['dudt_noise']:.3g}" if "dudt_time" in extra else ""),
              flush=True)


def main(argv=None, **code_only):
    """The run (code_only: the CODE_ONLY settings): models, optimizer and data, then per step a batch,
    the stage's loss over --accum micro-batches, the update, the log, progress grids and checkpoints."""
    cfg = parse_args(argv, **code_only)
    ddp = "RANK" in os.environ     # under torchrun: one process per GPU
    if ddp:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    if rank == 0:
        os.makedirs(cfg.out, exist_ok=True)
        print("config:", json.dumps(asdict(cfg)))
    paths, skipped = training_images(cfg, rank)
    net, teacher, vae = build_models(cfg, device)
    net.grad_checkpointing = cfg.grad_ckpt
    null, neg, prompt = conditioning(cfg, net.cfg)
    trainable = [p for p in net.parameters() if p.requires_grad]
    sync = trainable if ddp else None   # the parameters whose gradients are averaged
    if rank == 0:
        print(f"{len(paths)} images; model {net.cfg}; trainable parameters "
              f"{sum(p.numel() for p in trainable):,}; {world} process(es)")
    opt = (torch.optim.Adam(trainable, lr=cfg.lr) if cfg.stage != "teacher"
           else torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=1e-2))
    start, ema = load_checkpoint(cfg, net, opt, rank) if cfg.resume else (0, None)
    if rank == 0 and cfg.resume:
        trim_log(os.path.join(cfg.out, "log.jsonl"), start)
    if cfg.ema and ema is None:
        ema = {n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad}
    # static shapes: the JVP's rows (s != t) and the full batch are two fixed sizes, each compiled
    # once; automatic dynamic shapes made inductor (torch 2.13, CPU) fail on a symbolic size
    run = torch.compile(net, dynamic=False) if cfg.compile else net
    batches = training_batches(cfg, paths, prompt, vae, device, rank, start)
    autocast = torch.autocast(device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.dtype),
                              enabled=device.type == "cuda" and cfg.dtype != "fp32")
    log = open(os.path.join(cfg.out, "log.jsonl"), "a") if rank == 0 else None
    bad, t0, unreadable = 0, time.time(), []
    for step, batch in zip(range(start, cfg.steps), batches):
        g = torch.Generator().manual_seed(mix(cfg.seed, step, rank, 7))
        for path, why in batch.get("unreadable", []):        # a file whose header read but data did not
            if rank == 0 and path not in unreadable:
                print(f"warning: skipping unreadable image {path}: {why}", file=sys.stderr, flush=True)
            unreadable.append(path)
        if any_rank(sync, "gt" not in batch and "z_hr" not in batch):
            print(f"warning: step {step + 1}: no readable image in the batch, skipped")
            continue
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        z_hr, z_lr = (batch["z_hr"], batch["z_lr"]) if "z_hr" in batch else encode_pair(vae, batch, g)  # cache rows?
        opt.zero_grad(set_to_none=True)
        loss_sum, extra = 0.0, {}
        for a in range(cfg.accum):
            rows = slice(a * cfg.batch, (a + 1) * cfg.batch)
            args = (z_hr[rows], z_lr[rows], batch["context"][rows], batch["pooled"][rows], null)
            with autocast:
                if cfg.stage == "teacher":
                    loss, _ = teacher_loss(run, *args, cfg, g, neg=neg)
                else:
                    loss, _ = distill_loss(run, net, teacher, *args, neg, cfg, g, log=extra, step=step,
                                           diagnose=a == 0 and ((step + 1) % cfg.log_every == 0
                                                                        or step + 1 == cfg.steps))
            if any_rank(sync, loss is None or not torch.isfinite(loss)):   # ranks skip together
                loss_sum = None
                break
            (loss / cfg.accum).backward()
            loss_sum += loss.item() / cfg.accum
        if loss_sum is None:
            bad += 1
            print(f"warning: step {step + 1}: non-finite loss or target, step skipped ({', '.join(batch['names'])})")
            if bad >= cfg.max_bad:
                raise SystemExit(f"error: {bad} non-finite steps in a row, stopping at step {step + 1} "
                                 f"({', '.join(batch['names'])})")
            continue
        bad = 0
        if step == start and any(p.grad is None for p in trainable):  # a frozen-by-mistake branch
            raise SystemExit("error: trainable parameters without a gradient: " + ", ".join(
                n for n, p in net.named_parameters() if p.requires_grad and p.grad is None))
        gnorm = update(cfg, net, opt, ema, trainable, sync, step)
        done = step + 1
        if rank == 0:
            log_step(cfg, log, done, start, t0, loss_sum, gnorm, opt.param_groups[0]["lr"], device, extra)
            if done % cfg.sample_every == 0 or done == cfg.steps:
                save_grid(os.path.join(cfg.out, f"grid-{done:07d}.png"), vae, net.eval(), cfg.stage, batch, z_lr, null)
                net.train()
        if done % cfg.save_every == 0 or done == cfg.steps:
            save_checkpoint(cfg, net, opt, ema, done, rank, (null, neg, prompt), vae)
    if skipped and rank == 0:
        print(f"warning: {len(skipped)} of {len(paths) + len(skipped)} images were left out before training "
              f"(unreadable or smaller than the crop; named above)")
    if unreadable and rank == 0:
        names = sorted(set(unreadable))
        print(f"warning: {len(unreadable)} draws of {len(names)} unreadable image(s) were skipped: "
              f"{', '.join(names[:5])}{' ...' if len(names) > 5 else ''}")
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except CheckpointError as e:
        raise SystemExit(f"error: {e}")
