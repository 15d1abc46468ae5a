"""The miniature's own VAE: vae.py's "tiny" patch VAE (x4, 16 latent channels), trained from scratch
on the miniature's photographs. At full scale the SD3.5 VAE comes trained with its checkpoint, so
this stage belongs to the miniature, not to train.py.

    from tiny_vae import train_vae
    train_vae("runs/data/train", "runs/vae/final", steps=3000)   # -> runs/vae/final/vae.safetensors

The recipe: the VAE starts as PCA of 4 x 4 pixel patches (init_linear_code), then learns by
squared-error reconstruction from a posterior sample + kl * KL(q(z|x) || N(0, I)), Adam on a half
cosine learning rate, gradient clipping at 1, an EMA of the weights (the exported ones). The latent
means' running mean and variance become the exported shift and scale, so the transformer sees
latents of mean 0 and variance 1 (SD3 measured its 0.0609 / 1.5305 the same way). Crops and noise
follow train.py's (seed, step) scheme: a rerun repeats a run exactly, and an interrupted one resumes
from its last saved state as if it had not stopped.
"""
import copy
import json
import math
import os
import sys
import time
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the core files at the root

import vae as vae_lib
from plumbing.checkpoints import SafetensorsFiles, atomic_save
from plumbing import checkpoints, pairs, runs
from plumbing import images as image_files

PCA_CROPS = 256     # training crops whose patches start the linear code


@torch.no_grad()
def init_linear_code(vae, x, logvar=-8.0):
    """Start a patch VAE (cfg.patch > 1) as principal component analysis of the p x p patches of the
    images x (N, 3, H, W) in [-1, 1]: the linear code keeps the `latent_channels` leading components,
    the posterior log-variance starts at `logvar`, and both conv_out layers are zeroed, so encode ->
    decode is at first exactly the PCA projection; training then learns what the linear code misses.
    (Held-out photographs: 16 of 48 components of 4 x 4 patches reconstruct at about 37 dB.)

    Component i (variance lam_i) is scaled to variance sqrt(lam_i / mean(lam)), which is how much the
    transformer's squared error weighs it. Whitened (every variance 1), the 12 texture components
    (5-16 on the training photographs, 2 % of the pixels' variance) would weigh 12/16, and errors of
    the per-patch mean (weighed 1/16) come out as 4 x 4 blocks of wrong colour. Orthonormal
    (variance lam_i: the error is the pixels' squared error) they would weigh 2 %, at 39x less
    amplitude than the first component's. The square root is halfway: 26 %."""
    p, L = vae.cfg.patch, vae.cfg.latent_channels
    if p == 1:
        raise ValueError("init_linear_code is for VAEs with patch > 1")
    rows = F.pixel_unshuffle(x.double(), p).permute(0, 2, 3, 1).flatten(0, 2)      # (N h w, 3 p p)
    mu = rows.mean(0)
    lam, U = torch.linalg.eigh(torch.cov((rows - mu).T))                          # ascending
    lam, U = lam.flip(0)[:L].clamp_min(1e-10), U.flip(1)[:, :L]                   # (L,), (3 p p, L)
    std = (lam / lam.mean()) ** 0.25                                             # of the latents
    enc, dec = vae.encoder.linear, vae.decoder.linear
    w = U.T * (std / lam.sqrt())[:, None]                                         # (L, 3 p p)
    enc.weight.zero_()
    enc.weight[:L, :, 0, 0] = w.to(enc.weight)
    enc.bias.copy_(torch.cat([-w @ mu, torch.full((L,), logvar, dtype=mu.dtype)]))
    dec.weight[:, :, 0, 0] = (U * (lam.sqrt() / std)).to(dec.weight)
    dec.bias.copy_(mu)
    for conv in (vae.encoder.conv_out, vae.decoder.conv_out):
        conv.weight.zero_()
        conv.bias.zero_()
    return vae


def vae_loss(vae, x, kl_weight, g, stats):
    """Squared-error reconstruction of x (B, 3, H, W) in [-1, 1] from a posterior sample (PSNR is
    what the miniature asks of its VAE) + kl_weight * KL. `stats` keeps a running mean and variance
    (over ~10 batches) of the latent means: the exported shift and scale."""
    mean, logvar = vae.moments(x)
    logvar = logvar.clamp(-30.0, 20.0)
    z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=g).to(mean)
    rec = vae.decoder(z).float()                                        # (B, 3, H, W)
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
    with torch.no_grad():
        m, v = mean.mean().item(), mean.var().item()
        old = stats.get("mean")
        stats["mean"] = m if old is None else 0.9 * old + 0.1 * m
        stats["var"] = v if old is None else 0.9 * stats["var"] + 0.1 * v
    return (rec - x).pow(2).mean() + kl_weight * kl


def _crops(paths, images, keys, size):
    """HR crops in [-1, 1] for (index, seed) keys, drawn as train.PairDataset draws its HR crops."""
    out = []
    for i, seed in keys:
        if paths[i] not in images:
            with Image.open(paths[i]) as im:
                images[paths[i]] = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)
        out.append(pairs.random_crop(images[paths[i]], size, torch.Generator().manual_seed(seed)))
    return torch.stack(out) * 2 - 1


def _save_state(path, step, vae, avg, opt, stats):
    """Everything a resumed run needs, atomically: weights, EMA, Adam's state, latent statistics."""
    tensors = {f"vae.{n}": p.detach().contiguous() for n, p in vae.named_parameters()}
    tensors.update({f"ema.{n}": a.contiguous() for n, a in avg.items()})
    opt_tensors, groups = runs.optimizer_tensors(opt, prefix="opt.")
    atomic_save(tensors | opt_tensors, path, {"step": str(step), "stats": json.dumps(stats), "param_groups": groups})


def _load_state(path, vae, avg, opt):
    """Restore what _save_state wrote; returns (step, stats)."""
    f = SafetensorsFiles(path)
    with torch.no_grad():
        for n, p in vae.named_parameters():
            p.copy_(f.get(f"vae.{n}"))
            avg[n].copy_(f.get(f"ema.{n}"))
    runs.load_optimizer(opt, {k: f.get(k) for k in f.keys() if k.startswith("opt.")},
                         json.loads(f.metadata["param_groups"]), prefix="opt.")
    return int(f.metadata["step"]), json.loads(f.metadata["stats"])


def train_vae(data, out, *, steps=3000, batch=16, size=64, lr=5e-4, ema=0.999, kl=1e-6, seed=0, save_every=500):
    """Train the tiny VAE on the images in `data` (a folder, or folders comma-separated); writes
    out/vae.safetensors (EMA weights, calibrated shift / scale), out/grid.png (HR | reconstruction),
    out/steps.txt. Returns the exported VAE. Every `save_every` steps the state goes to
    out/state.safetensors, from which a rerun into the same `out` resumes, exactly (crops and noise
    are functions of the step); it is removed at the end."""
    paths, _ = image_files.usable_images(image_files.find_images(data), size)
    images = {}
    torch.manual_seed(seed)
    vae = vae_lib.VAE(vae_lib.CONFIGS["tiny"]).train()
    init_linear_code(vae, _crops(paths, images, [(i % len(paths), runs.mix(seed, i, 11)) for i in range(PCA_CROPS)], size))
    params = list(vae.parameters())
    opt = torch.optim.Adam(params, lr=lr)
    avg = {n: p.detach().clone() for n, p in vae.named_parameters()}
    state_path, start = os.path.join(out, "state.safetensors"), 0
    stats, t0 = {}, time.time()
    if os.path.exists(state_path):
        start, stats = _load_state(state_path, vae, avg, opt)
        print(f"vae: resuming at step {start} from {state_path}", flush=True)
    os.makedirs(out, exist_ok=True)
    for step, keys in enumerate(runs.step_batches(len(paths), batch, seed, 0, start, steps), start):
        g = torch.Generator().manual_seed(runs.mix(seed, step, 0, 7))
        loss = vae_loss(vae, _crops(paths, images, keys, size), kl, g, stats)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        opt.step()
        with torch.no_grad():
            for n, p in vae.named_parameters():
                avg[n].lerp_(p.detach(), 1 - ema)
        if (step + 1) % 200 == 0 or step + 1 == steps:
            print(f"vae step {step + 1}/{steps}: loss {loss.item():.5f} ({time.time() - t0:.0f} s)", flush=True)
        if (step + 1) % save_every == 0 and step + 1 < steps:
            _save_state(state_path, step + 1, vae, avg, opt, stats)
    final = copy.deepcopy(vae).eval().requires_grad_(False)
    with torch.no_grad():
        for n, p in final.named_parameters():
            p.copy_(avg[n])
    final.cfg = replace(final.cfg, shift=float(stats["mean"]), scale=float(1 / math.sqrt(stats["var"])))
    checkpoints.save_vae(final, os.path.join(out, "vae.safetensors"))
    x = _crops(paths, images, [(i % len(paths), runs.mix(seed, i, 13)) for i in range(4)], size)
    with torch.no_grad():
        rec = final.decode(final.encode(x)).float()
    grid = torch.cat([torch.cat([x[i], rec[i]], 2) for i in range(len(x))], 1).add(1).div(2).clamp(0, 1)
    Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(os.path.join(out, "grid.png"))
    with open(os.path.join(out, "steps.txt"), "w") as f:
        f.write(f"{steps}\n")
    if os.path.exists(state_path):
        os.remove(state_path)
    return final
