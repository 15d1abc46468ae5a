"""Plain helpers shared by several test files (imported explicitly): the repository's paths, inputs, images."""

from pathlib import Path

import numpy as np
import torch

import text

ROOT = Path(__file__).resolve().parents[1]   # the repository


def _randomize(net, std=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return net


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
