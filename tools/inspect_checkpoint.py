"""What a checkpoint holds, read from its shapes and metadata (no weights are loaded), or what a
preset config builds.

    python tools/inspect_checkpoint.py sd3.5_medium.safetensors        # the transformer in it
    python tools/inspect_checkpoint.py sd3.5_medium.safetensors --vae  # the VAE in it
    python tools/inspect_checkpoint.py --config dit4sr                 # a preset and its size

For a small preset it also runs one forward and one JVP of the two-time student built from it.
"""
import argparse
import os
import sys
from dataclasses import replace

import torch

sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the core files at the root

import model
import vae as vae_lib
from plumbing import checkpoints
from plumbing.checkpoints import CheckpointError


def count(module):
    return sum(p.numel() for p in module.parameters())


def _config(lib, path, config, what):
    """lib (model or vae): the config a file's shapes give, after a line on the file, or a preset's."""
    if not path:
        return lib.CONFIGS[config]
    read = checkpoints.transformer_config if lib is model else checkpoints.vae_config
    cfg, src = read(path)
    print(f"{path}: {src.layout} layout, {len(src.where)} {what} tensors")
    return cfg


def transformer(path=None, config="tiny"):
    """The transformer config a file's shapes give (with the fields save_transformer records), or a preset's."""
    cfg = _config(model, path, config, "transformer")
    with torch.device("meta"):
        n = count(model.MMDiT(cfg))
    print(f"{cfg}\nparameters (pos_embed buffer excluded): {n:,}")
    if path or n > 50_000_000:
        return
    torch.manual_seed(0)
    net = model.MMDiT(replace(cfg, two_times=True, time_scale=1.0)).eval()
    x = torch.randn(1, cfg.in_channels, 16, 24)
    kw = dict(pooled=torch.randn(1, cfg.pooled_dim), context=torch.randn(1, 8, cfg.context_dim),
              lr=torch.randn_like(x) if cfg.lr_stream else None, sigma_s=torch.ones(1))
    with torch.no_grad():
        out, dout = torch.func.jvp(lambda z, s: net(z, s, **kw), (x, torch.full((1,), 0.5)),
                                   (torch.randn_like(x), torch.ones(1)))
    print(f"forward + JVP on a 16x24 latent: output {tuple(out.shape)}, |u| {out.norm():.3f}, |du| {dout.norm():.3f}")


def vae(path=None, config="tiny"):
    """The VAE config a file's shapes give, or a preset's, and its parameter counts."""
    cfg = _config(vae_lib, path, config, "VAE")
    with torch.device("meta"):
        v = vae_lib.VAE(cfg)
    print(f"{cfg}\nparameters: {count(v):,} (encoder {count(v.encoder):,}, decoder {count(v.decoder):,}); "
          f"x{cfg.factor}")


def main(argv=None):
    ap = argparse.ArgumentParser(description="Inspect a transformer or VAE checkpoint, or a preset config.")
    ap.add_argument("ckpt", nargs="?", help="a .safetensors file or a diffusers folder")
    ap.add_argument("--vae", action="store_true", help="the VAE in the file (or the VAE preset), not the transformer")
    ap.add_argument("--config", default="tiny", help="the preset to show when no file is given")
    a = ap.parse_args(argv)
    presets = vae_lib.CONFIGS if a.vae else model.CONFIGS
    if a.ckpt is None and a.config not in presets:
        ap.error(f"--config {a.config!r}: choose from {', '.join(sorted(presets))}")
    try:
        (vae if a.vae else transformer)(a.ckpt, a.config)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
