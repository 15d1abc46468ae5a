"""Plain helpers shared by several test files (imported explicitly): the repository's paths, inputs, images."""

import json
import os
import re
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

import text
import toy_flows
from plumbing import checkpoints

ROOT = Path(__file__).resolve().parents[1]   # the repository
REQUIRE_PHOTOS = "MFSR_REQUIRE_PHOTOS"       # set by .ci/run: a missing photograph fails, not skips


def _need_photos(names=None):
    """The miniature's photographs `names` (default: all) must be on disk: scikit-image's, and the
    Debian packages'. Missing ones skip the test with one line naming the apt-get command; under CI
    (REQUIRE_PHOTOS set) they fail it instead, so CI still runs every photo test."""
    import pytest
    pytest.importorskip("skimage")
    import miniature
    missing = [n for n in (names or miniature.PHOTOS) if miniature.PHOTOS[n][0] != "skimage"
               and not os.path.exists(miniature.PHOTOS[n][1])]
    if missing:
        msg = (f"{len(missing)} of the miniature's photographs are missing ({', '.join(missing[:3])}...); "
               f"apt-get install {' '.join(sorted(miniature._packages()))}")
        if os.environ.get(REQUIRE_PHOTOS):
            pytest.fail(f"{msg} ({REQUIRE_PHOTOS} is set)")
        pytest.skip(msg)


_randomize = toy_flows.randomize   # a random but generic network; its home is experiments/toy_flows.py


def _images(folder, n=4, size=72, seed=0):
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    x = np.linspace(0, 1, size)
    for i in range(n):
        f = rng.uniform(2, 9, 3)
        img = np.stack([np.outer(np.sin(f[0] * x + i), np.cos(f[1] * x)), np.outer(x, np.sin(f[2] * x)),
                        rng.random((size, size)) * 0.4], -1) * 0.5 + 0.5
        Image.fromarray((img.clip(0, 1) * 255).astype(np.uint8)).save(folder / f"img{i}.png")
    return str(folder)


_TINY = ["--preset", "tiny", "--batch", "2", "--size", "32", "--workers", "0", "--log-every", "1000",
         "--sample-every", "1000", "--untrained-vae"]   # smoke runs: a random VAE, on purpose


def _png(path):
    """(1, 3, H, W) in [0, 1] of an image file, as RGB."""
    from PIL import Image
    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)[None]


_TXT_CORPUS = [
    "A photo of a cat.",
    "",
    "  leading and trailing   spaces\t\tand tabs\n newlines  ",
    "Café naïve résumé — ÀÉÎÕÜ façade; CAPITALS and MiXeD case",
    "e\u0301 combining accent vs é, a\u0308 vs ä",
    "emoji 😀🐱 👍🏽 🇫🇷🇩🇪 flags ❤️ ✨",
    "numbers 1234567890 3.14159 1,000,000 ½ ² ① Ⅷ",
    "punctuation!!! ??? ... --- ((brackets)) [x] {y} <z> @#$%^&* ~`|\\ \"quoted\"",
    "it's they're we've I'm you'll he'd DON'T IT'S",
    "ＦＵＬＬＷＩＤＴＨ ｋａｔａｋａｎａ ﾊﾝｶｸ ﬁ ligature ™ ℃ ß",
    "Greek αβγ Cyrillic Привет Arabic مرحبا Hindi नमस्ते Thai สวัสดี Korean 한국어",
    "a high resolution photograph of a red fox sitting in fresh snow, golden hour light, " * 8,
    "The image shows a wooden table with three apples, a knife and a glass of water. " + text.POSITIVE_SUFFIX,
    text.NEGATIVE_PROMPT,
    "special <|endoftext|> and <|startoftext|> inside text",
    "t5 specials </s> and <extra_id_0> and <pad>",
]


_SHIP = ROOT / "weights" / "mfsr-tiny"


# --------------------------------------------------------------------------------------------
# The VAE in diffusers' AutoencoderKL layout (ARCH §4.3). vae.py reads this layout (real SD3.5
# folders have it); only the tests write it, so that diffusers can serve as the numeric reference.

_VAE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def vae_diffusers_name(key, levels):
    """Original key -> diffusers key (checkpoints.from_diffusers_name inverts it); diffusers numbers the
    decoder levels from the deepest."""
    key = re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out.", key)
    key = re.sub(r"\.mid\.block_([12])\.", lambda m: f".mid_block.resnets.{int(m[1]) - 1}.", key)
    key = re.sub(r"\.mid\.attn_1\.(\w+)\.", lambda m: f".mid_block.attentions.0.{_VAE_ATTN[m[1]]}.", key)
    key = re.sub(r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets.", key)
    key = re.sub(r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0.", key)
    flip = lambda m: levels - 1 - int(m[1])   # noqa: E731
    key = re.sub(r"^decoder\.up\.(\d+)\.block\.", lambda m: f"decoder.up_blocks.{flip(m)}.resnets.", key)
    key = re.sub(r"^decoder\.up\.(\d+)\.upsample\.", lambda m: f"decoder.up_blocks.{flip(m)}.upsamplers.0.", key)
    return key.replace(".nin_shortcut.", ".conv_shortcut.")


def vae_diffusers_state_dict(sd, levels):
    """The attention's 1x1 conv weights become diffusers' (C, C) linears."""
    return {vae_diffusers_name(k, levels): (v.flatten(1) if ".mid.attn_1." in k and v.dim() == 4 else v)
            for k, v in sd.items()}


def vae_diffusers_config(cfg):
    """The diffusers AutoencoderKL config (config.json) of a vae.VAEConfig."""
    n = len(cfg.channels)
    if cfg.patch != 1:
        raise ValueError(f"diffusers' AutoencoderKL has no patch (pixel-unshuffle) VAE; got {cfg}")
    if cfg.dec_blocks != cfg.enc_blocks + 1:
        raise ValueError(f"diffusers' AutoencoderKL has layers_per_block + 1 decoder blocks; got {cfg}")
    return {"_class_name": "AutoencoderKL", "in_channels": cfg.image_channels, "out_channels": cfg.image_channels,
            "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
            "block_out_channels": list(cfg.channels), "layers_per_block": cfg.enc_blocks,
            "latent_channels": cfg.latent_channels, "norm_num_groups": cfg.groups, "act_fn": "silu",
            "scaling_factor": cfg.scale, "shift_factor": cfg.shift, "use_quant_conv": False,
            "use_post_quant_conv": False, "mid_block_add_attention": cfg.mid_attn, "force_upcast": True,
            "sample_size": 1024}


def save_vae_diffusers(vae, folder):
    """`folder` gets diffusion_pytorch_model.safetensors and config.json, as AutoencoderKL.save_pretrained
    writes them (nothing at all for a VAE diffusers cannot hold)."""
    config = vae_diffusers_config(vae.cfg)   # first: raises for a VAE diffusers cannot hold
    os.makedirs(folder, exist_ok=True)
    sd = vae_diffusers_state_dict({k: v.detach().contiguous() for k, v in vae.state_dict().items()},
                                  len(vae.cfg.channels))
    meta = {"format": "mfsr-vae", "layout": "diffusers", "vae_config": json.dumps(asdict(vae.cfg))}
    checkpoints.atomic_save(sd, os.path.join(folder, "diffusion_pytorch_model.safetensors"), meta)
    Path(folder, "config.json").write_text(json.dumps(config, indent=2))
