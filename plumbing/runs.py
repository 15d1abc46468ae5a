"""A training run's plumbing (train.py's; the method does not need it): seeds per (seed, step, rank), so a
resume repeats the run exactly; the latent cache; gradients over processes; checkpoints, log, grids.
"""
import contextlib
import glob
import json
import math
import os
import shutil
import time
from dataclasses import asdict

import torch
import torch.distributed as dist
import numpy as np
import torch.nn.functional as F
from PIL import Image

import mfsr
import model
from plumbing.checkpoints import (CheckpointError, Later, SafetensorsFiles, atomic_open, atomic_save, save_transformer,
                                  save_vae)
from plumbing.cli import peak_memory_mb
from plumbing import tiling
import fastjvp

# --------------------------------------------------------------------------------------------
# Seeds, and the latent cache (the miniature's cache_latents): a fixed set of pairs encoded once


def mix(*xs):
    """One 62-bit seed from several integers (seed, step, rank, purpose)."""
    h = 0
    for x in xs:
        h = (h * 1_000_003 + int(x) + 1) % (2 ** 62)
    return h


def step_batches(n, batch, seed, rank, start, stop):
    """For each step k in [start, stop): `batch` (index, seed) keys of n items, seeded by (seed, k, rank)."""
    for k in range(start, stop):
        g = torch.Generator().manual_seed(mix(seed, k, rank))
        idx = torch.randint(n, (batch,), generator=g).tolist()
        seeds = torch.randint(2 ** 62, (batch,), generator=g).tolist()
        yield list(zip(idx, seeds))


def latent_cache(path, key, batches, encode, n, device, say=print):
    """n pairs of `batches` encoded once by encode(k, batch) -> (z_hr, z_lr) for every step (fixed
    degradations, faster where the VAE dominates), kept in `path` under `key` (the settings that made it)."""
    if os.path.exists(path):
        f = SafetensorsFiles(path)
        if f.metadata.get("key") == key:
            return {k: f.get(k).to(device) for k in f.keys()}
        say(f"warning: {path} was made with other settings; encoding again")
    parts, t0 = [], time.time()
    for k, batch in enumerate(batches):
        if "gt" not in batch:
            continue
        z_hr, z_lr = encode(k, batch)
        parts.append(dict(z_hr=z_hr.cpu(), z_lr=z_lr.cpu(), context=batch["context"], pooled=batch["pooled"]))
        if (k + 1) % 20 == 0:
            say(f"cache: {sum(len(q['z_hr']) for q in parts)}/{n} pairs encoded ({time.time() - t0:.0f} s)")
    L = max(q["context"].shape[1] for q in parts)
    pad = lambda c: F.pad(c, (0, 0, 0, L - c.shape[1]))                        # noqa: E731 zero context tokens
    cache = {k: torch.cat([pad(q[k]) if k == "context" else q[k] for q in parts])[:n].contiguous()
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
# Many processes: gradients averaged by hand after backward (as py-meanflow), no DDP wrapper: the JVP
# runs on the raw module, the fused mode trains the primal output of that JVP, and the anchor rows
# run a second forward before the one backward (docs/benchmarks.md, "Gradients over processes").

BUCKET_ELEMENTS = 2 ** 25   # per collective (128 MB in fp32): a few launches for ~700 tensors, a bounded copy


def buckets(tensors):
    """The tensors in runs of about BUCKET_ELEMENTS (one dtype and device each), in order."""
    out = []
    for t in tensors:
        if (not out or out[-1][0].dtype != t.dtype or out[-1][0].device != t.device
                or sum(x.numel() for x in out[-1]) + t.numel() > BUCKET_ELEMENTS):
            out.append([])
        out[-1].append(t)
    return out


def all_reduce_grads(params):
    """Average the gradients of `params` over all ranks (missing: zeros): flat buckets, all launched, then waited."""
    world = dist.get_world_size()
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    groups = buckets([p.grad for p in params])
    flats = [torch.cat([g.reshape(-1) for g in group]) for group in groups]
    works = [dist.all_reduce(flat, async_op=True) for flat in flats]
    for group, flat, work in zip(groups, flats, works):
        work.wait()
        flat /= world
        for g, part in zip(group, flat.split([g.numel() for g in group])):
            g.copy_(part.view_as(g))


def any_rank(params, flag):
    """True on every rank if `flag` is on any (all skip a step together); params None: one process."""
    if params is None:
        return flag
    t = torch.tensor([float(flag)], device=params[0].device)
    dist.all_reduce(t)
    return bool(t.item() > 0)


# --------------------------------------------------------------------------------------------
# Where a step's time goes (train.py --profile-phases; tools/rehearse.py prints it)


class PhaseClock:
    """Seconds per phase of the training steps; a phase inside another counts as the outer one. On a GPU each
    phase is fenced by synchronizes (the kernels' time), which stall the queue: off without --profile-phases."""

    def __init__(self, enabled, device):
        self.enabled, self.open = enabled, []   # the phases under way, outermost first: (name, t0) or None
        self.seconds, self.steps = {}, []      # the step under way; the finished steps' (step(), write())
        self._sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    def start(self, name):
        """Time until the matching stop() as `name`; None, or a phase inside a timed one, is not timed."""
        timed = self.enabled and name is not None and not any(self.open)
        if timed:
            self._sync()
        self.open.append((name, time.perf_counter()) if timed else None)

    def stop(self):
        phase = self.open.pop()
        if phase:
            self._sync()
            self.seconds[phase[0]] = self.seconds.get(phase[0], 0.0) + time.perf_counter() - phase[1]

    @contextlib.contextmanager
    def __call__(self, name):
        self.start(name)
        try:
            yield
        finally:
            self.stop()

    def timed_iter(self, name, items):
        """The items of `items`, the wait for each timed as `name`."""
        items = iter(items)
        while True:
            with self(name):
                item = next(items, StopIteration)
            if item is StopIteration:
                return
            yield item

    def step(self):
        if self.enabled:
            self.steps.append(self.seconds)
            self.seconds = {}

    def write(self, path, peak_mb):
        """Each step's seconds per phase and the peak memory, as JSON (tools/rehearse.py reads it)."""
        rec = {"peak_mb": peak_mb, "steps": self.steps}
        with atomic_open(path, "w") as f:
            json.dump(rec, f, indent=1)
        return rec

    def time_calls(self, module, name):
        """Time every call of `module` as the phase name(inputs) (None: not timed), by forward hooks."""
        if self.enabled:
            module.register_forward_pre_hook(lambda _, args: self.start(name(args)))
            module.register_forward_hook(lambda *_: self.stop(), always_call=True)


def student_phase(args):
    """PhaseClock name of a student call: the JVP when its input carries a tangent, else the forward."""
    return "JVP" if fastjvp.has_tangent(args[0]) else "student forward"


# --------------------------------------------------------------------------------------------
# Checkpoints (trainable weights, optimizer state, a full export for sample.py), the log, progress grids


def optimizer_tensors(opt, prefix=""):
    """opt.state_dict() as safetensors holds it: {prefix + "index.name": tensor}, the param groups as JSON."""
    state = opt.state_dict()
    tensors = {f"{prefix}{i}.{k}": v.detach().cpu().reshape(-1) if v.ndim == 0 else v.detach().cpu()
               for i, st in state["state"].items() for k, v in st.items()}
    return tensors, json.dumps(state["param_groups"])


def load_optimizer(opt, tensors, groups, prefix=""):
    """Restore `opt` from optimizer_tensors' entries under `prefix` and the parsed param groups."""
    state = {}
    for k, v in tensors.items():
        if k.startswith(prefix):
            i, name = k[len(prefix):].split(".", 1)
            state.setdefault(int(i), {})[name] = v.reshape(()) if name == "step" else v
    opt.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(cfg, net, opt, ema, step, rank, embs, vae, world=1, export=False):
    """out/ckpt-{step}/, whole or not at all: trainable weights (+ EMA), optimizer state, prompts, a VAE that
    came from no file; with `export` sample.py's file (10 GB in fp32 at full scale: written last or on ask)."""
    if rank != 0:
        return
    final = os.path.join(cfg.out, f"ckpt-{step:07d}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    meta = {"train_config": json.dumps(asdict(cfg)), "model_config": json.dumps(asdict(net.cfg)),
            "lora": json.dumps(getattr(net, "lora", None)), "step": str(step), "world": str(world)}
    train = {n: p.detach().cpu().contiguous() for n, p in net.named_parameters() if p.requires_grad}
    train.update({"ema." + n: v.cpu() for n, v in (ema or {}).items()})
    atomic_save(train, os.path.join(tmp, "trainable.safetensors"), meta)
    tensors, groups = optimizer_tensors(opt)
    atomic_save(tensors, os.path.join(tmp, "optimizer.safetensors"), {"param_groups": groups, "step": str(step)})
    latent = cfg.size // vae.cfg.factor
    sampling = {"tile": latent, "tile_overlap": sample_overlap(latent, net.cfg.patch),
                **({"shift": cfg.time_shift} if cfg.stage == "teacher" else {})}   # its sampler's grid
    if export:
        save_full(net, os.path.join(tmp, f"{'teacher' if cfg.stage == 'teacher' else 'student'}.safetensors"),
                  sampling, ema)
    if not (cfg.vae or cfg.ckpt):
        save_vae(vae, os.path.join(tmp, "vae.safetensors"))
    for name, e in zip(("null", "neg", "prompt"), embs):
        atomic_save({"context": e.context.contiguous(), "pooled": e.pooled.contiguous()},
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
    """The whole model for sample.py, LoRA and EMA merged, in fp32 (bf16 would round a merged LoRA update away)."""
    with torch.device("meta"):
        full = model.MMDiT(net.cfg)           # the merged model's keys and shapes, no memory
    full.sampling = sampling
    have = {n: (ema or {}).get(n, v) for n, v in net.state_dict().items()}
    loras = {n: m for n, m in net.named_modules() if isinstance(m, model.LoRALinear)}

    def merged(key):
        w = have[key].detach().to("cpu", torch.float32, copy=True)
        layer = loras.get(key.removesuffix(".weight")) if key.endswith(".weight") else None
        if layer is not None:     # W + (alpha / rank) up down, as LoRALinear.merged
            up, down = (have[f"{key[:-7]}.lora_{s}.weight"].detach().to("cpu", torch.float32) for s in ("up", "down"))
            w.addmm_(up, down, alpha=layer.scale)
        return w
    sd = {k: Later(v.shape, torch.float32, lambda k=k: merged(k)) for k, v in full.state_dict().items()}
    save_transformer(full, path, sd=sd)


def load_checkpoint(cfg, net, opt, rank=0, world=1):
    """The newest readable ckpt-* in --out into `net` and `opt`: (step, ema). An unreadable one (a crash, a
    full disk) is moved aside to NAME.broken, never deleted, and the one before it used."""
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
        was = int(files[0].metadata.get("world", world))
        if was != world:   # each rank's data and noise streams are seeded by its rank, the batch is per rank
            raise SystemExit(f"error: --resume: {folder} was written by a run of {was} process(es), this one has "
                             f"{world}: the global batch and the data stream would change; resume with {was}")
        params = dict(net.named_parameters())
        train = {k for k, p in params.items() if p.requires_grad}
        if set(k for k in tensors if not k.startswith("ema.")) != train:
            raise CheckpointError(f"{folder}: its trainable set differs from this run's (other stage or LoRA?)")
        net.load_state_dict({k: tensors[k] for k in train}, strict=False)   # the rest: the frozen weights
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
    keep = []
    with open(path) as f:
        for line in f:
            with contextlib.suppress(ValueError, KeyError, TypeError):   # a line cut by the crash
                if json.loads(line)["step"] <= step:
                    keep.append(line)
    with atomic_open(path, "w") as f:
        f.writelines(keep)


def log_step(cfg, log, done, start, t0, loss, gnorm, lr, device, extra):
    """One line of log.jsonl per step, a printed line every --log-every steps."""
    peak = peak_memory_mb(device)   # NaN where the system does not report it
    rec = {"step": done, "loss": loss, "grad_norm": float(gnorm), "lr": lr,
           "peak_mb": None if math.isnan(peak) else round(peak), **extra}
    print(json.dumps(rec), file=log, flush=True)
    if done % cfg.log_every == 0 or done == cfg.steps:
        rate = (done - start) / (time.time() - t0)
        print(f"step {done}/{cfg.steps}  loss {loss:.4f}  grad {float(gnorm):.3f}  "
              f"{rate:.2f} it/s  ETA {(cfg.steps - done) / max(rate, 1e-9) / 60:.1f} min  "
              f"peak {rec['peak_mb']} MB" + (f"  du/dt: time {extra['dudt_time']:.3g} (secant "
              f"{extra['dudt_secant_time']:.3g}), noise {extra['dudt_noise']:.3g}" if "dudt_time" in extra else ""),
              flush=True)


@torch.no_grad()
def save_grid(path, vae, net, stage, batch, z_lr):
    """Rows of LR (upsampled) | 1 step | 2 steps (distill) or 4 Euler steps (teacher) | HR."""
    image = lambda z: tiling.decode(vae, z).float().add(1).div(2).clamp(0, 1)   # noqa: E731
    if "gt" not in batch:   # cached latents: the HR and (bicubic-upsampled) LR images through the VAE
        batch = dict(batch, gt=image(batch["z_hr"][:4]), lr=image(batch["z_lr"][:4]))
    n = min(4, batch["gt"].shape[0])
    gt = batch["gt"][:n]
    g = torch.Generator().manual_seed(0)
    c = mfsr.Cond(z_lr[:n], batch["pooled"][:n], batch["context"][:n])
    if stage == "distill":
        outs = [mfsr.sample_student(net, c, steps=k, generator=g) for k in (1, 2)]
    else:   # no negative prompt
        outs = [mfsr.sample_teacher(net, c, c, steps=k, cfg=1.0, generator=g) for k in (1, 4)]
    lr_up = F.interpolate(batch["lr"][:n], size=gt.shape[-2:], mode="bicubic")
    cols = [lr_up] + [image(o.to(z_lr)) for o in outs] + [gt]
    rows = torch.cat([torch.cat([c[i].cpu().clamp(0, 1) for c in cols], 2) for i in range(n)], 1)  # (3, nH, kW)
    with atomic_open(path) as f:
        Image.fromarray((rows.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(f, format="PNG")
