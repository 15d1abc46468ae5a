"""Preview the Real-ESRGAN degradations of one photograph: a PNG grid of the GT crop and N LR
images (nearest-neighbour enlarged, so the artifacts stay visible), each with its drawn parameters.

    python tools/degrade_preview.py img.png -n 8 -o grid.png
"""
import argparse
import math
import os
import sys
import tempfile

import torch
from PIL import Image, ImageDraw

sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the core files at the root

from degrade import DegradeConfig, degrade, random_crop_pair_source
from plumbing.images import load_image


def _fmt_kernel(p):
    if p is None:
        return "skipped"
    if p["type"] in ("sinc", "pulse"):
        return f"{p['type']} {p['size']}" + (f" wc{p['omega_c']:.2f}" if "omega_c" in p else "")
    s = f"{p['type']} {p['size']} sx{p['sigma_x']:.2f}"
    if p["type"].endswith("aniso"):
        s += f" sy{p['sigma_y']:.2f} th{p['theta']:.2f}"
    return s + (f" b{p['beta']:.2f}" if "beta" in p else "")


def describe(p):
    """A few short lines per image for the preview grid."""
    lines = []
    for n, key in ((1, "stage1"), (2, "stage2")):
        s = p[key]
        nz = s["noise"]
        amount = f"{nz['sigma']:.1f}" if nz["kind"] == "gaussian" else f"{nz['scale']:.2f}"
        lines += [f"k{n}: {_fmt_kernel(s['kernel'])}",
                  f"rs{n}: {s['resize']['direction']} {s['resize']['scale']:.2f} {s['resize']['mode']}",
                  f"n{n}: {nz['kind']} {amount}{' gray' if nz['gray'] else ''}"]
    lines += [f"jpeg {p['stage1']['jpeg']}/{p['stage2']['jpeg']}  {p['final_order']}",
              f"final: {p['final_mode']}  {_fmt_kernel(p['sinc'])}"]
    return lines


def _to_pil(x):
    return Image.fromarray((x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())


def make_grid(gt, lr, params, cols=3):
    """GT crop first, then each LR upscaled by nearest neighbour (artifacts stay visible) with its params."""
    size, text_h = gt.shape[-1], 12 * 10
    cells = [(_to_pil(gt[0]), ["GT (USM)"])]
    cells += [(_to_pil(l).resize((size, size), Image.NEAREST), describe(p)) for l, p in zip(lr, params)]
    rows = math.ceil(len(cells) / cols)
    grid = Image.new("RGB", (cols * size, rows * (size + text_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (im, lines) in enumerate(cells):
        x0, y0 = (i % cols) * size, (i // cols) * (size + text_h)
        grid.paste(im, (x0, y0))
        draw.multiline_text((x0 + 3, y0 + size + 2), "\n".join(lines), fill="black")
    return grid


def save_png_atomic(img, path):
    """Write next to the target, then rename: a crash never leaves a half-written file."""
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, suffix=".png.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            img.save(f, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv=None):
    p = argparse.ArgumentParser(description="Preview Real-ESRGAN degradations of one image as a PNG grid.")
    p.add_argument("image", help="input image (any size; cropped, or upscaled then cropped)")
    p.add_argument("-n", type=int, default=8, help="number of degradations")
    p.add_argument("-o", "--out", default="grid.png", help="output PNG")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gt-size", type=int, default=DegradeConfig.gt_size)
    p.add_argument("--final-sinc-prob", type=float, default=DegradeConfig.final_sinc_prob)
    p.add_argument("--no-usm", action="store_true", help="degrade the plain GT, not the USM-sharpened one")
    a = p.parse_args(argv)
    if a.n < 1:
        p.error(f"-n must be >= 1, got {a.n}")
    if a.gt_size < 16 or a.gt_size % 4:
        p.error(f"--gt-size must be a multiple of 4 and >= 16, got {a.gt_size}")
    if not a.out.lower().endswith(".png"):
        p.error(f"-o {a.out}: the output must be a .png file")
    if os.path.exists(a.out) and os.path.exists(a.image) and os.path.samefile(a.out, a.image):
        p.error(f"-o {a.out}: refusing to overwrite the input image")
    cfg = DegradeConfig(gt_size=a.gt_size, final_sinc_prob=a.final_sinc_prob, usm_gt=not a.no_usm)
    print(cfg)
    try:
        img = load_image(a.image).rgb
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    g = torch.Generator().manual_seed(a.seed)
    crop, _ = random_crop_pair_source(img, cfg.gt_size, g)
    gt, lr, params = degrade(crop[None].expand(a.n, -1, -1, -1), cfg, g)
    save_png_atomic(make_grid(gt, lr, params), a.out)
    print(f"wrote {a.out}: GT + {a.n} degradations, LR {tuple(lr.shape[-2:])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
