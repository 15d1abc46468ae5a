"""Tests of sample.py: image files in and out, tiling, the command line and the situations a new user hits."""

import importlib.util
import io
import math
import os
import shutil
import struct
import zlib
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

import mfsr
import model
import sample
import text
import vae as V
from plumbing import checkpoints, cli, images, tiling
from builders import _SHIP, _png


@pytest.fixture(scope="module")
def _smp_models(tmp_path_factory):
    """A tiny random student (LoRA merged, as train.py exports it), its teacher and a tiny x4 VAE."""
    d = tmp_path_factory.mktemp("smp_models")
    torch.manual_seed(0)
    teacher = model.MMDiT(model.CONFIGS["tiny"])
    student = model.make_student(teacher, lora_rank=4)
    with torch.no_grad():                       # make the s-embedder and LoRA matter
        for name, p in student.named_parameters():
            if "s_embedder" in name or "lora" in name:
                p.add_(torch.randn_like(p) * 0.05)
    model.merge_lora(student)
    checkpoints.save_transformer(student, str(d / "student.safetensors"))
    checkpoints.save_transformer(teacher, str(d / "teacher.safetensors"))
    torch.manual_seed(1)
    checkpoints.save_vae(V.VAE(V.CONFIGS["tiny"]), str(d / "vae.safetensors"))
    return d


def _smp_lr(H, W, seed=0):
    """A smooth random LR image (1, 3, H, W) in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 3, max(1, H // 4), max(1, W // 4), generator=g)
    return torch.nn.functional.interpolate(x, size=(H, W), mode="bicubic").clamp(0, 1)


def _smp_u8(H, W, C, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (H, W, C), dtype=np.uint8)


def _smp_u16(H, W, C, seed=0):
    return np.random.default_rng(seed).integers(0, 65536, (H, W, C), dtype=np.uint16)


def _smp_png16_filtered(path, a):
    """A 16-bit PNG whose rows use every filter type in turn (0..4), written from the spec, so the
    reader's Sub / Up / Average / Paeth paths all run (encoders mostly pick one)."""
    H, W, C = a.shape
    rows = np.ascontiguousarray(a, dtype=">u2").view(np.uint8).reshape(H, -1).astype(np.int32)
    bpp, out = 2 * C, []
    for y in range(H):
        cur, up = rows[y], rows[y - 1] if y else np.zeros_like(rows[0])
        left = np.concatenate([np.zeros(bpp, np.int32), cur[:-bpp]])
        ul = np.concatenate([np.zeros(bpp, np.int32), up[:-bpp]])
        p = left + up - ul
        pa, pb, pc = abs(p - left), abs(p - up), abs(p - ul)
        paeth = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, ul))
        k = y % 5
        pred = [0, left, up, (left + up) // 2, paeth][k]
        out.append(bytes([k]) + ((cur - pred) % 256).astype(np.uint8).tobytes())
    chunk = lambda kind, body: struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ctype = {1: 0, 2: 4, 3: 2, 4: 6}[C]
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", W, H, 16, ctype, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(b"".join(out))) + chunk(b"IEND", b""))


def test_sample_images_round_trip_16bit_alpha_gray(tmp_path):
    pytest.importorskip("png", reason="16-bit colour PNG needs pypng (requirements-test; the test below runs without it)")
    a16 = _smp_u16(9, 13, 3)
    _smp_png16_filtered(tmp_path / "f.png", a16)                  # all five row filters
    img = images.load_image(tmp_path / "f.png")
    assert (img.bits, img.gray, img.alpha) == (16, False, None)
    assert np.array_equal(np.round(img.rgb.permute(1, 2, 0).numpy() * 65535).astype(np.uint16), a16)
    has_tifffile = importlib.util.find_spec("tifffile") is not None   # optional for users (requirements-test)
    for ext in (".png", ".tif") if has_tifffile else (".png",):   # 16-bit RGB written and read back exactly
        images.save_image(tmp_path / f"w{ext}", img.rgb, bits=16)
        back = images.load_image(tmp_path / f"w{ext}")
        assert back.bits == 16 and torch.equal(back.rgb, img.rgb), ext
    if not has_tifffile:                                           # without it: refused clearly, by name
        with pytest.raises(images.ImageError, match=r"w\.tif: 16-bit colour TIFF needs the tifffile package"):
            images.save_image(tmp_path / "w.tif", img.rgb, bits=16)
    if importlib.util.find_spec("cv2") is not None:                # an independent PNG codec agrees
        import cv2
        assert np.array_equal(cv2.imread(str(tmp_path / "w.png"), cv2.IMREAD_UNCHANGED)[..., ::-1], a16)
    g16 = _smp_u16(7, 5, 1)[..., 0]
    Image.fromarray(g16).save(tmp_path / "g.png")                  # Pillow: mode I;16
    g = images.load_image(tmp_path / "g.png")
    assert g.gray and g.bits == 16 and np.array_equal(np.round(g.rgb[1].numpy() * 65535), g16)
    images.save_image(tmp_path / "g2.png", g.rgb, gray=True, bits=16)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "g2.png")), g16)
    rgba = _smp_u8(6, 4, 4)
    Image.fromarray(rgba).save(tmp_path / "a.png")
    a = images.load_image(tmp_path / "a.png")
    images.save_image(tmp_path / "a2.png", a.rgb, alpha=a.alpha)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a2.png")), rgba)
    pal = Image.fromarray(_smp_u8(5, 5, 3)).convert("P")
    pal.save(tmp_path / "p.png", transparency=int(np.asarray(pal)[0, 0]))
    p = images.load_image(tmp_path / "p.png")
    assert p.alpha is not None and p.alpha[0, 0, 0] == 0 and not p.gray


def test_sample_16bit_colour_png_without_pypng_is_read_at_8_bits_and_said(tmp_path, monkeypatch):
    """Without the optional pypng, a 16-bit colour PNG is Pillow's 8 bits (the high byte), the note
    says so, the result is written at 8 bits; asking for a 16-bit colour PNG is refused by name.
    With pypng, a truncated 16-bit file is refused by name."""
    a16 = _smp_u16(9, 13, 3)
    _smp_png16_filtered(tmp_path / "f.png", a16)
    if importlib.util.find_spec("png"):
        data = (tmp_path / "f.png").read_bytes()
        (tmp_path / "cut.png").write_bytes(data[:len(data) // 2])
        with pytest.raises(images.ImageError, match=r"cut\.png"):
            images.load_image(tmp_path / "cut.png")
    monkeypatch.setattr(images, "_has_pypng", lambda: False)
    img = images.load_image(tmp_path / "f.png")
    assert img.bits == 8 and "pypng" in img.note and not img.gray
    assert np.array_equal(np.round(img.rgb.permute(1, 2, 0).numpy() * 255).astype(np.uint16), a16 >> 8)
    with pytest.raises(images.ImageError, match=r"w\.png: 16-bit colour PNG needs the pypng package"):
        images.save_image(tmp_path / "w.png", img.rgb, bits=16)
    assert not (tmp_path / "w.png").exists()


def test_sample_images_errors_name_the_file(tmp_path):
    Image.fromarray(_smp_u8(40, 40, 3)).save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[:len(data) // 2])
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    for name, words in (("trunc.png", "truncated"), ("empty.jpg", "empty"), ("junk.png", "not an image"),
                        ("missing.png", "no such file")):
        with pytest.raises(images.ImageError, match=words) as e:
            images.load_image(tmp_path / name)
        assert name in str(e.value)
    old = images.MAX_PIXELS
    images.MAX_PIXELS = 1000
    try:
        with pytest.raises(images.ImageError, match="decompression bomb"):
            images.load_image(tmp_path / "ok.png")
    finally:
        images.MAX_PIXELS = old
    with pytest.raises(images.ImageError, match="refusing to write over an input"):
        images.save_image(tmp_path / "ok.png", torch.zeros(3, 2, 2), protect=[str(tmp_path / "ok.png")])
    assert (tmp_path / "ok.png").read_bytes() == data


def test_sample_tiling_is_exact_for_a_pointwise_net():
    """Tile placement and weight normalisation: a network without spatial mixing gives the same
    result tiled and untiled, whatever the layout (non-divisible sizes included)."""
    class Pointwise(torch.nn.Module):
        cfg = model.CONFIGS["tiny"]
        def forward(self, x, sigma, pooled, context, lr=None, sigma_s=None):
            return torch.tanh(x * 1.7 + lr) * sigma.view(-1, 1, 1, 1) + pooled.mean()
    net = Pointwise()
    g = torch.Generator().manual_seed(0)
    x, lr = torch.randn(2, 16, 38, 54, generator=g), torch.randn(2, 16, 38, 54, generator=g)
    kw = {"sigma": torch.tensor([0.3, 0.9]), "pooled": torch.randn(2, 32, generator=g), "context": None}
    ref = net(x, lr=lr, **kw)
    for tile, overlap in ((16, 6), (24, 8), (8, 0), (64, 24)):
        out = tiling.TiledNet(net, tile, overlap)(x, lr=lr, **kw)
        assert (out - ref).abs().max() < 1e-5, (tile, overlap)


def test_sample_tiles_in_batches_give_the_one_by_one_result(_smp_models, monkeypatch):
    """Tiles stacked along the batch (--tile-batch, or as many as a quarter of the free memory holds)
    give what one tile per network call gives, for the student (batch 1) and the teacher's CFG pair
    (batch 2): the rows of a stacked call must go back to their own tiles and their own images."""
    net, _ = sample.load_models(str(_smp_models / "student.safetensors"))
    g = torch.Generator().manual_seed(0)
    for B in (1, 2):
        x, lr = torch.randn(B, 16, 40, 44, generator=g), torch.randn(B, 16, 40, 44, generator=g)
        kw = dict(sigma=torch.rand(B, generator=g), pooled=torch.randn(B, 32, generator=g),
                  context=torch.randn(B, 3, 64, generator=g), lr=lr, sigma_s=torch.rand(B, generator=g))
        calls = []
        counting = lambda *a, **k: calls.append(a[0].shape[0]) or net(*a, **k)          # noqa: E731
        counting.cfg = net.cfg
        with torch.no_grad():
            one = tiling.TiledNet(net, 16, 8, batch=1)(x, **kw)
            for batch in (3, 32):
                calls.clear()
                out = tiling.TiledNet(counting, 16, 8, batch=batch)(x, **kw)
                assert (out - one).abs().max() < 1e-5 and calls[0] == B * min(batch, 20), (B, batch, calls)
    auto, ctx = tiling.TiledNet(net, 16, 8), torch.zeros(1, 3, 64)
    monkeypatch.setattr(tiling, "free_memory", lambda device: 4 * 2 ** 20)           # 4 MiB free: one at a time
    assert auto.batch_size(x[:1], ctx) == 1
    monkeypatch.setattr(tiling, "free_memory", lambda device: 2 ** 40)
    assert auto.batch_size(x[:1], ctx) == tiling.TILE_BATCH_MAX
    with pytest.raises(ValueError, match="--tile-batch 0"):
        tiling.TiledNet(net, 16, 8, batch=0)


def test_sample_tiling_blends_smoothly_and_stays_close_to_untiled(_smp_models):
    # 1) A network whose output is its tile's mean LR value: tiled results differ per tile, and the
    # Gaussian blend must ramp between them. With DiT4SR's tiles (64, overlap 24, variance 0.01)
    # the largest jump between neighbouring columns is 24% of the step between the two tiles'
    # values (measured); a hard cut jumps by 100%, a flat average by 50%.
    class TileMean(torch.nn.Module):
        cfg = model.CONFIGS["tiny"]
        def forward(self, x, sigma, pooled, context, lr=None, sigma_s=None):
            return lr.mean((2, 3), keepdim=True).expand_as(x)
    ramp = torch.linspace(0, 1, 104).expand(1, 16, 8, 104)                   # two tiles: 0..64, 40..104
    out = tiling.TiledNet(TileMean(), 64, 24)(ramp, torch.ones(1), None, None, lr=ramp)[0, 0, 0]
    means = [ramp[..., :64].mean().item(), ramp[..., 40:].mean().item()]
    assert out[0].item() == pytest.approx(means[0], abs=1e-6) and out[-1].item() == pytest.approx(means[1], abs=1e-6)
    assert out.diff().abs().max() < 0.35 * (means[1] - means[0])
    # 2) The tiny random student on a 40 x 40 latent in 4 tiles (24, overlap 8) vs one tile.
    # Attention of random weights mixes everything with everything, so tiles change the result
    # everywhere: measured mean |tiled - untiled| = 0.51 of the image's mean deviation (0.53 away
    # from the image border), vs 1.26 for a different seed. No seam: the error within 2 latent
    # pixels of a tile edge is 1.11x the error elsewhere (bound 1.3).
    net, vae = sample.load_models(str(_smp_models / "student.safetensors"))
    cond = mfsr.Cond(None, torch.zeros(1, 32), torch.zeros(1, 1, 64))
    x = _smp_lr(40, 40)
    ref = sample.upscale(x, net, vae, cond, color_fix="none")
    tiled = sample.upscale(x, net, vae, cond, color_fix="none", tile=24, tile_overlap=8)
    other = sample.upscale(x, net, vae, cond, color_fix="none", seed=1)
    scale = (ref - ref.mean()).abs().mean()
    err = (tiled - ref).abs()[0].mean(0)                                     # (160, 160)
    inner = err[16:-16, 16:-16].mean() / scale
    assert inner < 0.65 and inner < 0.6 * (other - ref).abs().mean() / scale
    near = torch.zeros(160, dtype=torch.bool)
    for edge in (16, 24):                                                    # latent tile edges
        near[4 * edge - 8:4 * edge + 8] = True
    for prof in (err.mean(0), err.mean(1)):
        assert prof[near].mean() < 1.3 * prof[~near].mean()


def test_sample_upscale_is_x4_seeded_and_colour_fixed(_smp_models):
    net, vae = sample.load_models(str(_smp_models / "student.safetensors"))
    cond = mfsr.Cond(None, torch.zeros(1, 32), torch.zeros(1, 1, 64))
    x = _smp_lr(37, 53)
    y = sample.upscale(x, net, vae, cond, steps=2, seed=3)
    assert y.shape == (1, 3, 148, 212) and 0 <= y.min() and y.max() <= 1
    assert torch.equal(y, sample.upscale(x, net, vae, cond, steps=2, seed=3))          # same seed
    assert (y - sample.upscale(x, net, vae, cond, steps=2, seed=4)).abs().mean() > 1e-3  # seed matters
    for H, W in ((1, 1), (3, 5)):                                            # tiny inputs are padded
        assert sample.upscale(_smp_lr(H, W), net, vae, cond).shape == (1, 3, 4 * H, 4 * W)
    # AdaIN: per-channel mean / std of the (unclamped) result equal the upsampled LR's
    ref = torch.nn.functional.interpolate(x, scale_factor=4, mode="bicubic").clamp(0, 1)
    raw = sample.upscale(x, net, vae, cond, color_fix="none")
    fixed = sample.adain_color_fix(raw, ref)
    assert torch.allclose(fixed.mean((2, 3)), ref.mean((2, 3)), atol=1e-5)
    assert torch.allclose(fixed.std((2, 3)), ref.std((2, 3)), atol=1e-4)
    # wavelet: a colour shift (pure low frequency) is removed, texture (high frequency) is kept
    tex = 0.05 * torch.sign(torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
    base = _smp_lr(64, 64)
    out = sample.wavelet_color_fix(base + tex + 0.2, base)
    assert (out - base).mean().abs() < 0.01 and (out - base - tex).abs().mean() < 0.5 * tex.abs().mean()


def _smp_folder(d):
    """A folder with every kind of input, plus one corrupt file."""
    Image.fromarray(_smp_u8(37, 53, 3)).save(d / "odd.png")
    Image.fromarray(_smp_u8(12, 10, 1)[..., 0]).save(d / "gray.png")
    Image.fromarray(_smp_u8(10, 12, 4)).save(d / "rgba.png")
    Image.fromarray(_smp_u8(8, 8, 3)).convert("P").save(d / "pal.png")
    Image.fromarray(_smp_u8(1, 1, 3)).save(d / "one.bmp")
    Image.fromarray(_smp_u8(16, 16, 3)).save(d / "photo.jpg", quality=90)
    Image.fromarray(_smp_u16(9, 7, 1)[..., 0]).save(d / "gray16.png")
    if importlib.util.find_spec("png"):                           # 16-bit colour PNG needs pypng
        images.save_image(d / "rgb16.png", torch.rand(3, 6, 10), bits=16)
    (d / "bad.png").write_bytes((d / "odd.png").read_bytes()[:200])


def test_sample_folder_keeps_modes_and_survives_a_corrupt_file(_smp_models, tmp_path, capsys):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    _smp_folder(src)
    rc = sample.main([str(src), "-o", str(out), "--ckpt", str(_smp_models / "student.safetensors")])
    err = capsys.readouterr().err
    assert rc == 1 and "bad.png" in err and err.count("error:") == 1
    want = {"odd.png": ((212, 148), "RGB"), "gray.png": ((40, 48), "L"), "rgba.png": ((48, 40), "RGBA"),
            "pal.png": ((32, 32), "RGB"), "one.bmp": ((4, 4), "RGB"), "photo.jpg": ((64, 64), "RGB"),
            "gray16.png": ((28, 36), "I;16")}
    for name, (size, mode) in want.items():
        stem, ext = os.path.splitext(name)
        with Image.open(out / f"{stem}_mfsr{ext}") as im:
            assert (im.size, im.mode) == (size, mode), name
    if (src / "rgb16.png").exists():
        rgb16 = images.load_image(out / "rgb16_mfsr.png")
        assert rgb16.bits == 16 and rgb16.size == (24, 40) and not rgb16.gray
        # 16 bits are really used: values off the 8-bit grid
        assert (rgb16.rgb * 255 - (rgb16.rgb * 255).round()).abs().max() > 0.01
    # alpha is the input's alpha upscaled bicubic, not touched by the model
    a_in = torch.from_numpy(np.asarray(Image.open(src / "rgba.png"), dtype=np.float32)[..., 3] / 255)
    a_out = np.asarray(Image.open(out / "rgba_mfsr.png"), dtype=np.float32)[..., 3] / 255
    up = torch.nn.functional.interpolate(a_in[None, None], scale_factor=4, mode="bicubic").clamp(0, 1)[0, 0]
    assert np.abs(a_out - up.numpy()).max() <= 0.5 / 255 + 1e-6
    assert sorted(os.listdir(src)) == sorted(["odd.png", "gray.png", "rgba.png", "pal.png", "one.bmp", "photo.jpg",
                                              "gray16.png", "bad.png"]
                                             + (["rgb16.png"] if importlib.util.find_spec("png") else []))


def test_sample_never_overwrites_an_input_and_checks_the_checkpoint(_smp_models, tmp_path, capsys):
    Image.fromarray(_smp_u8(8, 8, 3)).save(tmp_path / "a.png")
    before = (tmp_path / "a.png").read_bytes()
    ck = ["--ckpt", str(_smp_models / "student.safetensors")]
    rc = sample.main([str(tmp_path / "a.png"), "-o", str(tmp_path), "--suffix", "", "--ext", "png"] + ck)
    assert rc == 1 and "refusing to write over an input" in capsys.readouterr().err
    assert (tmp_path / "a.png").read_bytes() == before and sorted(os.listdir(tmp_path)) == ["a.png"]
    # an output folder that cannot be made (its parent is a file): one line naming it, exit code 2
    rc = sample.main([str(tmp_path / "a.png"), "-o", str(tmp_path / "a.png" / "out")] + ck)
    err = capsys.readouterr().err
    assert rc == 2 and "cannot create the output folder" in err and "a.png/out" in err and "Traceback" not in err
    assert (tmp_path / "a.png").read_bytes() == before
    # a one-time model is not a student: clear error, exit code 2, nothing written
    rc = sample.main([str(tmp_path / "a.png"), "--ckpt", str(_smp_models / "teacher.safetensors")])
    assert rc == 2 and "not an MFSR student" in capsys.readouterr().err
    # with --teacher it runs as the Euler + CFG sampler (2 steps here), output x4
    rc = sample.main([str(tmp_path / "a.png"), "--teacher", "--steps", "2", "--ckpt",
                      str(_smp_models / "teacher.safetensors")])
    assert rc == 0 and Image.open(tmp_path / "a_mfsr.png").size == (32, 32)
    assert "2 steps" in capsys.readouterr().out


def test_sample_defaults_come_from_the_checkpoint_then_dit4sr(_smp_models, tmp_path, monkeypatch):
    Image.fromarray(_smp_u8(8, 8, 3)).save(tmp_path / "a.png")
    seen = []
    monkeypatch.setattr(sample, "upscale", lambda img, *a, **kw: (seen.append(kw), img.repeat(1, 1, 4, 4))[1])
    student = checkpoints.load_transformer(str(_smp_models / "student.safetensors"))
    assert student.sampling == {}                                      # nothing recorded: DiT4SR's tiles
    teacher = checkpoints.load_transformer(str(_smp_models / "teacher.safetensors"))
    student.sampling = {"tile": 6, "tile_overlap": 2, "start": 0.7}
    teacher.sampling = {"tile": 8, "tile_overlap": 4, "cfg": 1.5, "shift": 1.0}
    for name, net in (("s", student), ("t", teacher)):
        checkpoints.save_transformer(net, str(tmp_path / f"{name}.safetensors"))
    shutil.copy(_smp_models / "vae.safetensors", tmp_path / "vae.safetensors")
    run = lambda *a: sample.main([str(tmp_path / "a.png"), "-o", str(tmp_path / "out"), *a])   # noqa: E731
    assert run("--ckpt", str(_smp_models / "student.safetensors")) == 0
    assert run("--ckpt", str(tmp_path / "s.safetensors")) == 0
    assert run("--ckpt", str(tmp_path / "s.safetensors"), "--tile", "10", "--tile-overlap", "0") == 0
    assert run("--ckpt", str(tmp_path / "s.safetensors"), "--start-time", "0") == 0      # the paper's, one flag away
    assert run("--ckpt", str(tmp_path / "t.safetensors"), "--teacher", "--steps", "1") == 0
    assert run("--ckpt", str(tmp_path / "t.safetensors"), "--teacher", "--steps", "1", "--cfg", "7") == 0
    assert run("--ckpt", str(tmp_path / "t.safetensors"), "--teacher", "--steps", "1", "--cfg-scale", "3") == 0
    assert run("--ckpt", str(tmp_path / "t.safetensors"), "--teacher", "--steps", "1", "--shift", "2") == 0
    got = [(kw["tile"], kw["tile_overlap"], kw["cfg"], kw["shift"], kw["start"]) for kw in seen]
    assert got == [(64, 24, 8.0, 3.0, 0.0), (6, 2, 8.0, 3.0, 0.7), (10, 0, 8.0, 3.0, 0.7), (6, 2, 8.0, 3.0, 0.0),
                   (8, 4, 1.5, 1.0, 0.0), (8, 4, 7.0, 1.0, 0.0), (8, 4, 3.0, 1.0, 0.0), (8, 4, 1.5, 2.0, 0.0)]
    for bad in (["--teacher", "--shift", "0"], ["--start-time", "1"], ["--start-time", "-0.1"]):
        with pytest.raises(SystemExit):
            sample.parse_args([str(tmp_path / "a.png"), *bad])


def test_upscale_samples_the_teacher_on_the_grid_of_its_shift(_smp_models, monkeypatch):
    net, vae = sample.load_models(str(_smp_models / "teacher.safetensors"), teacher=True)
    cond = mfsr.Cond(None, torch.zeros(1, net.cfg.pooled_dim), torch.zeros(1, 4, net.cfg.context_dim))
    seen = []
    real = mfsr.sample_teacher
    monkeypatch.setattr(mfsr, "sample_teacher", lambda *a, **kw: (seen.append(kw["shift"]), real(*a, **kw))[1])
    img = torch.rand(1, 3, 8, 8)
    a, b = (sample.upscale(img, net, vae, cond, 3, teacher=True, cfg=1.0, shift=s, tile=8, tile_overlap=4)
            for s in (1.0, 3.0))
    assert seen == [1.0, 3.0] and not torch.allclose(a, b)


# ---- sample.py: the inputs and situations a new user hits


def test_sample_reads_gif_ppm_and_animated_files_and_checks_the_output_before_computing(_smp_models, tmp_path, capsys,
                                                                                      monkeypatch):
    src = tmp_path / "in"
    src.mkdir()
    frames = [Image.fromarray(_smp_u8(8, 8, 3, seed=k)) for k in range(3)]
    frames[0].save(src / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    Image.fromarray(_smp_u8(8, 12, 3)).save(src / "still.ppm")
    ck = ["--ckpt", str(_smp_models / "student.safetensors")]
    assert sample.main([str(src), "-o", str(tmp_path / "out")] + ck) == 0
    out, err = capsys.readouterr()
    assert sorted(os.listdir(tmp_path / "out")) == ["anim_mfsr.png", "still_mfsr.png"]   # PNG, as --ext auto says
    assert Image.open(tmp_path / "out" / "still_mfsr.png").size == (48, 32)
    assert "note:" in err and "anim.gif: animated, 3 frames: the first is used" in err and out.count(" -> ") == 2
    # the first frame is what was upscaled: same result as that frame saved alone
    frames[0].convert("RGB").save(tmp_path / "first.png")
    assert sample.main([str(tmp_path / "first.png"), "-o", str(tmp_path / "out")] + ck) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "first_mfsr.png")),
                          np.asarray(Image.open(tmp_path / "out" / "anim_mfsr.png")))
    # an output that cannot be written is refused before any compute
    monkeypatch.setattr(sample, "upscale", lambda *a, **k: pytest.fail("computed before checking the output"))
    with pytest.raises(SystemExit):                                     # --ext ppm: a format only read
        sample.main([str(src / "still.ppm"), "-o", str(src), "--suffix", "", "--ext", "ppm"] + ck)
    assert "--ext ppm: choose from" in capsys.readouterr().err
    Image.fromarray(_smp_u8(8, 8, 3)).save(tmp_path / "a.png")
    rc = sample.main([str(tmp_path / "a.png"), "--suffix", ""] + ck)
    assert rc == 1 and "refusing to write over an input" in capsys.readouterr().err


@pytest.mark.parametrize("device", ["cuda", "cuda:3", "mps", "foo"])
def test_sample_unusable_device_is_one_line(device, tmp_path, capsys):
    if device.startswith("cuda") and torch.cuda.device_count() > int(device[5:] or 0):
        pytest.skip("this machine has that GPU")
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    Image.fromarray(_smp_u8(8, 8, 3)).save(tmp_path / "a.png")
    assert sample.main([str(tmp_path / "a.png"), "--device", device]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--device {device}" in err and "cpu" in err and "Traceback" not in err
    assert os.listdir(tmp_path) == ["a.png"]


def test_sample_ctrl_c_exits_130_with_one_line_and_no_partial_output(_smp_models, tmp_path, capsys, monkeypatch):
    for name in ("a.png", "b.png"):
        Image.fromarray(_smp_u8(8, 8, 3)).save(tmp_path / name)
    real, calls = sample.upscale, []

    def interrupted(*a, **k):        # the first image finishes, Ctrl-C arrives during the second
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(sample, "upscale", interrupted)
    rc = sample.main([str(tmp_path / "a.png"), str(tmp_path / "b.png"), "--ckpt", str(_smp_models / "student.safetensors")])
    err = capsys.readouterr().err
    assert rc == 130 and "interrupted: 1 output(s) written" in err and "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == ["a.png", "a_mfsr.png", "b.png"]      # no temporary files left


def test_sample_long_work_shows_tiles_elapsed_eta_and_where_the_time_went(_smp_models, tmp_path, capsys, monkeypatch):
    Image.fromarray(_smp_u8(24, 24, 3)).save(tmp_path / "a.png")     # latent 24 x 24 (x4, VAE /4)
    monkeypatch.setattr(sample, "PROGRESS_AFTER", 0.0)                # report from the first tile
    rc = sample.main([str(tmp_path / "a.png"), "--steps", "2", "--tile", "8", "--tile-overlap", "4",
                      "--ckpt", str(_smp_models / "student.safetensors")])
    out, err = capsys.readouterr()
    tiles = len(tiling.tile_starts(24, 8, 4)) ** 2
    lines = [line for line in err.splitlines() if "tiles " in line]
    assert rc == 0 and lines and lines[-1].startswith(f"{tmp_path / 'a.png'}: tiles {2 * tiles}/{2 * tiles}, ")
    assert all("ETA" in line for line in lines) and len(lines) <= 11      # every 10 % on a non-terminal
    assert "VAE encode" in out and "network" in out and "VAE decode" in out and "peak" in out
    # on a terminal: one bar redrawn in place
    class Tty(io.StringIO):
        def isatty(self):
            return True
    stream = Tty()
    p = cli.Progress("x.png", stream, after=0.0)
    p.phase("network", calls=4)
    for _ in range(4):
        p.tile()
    p.phase(None)
    assert stream.getvalue().count("\r[") == 4 and "tiles 4/4" in stream.getvalue() and stream.getvalue().endswith("\n")


def test_sample_same_file_named_twice_is_one_input(_smp_models, tmp_path, capsys, monkeypatch):
    Image.fromarray(_smp_u8(8, 8, 3)).save(tmp_path / "a.png")
    monkeypatch.chdir(tmp_path)
    rc = sample.main(["a.png", "./a.png", str(tmp_path / "a.png"), ".", "--ckpt", str(_smp_models / "student.safetensors")])
    out, err = capsys.readouterr()
    assert rc == 0 and out.count(" -> ") == 1 and "error" not in err


def test_sample_small_tile_scales_the_recorded_overlap_and_help_shows_the_shipped_defaults(tmp_path, capsys, monkeypatch):
    Image.fromarray(_smp_u8(16, 16, 3)).save(tmp_path / "a.png")
    rec = checkpoints.load_transformer(str(_SHIP / "student.safetensors")).sampling
    assert rec["tile"] > 4 and rec["tile_overlap"] >= 4                 # as recorded, 4 would be refused
    assert sample.main([str(tmp_path / "a.png"), "--tile", "4"]) == 0
    err = capsys.readouterr().err                                       # 4 / 32 of 4 rounds to 0: one patch kept
    assert "--tile 4: tile overlap 2" in err and f"the model's {rec['tile_overlap']} for tile {rec['tile']}" in err
    with pytest.raises(SystemExit):
        sample.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"the shipped model records {rec['tile']}" in text and f"the shipped model records {rec['tile_overlap']}" in text
    monkeypatch.setattr(sample, "SHIPPED", str(tmp_path / "absent"))   # without the shipped files --help still works
    with pytest.raises(SystemExit):
        sample.parse_args(["--help"])
    assert "--tile-overlap" in capsys.readouterr().out


def test_sample_prompt_and_prompt_file_through_the_text_encoders(_txt_pipeline, tmp_path, capsys):
    """tools/text.py --prompt / --prompt-file --out, then sample.py --emb: the same text gives the same
    image, another text another image; unreadable prompt files and a conflicting pair of flags are refused."""
    root, _, _ = _txt_pipeline
    torch.manual_seed(0)
    cfg = replace(model.CONFIGS["tiny"], context_dim=224, pooled_dim=64)   # the fixture encoders' widths
    student = model.make_student(model.MMDiT(cfg), lora_rank=4)
    model.merge_lora(student)
    checkpoints.save_transformer(student, str(tmp_path / "student.safetensors"))
    checkpoints.save_vae(V.VAE(V.CONFIGS["tiny"]), str(tmp_path / "vae.safetensors"))
    Image.fromarray(_smp_u8(16, 16, 3)).save(tmp_path / "in.png")
    (tmp_path / "fox.txt").write_text("a red fox in snow\n", encoding="utf-8")
    (tmp_path / "cat.txt").write_text("a grey cat", encoding="utf-8")
    common = [str(tmp_path / "in.png"), "--ckpt", str(tmp_path / "student.safetensors")]

    def run(name, *flags):
        emb = str(tmp_path / name / "prompt.safetensors")
        text.main(["--encoders", root, "--out", emb, *flags])
        assert sample.main(common + ["-o", str(tmp_path / name), "--emb", emb]) == 0
        return _png(tmp_path / name / "in_mfsr.png")

    fox_file, fox_text = run("a", "--prompt-file", str(tmp_path / "fox.txt")), run("b", "--prompt", "a red fox in snow")
    cat = run("c", "--prompt-file", str(tmp_path / "cat.txt"))
    assert f"prompt: {tmp_path / 'c' / 'prompt.safetensors'}" in capsys.readouterr().out
    assert torch.equal(fox_file, fox_text) and fox_file.shape == (1, 3, 64, 64)
    assert (fox_file - cat).abs().max() > 1e-3
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    for flags, msg in ((["--prompt-file", str(tmp_path / "latin1.txt")], "latin1.txt: cannot read it as UTF-8"),
                       (["--prompt-file", str(tmp_path / "absent.txt")], "absent.txt: cannot read it"),
                       (["--prompt-file", str(tmp_path / "fox.txt"), "--prompt", "x"], "not both")):
        with pytest.raises(SystemExit):
            text.main(["--encoders", root, "--out", str(tmp_path / "x.safetensors"), *flags])
        assert msg in capsys.readouterr().err


def test_peak_memory_is_nan_where_the_system_has_no_proc(monkeypatch):
    """macOS / Windows have no /proc/self/status: the summary line says nan, the image is not failed."""
    def no_proc(path, *a, **k):
        raise FileNotFoundError(path)
    assert cli.peak_memory_mb(torch.device("cpu")) > 0
    monkeypatch.setattr(cli, "open", no_proc, raising=False)
    assert math.isnan(cli.peak_memory_mb(torch.device("cpu")))


def test_load_models_folds_a_files_lora_in_with_the_same_output(tmp_path):
    """A student file that keeps its LoRA apart (train.py's trainable layout) samples with the LoRA
    merged into its linears: no LoRA layer left, the same output as the file's unmerged network."""
    torch.manual_seed(0)
    student = model.make_student(model.MMDiT(model.CONFIGS["tiny"]), lora_rank=4)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if "lora" in name or "s_embedder" in name:
                p.add_(torch.randn_like(p) * 0.05)
    checkpoints.save_transformer(student, str(tmp_path / "student.safetensors"))
    checkpoints.save_vae(V.VAE(V.CONFIGS["tiny"]), str(tmp_path / "vae.safetensors"))
    unmerged = checkpoints.load_transformer(str(tmp_path / "student.safetensors")).eval()
    assert unmerged.lora
    net, _ = sample.load_models(str(tmp_path / "student.safetensors"))
    assert net.lora is None and not any(isinstance(m, model.LoRALinear) for m in net.modules())
    g = torch.Generator().manual_seed(1)
    z = torch.randn(1, 16, 8, 8, generator=g)
    args = (z, torch.full((1,), 0.7), torch.randn(1, 32, generator=g), torch.randn(1, 3, 64, generator=g))
    with torch.no_grad():
        torch.testing.assert_close(net(*args, lr=z, sigma_s=torch.full((1,), 0.2)),
                                   unmerged(*args, lr=z, sigma_s=torch.full((1,), 0.2)), rtol=1e-5, atol=1e-5)
