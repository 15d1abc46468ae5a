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

Randomness is a function of (seed, step, rank), so `--resume` repeats the uninterrupted run exactly.
The run's plumbing (seeds, latent cache, processes, checkpoints and resume, the log, image screening,
flags) lives in plumbing/; this file is the method's path through a training step.
"""
import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.distributed as dist
import torch.nn.functional as F

import degrade
import fastjvp
import model
import mfsr
import vae as vae_lib
from plumbing import runs
from plumbing.pairs import PairDataset, collate, training_images
from plumbing.checkpoints import CheckpointError, load_embedding, load_transformer, load_vae, zero_prompt
from plumbing.cli import add_flags, flag, peak_memory_mb


@dataclass
class TrainConfig:
    """Every setting of a run; each is a flag and its help text is the second argument."""
    stage: str = flag("distill", "distill (MFSR) | teacher (rectified flow)")
    preset: str = flag("full", "full (SD3.5-medium / DiT4SR, 512 crops) | tiny (CPU)")
    data: str = flag("", "folder(s) of HR images, comma-separated, searched recursively")
    out: str = flag("runs/mfsr", "run folder: checkpoints, log.jsonl, progress grids")
    ckpt: str = flag("", "SD3.5 single file or diffusers folder (base transformer + VAE)")
    teacher: str = flag("", "DiT4SR / our teacher transformer (distill stage)")
    teacher_mode: str = flag("v1", "DiT4SR key mode of the teacher file (v1 | r1)")
    vae: str = flag("", "VAE file / folder, else the one inside --ckpt")
    untrained_vae: bool = flag(False, "--preset tiny without --vae / --ckpt: a random VAE (smoke runs only)")
    null_emb: str = flag("", "safetensors with context / pooled of the empty prompt")
    neg_emb: str = flag("", "... of the negative prompt (Eq. 11)")
    prompt_emb: str = flag("", "... for images without their own embedding file (else the null)")
    neg_prob: float = flag(0.0, "teacher stage: share of rows with the negative prompt and the LR latent as target "
                                "(so that prompt means 'low-res')")
    clean_prob: float = flag(0.0, "share of pairs whose LR is plain bicubic x4 (degrade.bicubic_down), not degraded")
    plain_gt: bool = flag(False, "supervise with the HR crop itself, not Real-ESRGAN's USM-sharpened one")
    cache_latents: int = flag(0, "> 0: encode this many pairs once and train on them (no VAE in the steps)")
    size: int = flag(0, "HR crop; 0 = 512 (full) / 64 (tiny)")
    depth: int = flag(0, "a tiny teacher from scratch (--preset tiny --stage teacher): its blocks (0: the tiny's)")
    heads: int = flag(0, "that teacher's heads of 64 channels (0: the tiny config's)")
    prediction: str = flag("v", "that teacher's output: v (SD3's eps - x0) or x (x0 - z_LR; see mfsr.py's top)")
    batch: int = flag(10, "per process (paper: 80 over 8 GPUs)")
    steps: int = flag(12000, "App. B: 12K iterations")
    lr: float = flag(5e-5, "Adam (distill, App. B); teacher stage: AdamW like DiT4SR")
    lr_decay: str = flag("none", "none (constant, as the paper) | cosine (to 0 at --steps; the tiny VAE)")
    lora_rank: int = flag(64, "distill: rank of the student's LoRA (App. B)")
    time_scale: float = flag(1.0, "c_noise(t) = time_scale * t of the student (§4.4: 1) or a tiny scratch teacher")
    time_cutoff: float = flag(0.0, "distill: drop the student's time features above this many rad per unit t (0: none)")
    ratio: float = flag(0.5, "share of rows with s != t (Table 4)")
    warmup: int = flag(0, "distill: first steps at ratio 0 (s = t: the time embedding fitted to v first)")
    anchor: float = flag(0.0, "distill: share of rows fitted at (t, s) = (0, 1) to the teacher's 40-step sample")
    time_pairs: str = flag("uniform", "distill: how s != t pairs are drawn (mfsr.sample_times; uniform: the paper's)")
    gap_ramp: int = flag(0, "distill: s - t at most (steps after --warmup) / gap_ramp, short to long (0: no cap)")
    target: str = flag("neg", "teacher velocity: gt | meanflow | null | neg (Table 3)")
    cfg_w: float = flag(6.0, "w of Eq. 9 / 10 / 11 (a sampler's standard CFG scale is w + 1: mfsr.eq11_w)")
    time_shift: float = flag(mfsr.SD35_SHIFT, "teacher stage: SD3's shift of the logit-normal sigma (1: none)")
    kappa: float = flag(0.0, "kappa of MeanFlow's CFG (Eq. 9, --target meanflow; MeanFlow: w 1, kappa 0.83)")
    cond_drop: float = flag(0.0, "distill: share of rows trained on the null prompt, unguided (MeanFlow: 0.1)")
    loss: str = flag("pseudo_huber", "pseudo_huber | l2 | adaptive")
    mode: str = flag("split", "JVP execution: split | fused")
    caption_dropout: float = flag(0.2, "teacher stage")
    grad_clip: float = flag(1.0, "clip the gradient's global norm to this")
    accum: int = flag(1, "gradient accumulation steps")
    ema: float = flag(0.0, "EMA decay of trainable weights (0 = off)")
    dtype: str = flag("auto", "autocast dtype, frozen weights stored in it (auto: bf16 on a GPU, fp32 on the CPU)")
    compile: bool = flag(False, "torch.compile the trained network and its JVP")
    grad_ckpt: bool = flag(False, "gradient checkpointing per block (less memory, ~1.3x time)")
    workers: int = flag(-1, "data-loading processes per process; -1: this process's share of the CPUs, at most 8")
    seed: int = flag(0, "every draw (data, degradation, noise, times) follows from it")
    log_every: int = flag(10, "print a line every this many steps (log.jsonl has every step)")
    diagnose_every: int = flag(100, "distill: log du/dt's terms (mfsr.dudt_terms) every this many steps; 0 never")
    profile_phases: bool = flag(False, "time each phase of a step (a GPU synchronised after each: slower)")
    sample_every: int = flag(500, "write a progress grid PNG every this many steps")
    save_every: int = flag(1000, "write a checkpoint every this many steps")
    keep: int = flag(3, "checkpoints kept")
    export_every_save: bool = flag(False, "student.safetensors (for sample.py) in every checkpoint, not only the last")
    max_bad: int = flag(5, "stop after this many non-finite losses in a row")
    resume: bool = flag(False, "continue from the newest readable checkpoint in --out")


# --------------------------------------------------------------------------------------------
# Data: HR images -> (gt, lr) pairs made in worker processes (paper §5.1): a random HR crop,
# degraded by degrade.py to LR at 1/4, or with probability clean_prob the plain bicubic x4.


def data_workers(cfg):
    """--workers, or by default this process's share of the machine's CPUs, at most 8: one worker
    degrades 4-8 pairs/s at 512^2, so a batch of 10 takes a worker one to two seconds."""
    if cfg.workers >= 0:
        return cfg.workers
    return max(1, min(8, (os.cpu_count() or 2) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))


def training_batches(cfg, paths, prompt, vae, device, rank, start):
    """The batches of the steps from `start` on: pairs made by worker processes, or latent cache rows."""
    data = PairDataset(paths, cfg.size, prompt, degrade.DegradeConfig(usm_gt=not cfg.plain_gt), cfg.clean_prob)
    loader = lambda keys: torch.utils.data.DataLoader(data, batch_sampler=keys, collate_fn=collate,  # noqa: E731
                                                      num_workers=data_workers(cfg))
    if cfg.cache_latents:   # the miniature's: cache_latents pairs encoded once, each step draws rows of them
        key = json.dumps({k: getattr(cfg, k) for k in ("cache_latents", "size", "seed", "data", "vae", "ckpt",
                                                       "prompt_emb", "null_emb", "clean_prob", "plain_gt")})
        steps = math.ceil(cfg.cache_latents / cfg.batch)
        keys = runs.step_batches(len(data), cfg.batch, runs.mix(cfg.seed, 1), rank, 0, steps)
        encode = lambda k, b: encode_pair(vae, {n: b[n].to(device) for n in ("gt", "lr")},  # noqa: E731
                                          torch.Generator().manual_seed(runs.mix(cfg.seed, k, rank, 11)))
        cache = runs.latent_cache(os.path.join(cfg.out, f"latents-{rank}.safetensors"), key, loader(keys), encode,
                                  cfg.cache_latents, device, say=print if rank == 0 else lambda m: None)
        return runs.cached_batches(cache, cfg, rank, start)
    return loader(runs.step_batches(len(paths), cfg.batch * cfg.accum, cfg.seed, rank, start, cfg.steps))


# --------------------------------------------------------------------------------------------
# Models


def store_in(net, dtype):
    """Frozen weights in the training dtype (autocast computes in it anyway), trained ones and buffers in
    fp32 (Adam's updates are smaller than a bf16 step). dtype None (an fp32 run): net as it is."""
    if dtype is None:
        return net
    for p in net.parameters():
        p.data = p.data.to(torch.float32 if p.requires_grad else dtype)
    for b in net.buffers():
        b.data = b.data.float()
    return net


def build_models(cfg, device, dtype=None):
    """(trained net, frozen teacher or None, frozen vae); dtype: the frozen weights' (store_in)."""
    tiny = cfg.preset == "tiny"
    if cfg.vae or cfg.ckpt:
        vae = load_vae(cfg.vae or cfg.ckpt)
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
            net = load_transformer(cfg.teacher, lr_key_mode=cfg.teacher_mode, dtype=dtype or torch.float32)
        elif cfg.ckpt:
            net = model.add_lr_stream(load_transformer(cfg.ckpt, dtype=dtype or torch.float32))
        else:              # from scratch; a tiny one with the size scan's depth / heads / prediction if given
            torch.manual_seed(cfg.seed)
            t = model.CONFIGS["tiny"]
            net = model.MMDiT(replace(t, depth=cfg.depth or t.depth, heads=cfg.heads or t.heads,
                                      prediction=cfg.prediction, time_scale=cfg.time_scale)
                              if tiny else model.CONFIGS["dit4sr"])
        dead = set(model.dead_lr_params(net))
        for name, p in net.named_parameters():      # DiT4SR trains only the control layers
            p.requires_grad_(name not in dead and ("control" in name or (tiny and not cfg.ckpt)))
        return store_in(net.to(device), dtype), None, vae
    if cfg.teacher:     # read in the training dtype: a full-size fp32 copy is never held
        teacher = load_transformer(cfg.teacher, lr_key_mode=cfg.teacher_mode, dtype=dtype or torch.float32)
    elif tiny:
        torch.manual_seed(cfg.seed)
        teacher = model.MMDiT(model.CONFIGS["tiny"])
        print("warning: no --teacher: distilling a random tiny teacher (a smoke run, not a model)")
    else:
        raise SystemExit("error: --stage distill needs --teacher (a DiT4SR or teacher-stage checkpoint)")
    if not teacher.cfg.lr_stream or teacher.cfg.two_times:
        raise SystemExit(f"error: --teacher {cfg.teacher}: needs a one-time model with the LR stream")
    # in the training dtype before make_student, which shares the teacher's frozen weights with the student
    teacher = store_in(teacher.to(device).eval().requires_grad_(False), dtype)
    student = model.make_student(teacher, lora_rank=cfg.lora_rank, time_scale=cfg.time_scale,
                                 time_cutoff=cfg.time_cutoff)
    return store_in(student, dtype), teacher, vae


def conditioning(cfg, mcfg):
    """Null, negative and default prompts (Conds without z_lr): zeros for the null, the null for the
    others when their files are not given."""
    null = load_embedding(cfg.null_emb, zero_prompt(mcfg))
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


def teacher_loss(net, batch, cfg, g):
    """DiT4SR's rectified flow: logit-normal t with SD3's shift (cfg.time_shift), x0-MSE (= sigma^2-
    weighted velocity). batch: z_hr, z_lr, context, pooled, null and neg (prompts). A share
    caption_dropout of the rows gets the null prompt; with neg_prob > 0 another share gets the negative
    prompt ("blurry, low-res") and the LR latent as target, so CFG has something to push away from."""
    z_hr, z_lr = batch["z_hr"], batch["z_lr"]
    B = z_hr.shape[0]
    r = torch.rand(B, generator=g).to(z_hr.device)    # drawn on the generator's device (the CPU), used on z's
    c = _with_prompt(mfsr.Cond(z_lr, batch["pooled"], batch["context"]), batch["null"], r < cfg.caption_dropout)
    target = z_hr
    if cfg.neg_prob > 0:
        to_neg = (r >= cfg.caption_dropout) & (r < cfg.caption_dropout + cfg.neg_prob)
        c = _with_prompt(c, batch["neg"], to_neg)
        target = torch.where(to_neg[:, None, None, None], z_lr, z_hr)
    u = torch.sigmoid(torch.randn(B, generator=g))
    a = cfg.time_shift
    sigma = (a * u / (1 + (a - 1) * u)).to(z_hr)                      # SD3's shifted sigma
    eps = torch.randn(z_hr.shape, generator=g).to(z_hr)
    x = (1 - sigma.view(-1, 1, 1, 1)) * target + sigma.view(-1, 1, 1, 1) * eps
    x0 = mfsr.denoised(net)(x, 1 - sigma, c)
    return (x0.float() - target.float()).pow(2).mean()


def _with_prompt(c, emb, rows):
    """The Cond c (pooled (B, P), context (B, L, D)) with the rows `rows` given the prompt emb
    (pooled (P,), context (l, D)); the shorter context is zero-padded (zero rows are padding)."""
    L = max(c.context.shape[1], emb.context.shape[0])
    pad = lambda x: F.pad(x, (0, 0, 0, L - x.shape[-2]))                       # noqa: E731
    context = torch.where(rows[:, None, None], pad(emb.context)[None].to(c.context), pad(c.context))
    return mfsr.Cond(c.z_lr, torch.where(rows[:, None], emb.pooled[None].to(c.pooled), c.pooled), context)


def distill_loss(student, teacher, batch, cfg, g, step=0, jvp=None):
    """MFSR Alg. 1, one step's loss. batch as teacher_loss's. student: the module or its compiled
    wrapper (the JVP runs on the module through `jvp`: mfsr.jvp, or main's compiled fastjvp.func_jvp).
    Returns (loss, or None for a step to skip, info): jvp_term, anchor_loss, du/dt's terms (mfsr.dudt_terms).

    Beyond Alg. 1, each off by default: the first cfg.warmup steps have every row at s = t (no JVP);
    a share cfg.cond_drop of the rows gets the null prompt and the unguided velocity (MeanFlow's
    condition dropout: it trains u(. | null), which Eq. 9's target calls); the last cfg.anchor share
    of the rows is trained by anchor_loss instead."""
    raw = getattr(student, "_orig_mod", student)
    z_hr, z_lr, pooled, context = batch["z_hr"], batch["z_lr"], batch["pooled"], batch["context"]
    L = max(context.shape[1], batch["null"].context.shape[0], batch["neg"].context.shape[0])  # CFG batches them: one length
    context = F.pad(context, (0, 0, 0, L - context.shape[1]))
    B = z_hr.shape[0]
    n = min(B - 1, round(cfg.anchor * B)) if step >= cfg.warmup else 0              # anchor rows, the last n
    B = B - n
    ratio = 0.0 if step < cfg.warmup else cfg.ratio
    gap = min(1.0, (step - cfg.warmup + 1) / cfg.gap_ramp) if cfg.gap_ramp else 1.0
    t, s = (x.to(z_hr) for x in mfsr.sample_times(B, ratio, g, pairs=cfg.time_pairs, max_gap=gap))  # Alg. 1 l. 4
    eps = torch.randn(z_hr[:B].shape, generator=g).to(z_hr)
    z_t = t.view(-1, 1, 1, 1) * z_hr[:B] + (1 - t.view(-1, 1, 1, 1)) * eps                         # l. 5
    drop = torch.zeros(B, dtype=torch.bool, device=z_hr.device)
    if cfg.cond_drop > 0:
        drop = (torch.rand(B, generator=g) < cfg.cond_drop).to(z_hr.device)
    c = _with_prompt(mfsr.Cond(z_lr[:B], pooled[:B], context[:B]), batch["null"], drop)
    c_neg = _with_prompt(c, batch["neg"], ~drop)   # dropped rows keep the null: Eq. 10 / 11 reduce to v(z | null)
    c_null = _with_prompt(c, batch["null"], torch.ones_like(drop))
    v = mfsr.teacher_velocity(cfg.target, z_t, t, z_hr=z_hr[:B], eps=eps, teacher=mfsr.velocity(teacher),
                              student_u=mfsr.average_velocity(raw), cond=c, cond_neg=c_neg, cond_null=c_null,
                              w=cfg.cfg_w, kappa=cfg.kappa).float()                 # l. 6, Eq. 11; fp32 tangent
    if cfg.target == "meanflow" and drop.any():    # Eq. 9 guides conditioned rows; dropped ones learn v itself
        v = torch.where(drop.view(-1, 1, 1, 1), (z_hr[:B] - eps).float(), v)
    with fastjvp.detached_tangents():   # the target's du/dt is detached: its tangent rules need no backward
        res = mfsr.mfd_loss(mfsr.average_velocity(student), z_t, t, s, v, cond=c, mode=cfg.mode, loss=cfg.loss,
                            u_fn_jvp=mfsr.average_velocity(raw), scale=mfsr.error_scale(raw, t), jvp_fn=jvp)  # l. 7-9
    info = {"jvp_term": res["jvp_term"]}
    if cfg.diagnose_every and ((step + 1) % cfg.diagnose_every == 0 or step + 1 == cfg.steps):
        info.update(mfsr.dudt_terms(mfsr.average_velocity(raw), z_t, t, s, v, cond=c))
    if not n or res["loss"] is None:
        return res["loss"], info
    c_anchor = mfsr.Cond(z_lr[B:], pooled[B:], context[B:])
    all_rows = torch.ones(n, dtype=torch.bool, device=z_lr.device)
    anchor = anchor_loss(student, teacher, c_anchor, _with_prompt(c_anchor, batch["neg"], all_rows), cfg, g)
    info["anchor_loss"] = anchor.item()
    return (res["loss"] * B + anchor * n) / (B + n), info


def anchor_loss(student, teacher, c, c_neg, cfg, g):
    """Beyond the paper (--anchor): the one-step jump u(z_0, 0, 1) regressed on the teacher's 40-step
    sample from the same noise, z_1 - z_0 (CFG scale cfg_w + 1), by the MFD distance: Eq. 12 reaches
    the flow map only through its derivatives, this pins the one-step corner. c_neg: the negative's."""
    z_lr = c.z_lr
    z0 = torch.randn(z_lr.shape, generator=g).to(z_lr)
    with torch.no_grad():
        shift = (getattr(teacher, "sampling", None) or {}).get("shift", mfsr.SD35_SHIFT)   # its training's
        z1 = mfsr.sample_teacher(teacher, c, c_neg, steps=40, cfg=cfg.cfg_w + 1, shift=shift, noise=z0)
    t = torch.zeros(z_lr.shape[0], device=z_lr.device, dtype=z_lr.dtype)
    u = mfsr.average_velocity(student)(z0, t, t + 1, c)
    return mfsr.LOSSES[cfg.loss](u.float(), (z1 - z0).float())[0]


# --------------------------------------------------------------------------------------------
# The command line: every TrainConfig field is a flag, with flag()'s help text


CHOICES = dict(stage=("distill", "teacher"), preset=("full", "tiny"), target=("gt", "meanflow", "null", "neg"),
               loss=tuple(mfsr.LOSSES), mode=("split", "fused"), dtype=("auto", "bf16", "fp16", "fp32"),
               teacher_mode=("v1", "r1"), lr_decay=("none", "cosine"), prediction=("v", "x"),
               time_pairs=mfsr.TIME_PAIRS)
FLAG_GROUPS = {   # --help's sections, each flag in one
    "data": ("data", "size", "null_emb", "neg_emb", "prompt_emb"),
    "model": ("preset", "ckpt", "teacher", "teacher_mode", "vae", "untrained_vae", "lora_rank", "time_scale",
              "time_cutoff"),
    "stage": ("stage", "target", "cfg_w", "kappa", "cond_drop", "ratio", "warmup", "time_pairs", "gap_ramp", "anchor",
              "loss", "time_shift", "caption_dropout"),
    "optimisation": ("batch", "accum", "steps", "lr", "lr_decay", "grad_clip", "ema", "seed", "max_bad"),
    "checkpoints and logs": ("out", "resume", "save_every", "keep", "export_every_save", "log_every",
                             "diagnose_every", "sample_every"),
    "distributed and speed (torchrun runs one process per GPU; every flag is per process)":
        ("dtype", "compile", "grad_ckpt", "mode", "workers", "profile_phases"),
    "miniature and extensions (experiments/ sets them; the paper's run leaves them at their defaults)":
        ("cache_latents", "clean_prob", "plain_gt", "neg_prob", "depth", "heads", "prediction"),
}


def parse_args(argv=None):
    """The TrainConfig of the command line `argv` (default: sys.argv[1:]), checked."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False,
                                epilog="Every flag is a field of train.TrainConfig; the resolved config is "
                                       "printed and stored in every checkpoint.")
    add_flags(p, TrainConfig, FLAG_GROUPS, CHOICES)
    args = p.parse_args(argv)
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    for name, allowed in CHOICES.items():
        if getattr(cfg, name) not in allowed:
            p.error(f"--{name.replace('_', '-')} {getattr(cfg, name)!r}: choose from {', '.join(allowed)}")
    if not cfg.data:
        p.error("--data is required (a folder of HR images)")
    if cfg.mode == "fused" and cfg.grad_ckpt and not cfg.compile:
        p.error("--mode fused with --grad-ckpt: eagerly, the fused JVP's forward cannot be recomputed in backward "
                "(its tangents are gone by then); use --mode split (the default) or add --compile")
    if cfg.dtype == "fp16":
        p.error("--dtype fp16: fp16 gradients need loss scaling, which train.py does not do; use bf16")
    if cfg.size == 0:
        cfg.size = 64 if cfg.preset == "tiny" else 512
    if not 0 <= cfg.anchor < 1:
        p.error(f"--anchor {cfg.anchor}: a share of the batch, in [0, 1)")
    if cfg.workers < -1:
        p.error(f"--workers {cfg.workers}: a count, or -1 for this process's share of the CPUs")
    if cfg.gap_ramp < 0 or cfg.time_cutoff < 0 or cfg.diagnose_every < 0:
        p.error(f"--gap-ramp {cfg.gap_ramp}, --time-cutoff {cfg.time_cutoff}, --diagnose-every {cfg.diagnose_every}: "
                "must be >= 0")
    if not cfg.time_shift > 0:
        p.error(f"--time-shift {cfg.time_shift}: must be > 0 (SD3's sigma shift; 1 is none)")
    if (cfg.depth or cfg.heads or cfg.prediction != "v") and not (cfg.preset == "tiny" and cfg.stage == "teacher"
                                                                 and not cfg.teacher):
        p.error("--depth / --heads / --prediction shape a tiny teacher trained from scratch (--preset tiny --stage "
                "teacher, no --teacher); other models take theirs from their checkpoint")
    if cfg.depth < 0 or cfg.heads < 0:
        p.error(f"--depth {cfg.depth}, --heads {cfg.heads}: must be >= 0 (0: the tiny config's)")
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


def update(cfg, net, opt, ema, trainable, sync, step, clock):
    """After backward: the gradients averaged over ranks and clipped, Adam at the step's learning rate,
    the EMA. Returns the gradient norm."""
    if sync is not None:
        with clock("all-reduce"):
            runs.all_reduce_grads(sync)
    with clock("optimizer"):
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


def main(argv=None):
    """The run of the command line `argv`: models, optimizer and data, then per step a batch, the
    stage's loss over --accum micro-batches, the update, the log, progress grids and checkpoints."""
    cfg = parse_args(argv)
    ddp = "RANK" in os.environ     # under torchrun: one process per GPU
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":      # before NCCL starts: else every rank's communicator and caches sit on GPU 0
        torch.cuda.set_device(device)
    if ddp:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    if rank == 0:
        os.makedirs(cfg.out, exist_ok=True)
        print("config:", json.dumps(asdict(cfg)))
    paths, skipped = training_images(cfg, rank)
    name = cfg.dtype if cfg.dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    dtype = {"bf16": torch.bfloat16, "fp32": None}[name]     # autocast's (None: fp32, no autocast)
    net, teacher, vae = build_models(cfg, device, dtype)
    fastjvp.accelerate(net)   # model.py's plain blocks get the fast kernels and JVP rules: the same numbers
    if teacher is not None:
        fastjvp.accelerate(teacher)
    net.grad_checkpointing = cfg.grad_ckpt
    null, neg, prompt = conditioning(cfg, net.cfg)
    trainable = [p for p in net.parameters() if p.requires_grad]
    sync = trainable if ddp else None   # the parameters whose gradients are averaged
    if rank == 0:
        print(f"{len(paths)} images; model {net.cfg}; trainable parameters "
              f"{sum(p.numel() for p in trainable):,}; {world} process(es)")
    opt = (torch.optim.Adam(trainable, lr=cfg.lr) if cfg.stage != "teacher"
           else torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=1e-2))
    start, ema = runs.load_checkpoint(cfg, net, opt, rank, world) if cfg.resume else (0, None)
    if rank == 0 and cfg.resume:
        runs.trim_log(os.path.join(cfg.out, "log.jsonl"), start)
    if cfg.ema and ema is None:
        ema = {n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad}
    # static shapes: the JVP's rows (s != t) and the full batch are two fixed sizes, each compiled
    # once; automatic dynamic shapes made inductor (torch 2.13, CPU) fail on a symbolic size
    run = torch.compile(net, dynamic=False) if cfg.compile else net
    # the JVP too, forward and (fused mode) backward: fastjvp.func_jvp is the form dynamo traces
    jvp = torch.compile(fastjvp.func_jvp, dynamic=False) if cfg.compile else mfsr.jvp
    clock = runs.PhaseClock(cfg.profile_phases, device)
    if not cfg.compile:   # hooks on the networks: the loss functions stay as they are (a compiled graph: one phase)
        clock.time_calls(net, runs.student_phase if cfg.stage == "distill" else lambda _: "teacher forward")
        if teacher is not None:
            clock.time_calls(teacher, lambda _: "teacher (CFG)")
    batches = clock.timed_iter("data", training_batches(cfg, paths, prompt, vae, device, rank, start))
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
    log = open(os.path.join(cfg.out, "log.jsonl"), "a") if rank == 0 else None
    bad, t0, unreadable = 0, time.time(), []
    for step, batch in zip(range(start, cfg.steps), batches):
        g = torch.Generator().manual_seed(runs.mix(cfg.seed, step, rank, 7))
        for path, why in batch.get("unreadable", []):        # a file whose header read but data did not
            if rank == 0 and path not in unreadable:
                print(f"warning: skipping unreadable image {path}: {why}", file=sys.stderr, flush=True)
            unreadable.append(path)
        if runs.any_rank(sync, "gt" not in batch and "z_hr" not in batch):
            print(f"warning: step {step + 1}: no readable image in the batch, skipped")
            continue
        opt.zero_grad(set_to_none=True)     # before the encode: the last step's gradients are not held through it
        with clock("VAE encode"):
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            z_hr, z_lr = (batch["z_hr"], batch["z_lr"]) if "z_hr" in batch else encode_pair(vae, batch, g)  # cached?
        loss_sum, extra = 0.0, {}
        for a in range(cfg.accum):
            rows = slice(a * cfg.batch, (a + 1) * cfg.batch)
            mb = dict(z_hr=z_hr[rows], z_lr=z_lr[rows], context=batch["context"][rows],
                      pooled=batch["pooled"][rows], null=null, neg=neg)
            with autocast, fastjvp.lean_memory(), clock("loss (compiled)" if cfg.compile else None):  # lower peaks
                if cfg.stage == "teacher":
                    loss, info = teacher_loss(run, mb, cfg, g), {}
                else:
                    loss, info = distill_loss(run, teacher, mb, cfg, g, step, jvp)
            if info:   # distill: the first micro-batch's diagnostics, the largest jvp_term of them all
                extra = {**info, **extra, "jvp_term": max(extra.get("jvp_term", 0.0), info["jvp_term"])}
            if runs.any_rank(sync, loss is None or not torch.isfinite(loss)):   # ranks skip together
                loss_sum = None
                break
            with clock("backward"):
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
        gnorm = update(cfg, net, opt, ema, trainable, sync, step, clock)
        done = step + 1
        if rank == 0:
            runs.log_step(cfg, log, done, start, t0, loss_sum, gnorm, opt.param_groups[0]["lr"], device, extra)
            if done % cfg.sample_every == 0 or done == cfg.steps:
                with autocast, clock("progress grid"):     # the frozen weights are in the training dtype
                    runs.save_grid(os.path.join(cfg.out, f"grid-{done:07d}.png"), vae, net.eval(), cfg.stage, batch,
                                   z_lr)
                net.train()
        if done % cfg.save_every == 0 or done == cfg.steps:
            with clock("save"):
                runs.save_checkpoint(cfg, net, opt, ema, done, rank, (null, neg, prompt), vae, world,
                                     export=cfg.export_every_save or done == cfg.steps)
        clock.step()
    if skipped and rank == 0:
        print(f"warning: {len(skipped)} of {len(paths) + len(skipped)} images were left out before training "
              f"(unreadable or smaller than the crop; named above)")
    if unreadable and rank == 0:
        names = sorted(set(unreadable))
        print(f"warning: {len(unreadable)} draws of {len(names)} unreadable image(s) were skipped: "
              f"{', '.join(names[:5])}{' ...' if len(names) > 5 else ''}")
    if cfg.profile_phases and rank == 0:
        rec = clock.write(os.path.join(cfg.out, "phases.json"), peak_memory_mb(device))
        print(f"seconds per phase of the last step: {json.dumps(rec['steps'][-1] if rec['steps'] else {})}; "
              f"peak {rec['peak_mb']:.0f} MB")
    if ddp:
        dist.barrier()      # no rank tears gloo / NCCL down while another still talks (gloo aborts then)
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except CheckpointError as e:
        raise SystemExit(f"error: {e}")
