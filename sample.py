"""Super-resolve real images x4 in one step with an MFSR student (or with the 40-step teacher).

    python sample.py in.png                               # -> in_mfsr.png, 4x the size (shipped tiny model)
    python sample.py photos/ "more/*.jpg" -o out/ --steps 2
    python sample.py in.png --ckpt runs/mfsr/ckpt-0012000/student.safetensors --vae sd3.5_medium.safetensors
    python sample.py in.png --teacher --ckpt dit4sr_q/ --vae sd3.5_medium.safetensors --steps 40 --cfg 8

    from sample import upscale
    y = upscale(x, net, vae, cond, steps=1)               # x (1, 3, H, W) in [0, 1] -> (1, 3, 4H, 4W)

The pipeline (MFSR Alg. 2; DiT4SR's inference recipe, reference/ARCHITECTURE.md §3.7, for the rest):
1. the LR image is bicubic-upsampled x4 (as train.py's pairs are made), padded by reflection to a
   multiple of VAE factor x patch, and VAE-encoded to z_lr (the posterior mean);
2. z_0 ~ N(0, I) is drawn once for the whole latent, then N uniform steps z <- z + (s - t) u(z, t, s)
   with the student (or the teacher's Euler steps with CFG against the negative prompt);
   above one latent tile the network runs on overlapping tiles (64 x 64, overlap 24, as DiT4SR)
   whose outputs are blended with Gaussian weights at every step;
3. decode (on tiles above a size, plumbing/tiling.py), crop the padding, colour-fix against the
   upsampled LR (AdaIN by default, or wavelet), clamp to [0, 1].
Gray images come out gray, alpha is upscaled apart (bicubic), 16-bit files are written at 16 bits.
The plumbing (image files, latent tiles, checkpoint layouts, progress) is in plumbing/.
"""
import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

import fastjvp
import mfsr
import model
import vae as vae_lib
from plumbing import cli, images, tiling
from plumbing.checkpoints import (CheckpointError, SafetensorsFiles, load_embedding, load_transformer, load_vae,
                                  prompt_rows, zero_prompt)
from plumbing.tiling import TiledNet

SCALE = 4
SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "mfsr-tiny")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PROGRESS_AFTER = 2.0     # seconds an image may take before its progress is shown

# --------------------------------------------------------------------------------------------
# Colour fix (reference/ARCHITECTURE.md §3.7 step 8): keep the LR's colours, take the model's details


def adain_color_fix(y, ref, eps=1e-5):
    """Per-image, per-channel mean and standard deviation of y set to those of ref. (B, 3, H, W)."""
    my, sy = y.mean((2, 3), keepdim=True), y.std((2, 3), keepdim=True)
    mr, sr = ref.mean((2, 3), keepdim=True), ref.std((2, 3), keepdim=True)
    return (y - my) / (sy + eps) * sr + mr


def wavelet_color_fix(y, ref, levels=5):
    """y's high frequencies on ref's low frequencies (a `levels`-level a-trous wavelet, as DiT4SR /
    StableSR): the low ones are the image blurred by the 3x3 binomial kernel at dilations 1, 2, 4, ..."""
    k = torch.tensor([[1, 2, 1], [2, 4, 2], [1, 2, 1]], dtype=y.dtype, device=y.device) / 16
    k = k.expand(y.shape[1], 1, 3, 3)                                          # depthwise

    def low(x):
        for i in range(levels):
            x = F.conv2d(F.pad(x, (2 ** i,) * 4, mode="replicate"), k, dilation=2 ** i, groups=x.shape[1])
        return x
    return y - low(y) + low(ref)


COLOR_FIXES = {"adain": adain_color_fix, "wavelet": wavelet_color_fix, "none": lambda y, ref: y}
# DiT4SR's sampler settings, for checkpoints that record none
DEFAULTS = {"tile": 64, "tile_overlap": 24, "cfg": mfsr.DIT4SR_CFG, "shift": mfsr.SD35_SHIFT, "start": 0.0}


def sampling_settings(net):
    """tile, tile_overlap, cfg, shift and start for `upscale`: the checkpoint's, else DEFAULTS."""
    return {k: getattr(net, "sampling", {}).get(k, v) for k, v in DEFAULTS.items()}


# --------------------------------------------------------------------------------------------
# What it runs: the network (model.py), the VAE (vae.py) and the prompt, found from one checkpoint


def _beside(ckpt, name):
    return os.path.join(ckpt if os.path.isdir(ckpt) else os.path.dirname(os.path.abspath(ckpt)), name)


def load_models(ckpt, vae_path=None, teacher=False, device="cpu", dtype=torch.float32):
    """(net, vae): the model.MMDiT of `ckpt`, a student (two time inputs) or with teacher=True a
    one-time teacher, with DiT4SR's LR stream; and a vae.VAE: vae_path, else vae.safetensors beside
    the checkpoint, else the one inside it (an SD3.5 file holds both)."""
    net = load_transformer(ckpt, dtype=dtype, device=device)
    if not net.cfg.lr_stream:
        raise CheckpointError(f"{ckpt}: a plain SD3 transformer (no LR stream), not a super-resolution model")
    if net.cfg.two_times and teacher:
        raise CheckpointError(f"{ckpt}: this is a student (two time inputs); drop --teacher")
    if not net.cfg.two_times and not teacher:
        raise CheckpointError(f"{ckpt}: not an MFSR student (no s-embedder, one time input); pass --teacher "
                              f"to sample it as the 40-step teacher, or give a student.safetensors from train.py")
    model.merge_lora(net)               # a file with its LoRA apart: folded in, one matmul per linear
    if vae_path is None:
        vae_path = _beside(ckpt, "vae.safetensors")
        vae_path = vae_path if os.path.exists(vae_path) else ckpt
    try:
        vae = load_vae(vae_path, device=device)
    except CheckpointError as e:
        raise CheckpointError(f"no usable VAE ({e}); pass --vae (a VAE file or an SD3.5 checkpoint)") from None
    vae_lib.set_dtype(vae, dtype)       # fp16 keeps the decoder's up levels in fp32 (vae.py)
    if vae.cfg.latent_channels != net.cfg.in_channels:
        raise CheckpointError(f"{vae_path}: the VAE has {vae.cfg.latent_channels} latent channels, the "
                              f"transformer {net.cfg.in_channels}")
    return net.eval().requires_grad_(False), vae.eval().requires_grad_(False)


def load_condition(net_cfg, ckpt, emb=None, beside=("prompt", "null")):
    """(the prompt as an mfsr.Cond without z_lr, where from): an embedding file, else the first of
    `beside` found next to the checkpoint (train.py stores the prompt, null and negative embeddings a
    model was trained with there), else zeros."""
    if emb and not os.path.exists(emb):
        raise CheckpointError(f"{emb}: no such embedding file")
    found = [emb] if emb else [w for w in (_beside(ckpt, n + ".safetensors") for n in beside) if os.path.exists(w)]
    zeros = zero_prompt(net_cfg)
    if not found:
        return prompt_rows(zeros), f"zeros (no {' / '.join(beside)}.safetensors beside the model)"
    return prompt_rows(load_embedding(found[0], zeros)), found[0]


# --------------------------------------------------------------------------------------------
# One image


def pad_to(x, multiple):
    """Pad (B, C, H, W) at the bottom and right to multiples of `multiple`: reflection where the
    image is big enough, else edge replication (a 4 x 4 image cannot reflect 4 pixels)."""
    H, W = x.shape[-2:]
    ph, pw = -H % multiple, -W % multiple
    mode = "reflect" if ph < H and pw < W else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode)


@torch.inference_mode()
def upscale(img, net, vae, cond, steps=1, *, teacher=False, cond_neg=None, cfg=DEFAULTS["cfg"],
            shift=DEFAULTS["shift"], seed=0, tile=DEFAULTS["tile"], tile_overlap=DEFAULTS["tile_overlap"],
            color_fix="adain", vae_tile=None, progress=None, grid="shifted", tile_batch=None, start=0.0):
    """x4 super-resolution of img (1, 3, H, W) in [0, 1] -> (1, 3, 4H, 4W) float32 in [0, 1], on CPU.

    net: a student or, with teacher=True, a one-time teacher, on the device and in the dtype wanted.
    cond: the prompt, an mfsr.Cond without z_lr; cond_neg likewise (the teacher's CFG negative; None: cond).
    steps: uniform student steps (Alg. 2) or the teacher's Euler steps with guidance `cfg` on SD3's
    grid shifted by `shift` (the shift its training used; grid "uniform": Alg. 2's grid). start: the
    time t0 the steps start from, z_t0 = t0 z_lr + (1 - t0) noise (0: pure noise, the paper's).
    tile / tile_overlap / tile_batch: latent tiles, so many per call (None: by free memory); vae_tile:
    the VAE's tile (plumbing/tiling.py; None: by size). progress: a cli.Progress or None."""
    assert img.ndim == 4 and img.shape[:2] == (1, 3), f"img must be (1, 3, H, W), got {tuple(img.shape)}"
    if color_fix not in COLOR_FIXES:
        raise ValueError(f"color_fix must be one of {sorted(COLOR_FIXES)}, got {color_fix!r}")
    p = next(net.parameters())
    device, dtype = p.device, p.dtype
    progress = progress or cli.Progress(None)
    progress.phase("bicubic x4")
    H, W = img.shape[-2:]
    lr_up = F.interpolate(img.float().to(device), size=(SCALE * H, SCALE * W), mode="bicubic",
                          align_corners=False).clamp(0, 1)                        # (1, 3, 4H, 4W)
    x = pad_to(lr_up, vae.cfg.factor * net.cfg.patch)                          # (1, 3, H', W')
    progress.phase("VAE encode")
    z_lr = tiling.encode(vae, (x * 2 - 1).to(next(vae.parameters()).dtype), tile=vae_tile).to(dtype)  # (1, C, h, w)
    g = torch.Generator().manual_seed(seed)     # on the CPU: the same seed gives the same noise on every device
    # the tiles bound the memory, so no fastjvp.lean_memory() (for training: lower peaks, slower)
    tiled = TiledNet(net, tile, tile_overlap, on_tile=progress.tile, batch=tile_batch)
    progress.phase("network", calls=steps * len(tiled.tiles(*z_lr.shape[-2:])))
    c = cond._replace(z_lr=z_lr).to(device, dtype)
    if teacher:
        c_neg = (cond_neg or cond).to(device, dtype)
        L = max(c.context.shape[1], c_neg.context.shape[1])   # zero-pad the shorter context so CFG can batch them
        pad = lambda x: x._replace(context=F.pad(x.context, (0, 0, 0, L - x.context.shape[1])))
        z = mfsr.sample_teacher(tiled, pad(c), pad(c_neg), steps=steps, cfg=cfg, shift=shift, generator=g, grid=grid,
                                start=start)
    else:
        z = mfsr.sample_student(tiled, c, steps=steps, generator=g, start=start)
    progress.phase("VAE decode")
    y = tiling.decode(vae, z.to(next(vae.parameters()).dtype), tile=vae_tile).float()  # (1, 3, H', W') in [-1, 1]
    y = ((y + 1) / 2)[..., :SCALE * H, :SCALE * W]                             # crop the padding
    progress.phase("colour fix")
    y = COLOR_FIXES[color_fix](y, lr_up).clamp(0, 1).cpu()
    progress.phase(None)
    return y


# --------------------------------------------------------------------------------------------
# The program


def process(path, args, net, vae, cond, cond_neg, inputs, written, device):
    """One image: read, upscale (RGB; alpha bicubic apart), write. Returns the summary line."""
    img = images.load_image(path)
    out = images.output_path(path, args.output, args.suffix, args.ext, img.alpha is not None)
    if out in written:
        raise images.ImageError(f"{out}: already written for another input in this run; use --suffix or --ext")
    images.check_output(out, img.alpha is not None, inputs)                  # before minutes of compute
    if img.note:
        print(f"note: {path}: {img.note}", file=sys.stderr, flush=True)
    cli.reset_peak(device)
    t0 = time.perf_counter()
    progress = cli.Progress(path, after=PROGRESS_AFTER)
    y = upscale(img.rgb[None], net, vae, cond, args.steps, teacher=args.teacher, cond_neg=cond_neg,
                cfg=args.cfg, shift=args.shift, seed=args.seed, tile=args.tile, tile_overlap=args.tile_overlap,
                color_fix=args.color_fix, progress=progress, tile_batch=args.tile_batch, start=args.start)
    alpha = None if img.alpha is None else F.interpolate(img.alpha[None], scale_factor=SCALE, mode="bicubic",
                                                          align_corners=False)[0]
    progress.phase("write")
    images.save_image(out, y[0], alpha=alpha, gray=img.gray, bits=img.bits, protect=inputs)
    progress.phase(None)
    written.add(out)
    H, W = img.size
    secs = time.perf_counter() - t0
    where = ", ".join(f"{k} {v:.1f}" for k, v in progress.seconds.items()) if secs >= progress.after else ""
    return (f"{path} {W}x{H} -> {out} {SCALE * W}x{SCALE * H}, {args.steps} step{'s' * (args.steps > 1)}, "
            f"{secs:.2f} s{f' ({where})' if where else ''}, peak {cli.peak_memory_mb(device):.0f} MB")


def parse_args(argv=None):
    try:   # the sampler settings the shipped student records, for --help
        rec = SafetensorsFiles(os.path.join(SHIPPED, "student.safetensors")).config("mfsr_sampling")
    except CheckpointError:      # a missing or unreadable file: --help still works
        rec = {}
    shipped = lambda k: f"; the shipped model records {rec[k]:g}" if k in rec else ""   # noqa: E731
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("inputs", nargs="+", help="image files, folders, globs")
    p.add_argument("-o", "--output", default=None, help="output folder (default: beside each input)")
    p.add_argument("--suffix", default="_mfsr", help="added to the file name (default _mfsr)")
    p.add_argument("--ext", default="auto", help="png, jpg, webp, bmp, tif; auto = the input's "
                   "(PNG for the formats only read: gif, ppm, pgm, pbm, pnm)")
    p.add_argument("--ckpt", default=None, help="student.safetensors from train.py (default: the shipped model)")
    p.add_argument("--teacher", action="store_true", help="--ckpt is a one-time teacher: Euler with CFG")
    p.add_argument("--vae", default=None, help="VAE file/folder or SD3.5 checkpoint (default: beside/inside --ckpt)")
    p.add_argument("--emb", default=None, help="prompt embedding file from tools/text.py (default: the "
                   "prompt.safetensors / null.safetensors beside the model)")
    p.add_argument("--neg-emb", default=None, help="negative prompt embedding for the teacher's CFG")
    p.add_argument("--steps", type=int, default=None, help="student 1..8 (default 1); teacher default 40")
    p.add_argument("--cfg-scale", "--cfg", dest="cfg", type=float, default=None, help="the teacher's CFG scale s, "
                   f"v_neg + s (v_c - v_neg), Eq. 11's w + 1 (default: the checkpoint's, else 8{shipped('cfg')})")
    p.add_argument("--shift", type=float, default=None, help="the teacher's sigma shift on SD3's grid (default: "
                   "the checkpoint's, else SD3.5's 3)")
    p.add_argument("--start-time", dest="start", type=float, default=None, help="t0 in [0, 1): start from t0 LR + "
                   "(1 - t0) noise; 0 (the paper's) invents the most detail, nearer 1 stays nearer the bicubic image "
                   f"(default: the checkpoint's, else 0{shipped('start')})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tile", type=int, default=None, help="latent tile side (default: the checkpoint's, else 64"
                   f"{shipped('tile')})")
    p.add_argument("--tile-overlap", type=int, default=None, help="latent tile overlap (default: the "
                   f"checkpoint's, else 24{shipped('tile_overlap')}; with another --tile, scaled with it)")
    p.add_argument("--tile-batch", type=int, default=None, help="latent tiles per network call (default: by free memory)")
    p.add_argument("--color-fix", default="adain", choices=sorted(COLOR_FIXES))
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, mps")
    a = p.parse_args(argv)
    if a.steps is None:
        a.steps = 40 if a.teacher else 1
    if not a.teacher and not 1 <= a.steps <= 8:
        p.error(f"--steps {a.steps}: the student takes 1..8 steps")
    if a.teacher and a.steps < 1:
        p.error(f"--steps {a.steps}: at least 1")
    if a.start is not None and not 0 <= a.start < 1:
        p.error(f"--start-time {a.start}: must be in [0, 1) (0: from pure noise, as the paper)")
    if a.shift is not None and not a.shift > 0:
        p.error(f"--shift {a.shift}: must be > 0 (1 is none)")
    if a.ext != "auto" and "." + a.ext.lstrip(".").lower() not in images.EXTS:
        p.error(f"--ext {a.ext}: choose from auto, {', '.join(e[1:] for e in images.EXTS)}")
    return a


def apply_sampling_settings(args, net):
    """Unset flags take the checkpoint's settings; a --tile alone scales its overlap (in whole patches,
    below the tile, not 0 unless recorded so). Returns a note or ""."""
    rec = sampling_settings(net)
    scale_overlap = args.tile is not None and args.tile_overlap is None and args.tile != rec["tile"]
    for key, value in rec.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if not scale_overlap:
        return ""
    p = net.cfg.patch
    scaled = p * round(rec["tile_overlap"] * args.tile / rec["tile"] / p)
    least = p if rec["tile_overlap"] else 0      # a model that records an overlap keeps one, a patch at least
    args.tile_overlap = max(0, min(max(least, scaled), args.tile - p))
    return (f"--tile {args.tile}: tile overlap {args.tile_overlap} (the model's {rec['tile_overlap']} for tile "
            f"{rec['tile']}, scaled; --tile-overlap sets it)")


def main(argv=None):
    args = parse_args(argv)
    written = set()
    try:
        return run(args, written)
    except KeyboardInterrupt:   # outputs are written atomically: each is whole or absent
        print(f"\ninterrupted: {len(written)} output(s) written, none half-written", file=sys.stderr)
        return 130


def run(args, written):
    """The program after parsing: inputs, models, then one image at a time into `written`."""
    try:
        device = cli.pick_device(args.device)
        paths, problems = images.find_inputs(args.inputs, args.suffix)
        for msg in problems:
            print(f"error: {msg}", file=sys.stderr)
        if not paths:
            return 1
        ckpt = args.ckpt or os.path.join(SHIPPED, "student.safetensors")
        if not os.path.exists(ckpt) and args.ckpt is None:
            raise CheckpointError(f"the shipped model is missing ({ckpt}); pass --ckpt (a student.safetensors "
                                  f"exported by train.py) and --vae")
        net, vae = load_models(ckpt, args.vae, args.teacher, device, DTYPES[args.dtype])
        fastjvp.accelerate(net)   # fused attention in place of model.py's plain softmax(s Q K^T) V
        cond, where = load_condition(net.cfg, ckpt, args.emb)
        cond_neg = load_condition(net.cfg, ckpt, args.neg_emb, ("neg", "null"))[0] if args.teacher else None
        note = apply_sampling_settings(args, net)
        if note:
            print(f"note: {note}", file=sys.stderr)
        TiledNet(net, args.tile, args.tile_overlap, batch=args.tile_batch)   # check the tiles once
    except ValueError as e:                            # a CheckpointError, or a setting that cannot work
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.output:
        try:
            os.makedirs(args.output, exist_ok=True)
        except OSError as e:
            print(f"error: cannot create the output folder {args.output}: {e.strerror or e}", file=sys.stderr)
            return 2
    kind = f"teacher, CFG scale {args.cfg:g}, shift {args.shift:g}" if args.teacher else "student"
    kind += f", from t0 = {args.start:g}" if args.start else ""
    calls = args.steps * (2 if args.teacher else 1)
    print(f"model: {args.ckpt or SHIPPED} ({kind}, {calls} network calls per tile), prompt: {where}, "
          f"{device}, {args.dtype}")
    inputs, failed = [os.path.abspath(q) for q in paths], len(problems)
    for path in paths:
        try:
            print(process(path, args, net, vae, cond, cond_neg, inputs, written, device), flush=True)
        except (ValueError, OSError, RuntimeError) as e:      # images.ImageError and CheckpointError are ValueErrors
            failed += 1
            print(f"error: {path}: {e}" if path not in str(e) else f"error: {e}", file=sys.stderr, flush=True)
    if failed:
        print(f"{failed} of {len(paths) + len(problems)} inputs failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
