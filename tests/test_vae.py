"""Tests of vae.py: the SD3 VAE's structure and key names, equivalence with diffusers, files, tiling and precision."""

import json
import re
from dataclasses import asdict, replace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import vae as V
from plumbing import checkpoints, tiling
from builders import ROOT, save_vae_diffusers, vae_diffusers_config, vae_diffusers_name, vae_diffusers_state_dict
from plumbing.checkpoints import CheckpointError


_VAE_KEYS = ROOT / "reference" / "keys"


# same structure as "sd3" (4 levels, 2 / 3 blocks, 32 groups, 16 latents), narrow enough for CI
_VAE_NARROW = V.VAEConfig(channels=(32, 64, 64, 64))


def _vae_manifest(name):
    return json.loads((_VAE_KEYS / name).read_text())


def _vae_count(m):
    return sum(p.numel() for p in m.parameters())


def _vae_image(size, seed=0):
    """A smooth image in [-1, 1] with a little noise: closer to a photo than white noise."""
    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.rand(1, 3, size // 16, size // 16, generator=g) * 2 - 1, size=(size, size),
                      mode="bicubic", align_corners=False)
    return (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(-1, 1)


def _vae_perturb(module, seed=0):
    """Random norm weights and biases too (defaults are 1 and 0), so a wrong mapping shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return module


# --------------------------------------------------------------------------------------------
# structure and key names


def test_vae_full_size_keys_shapes_and_counts_equal_the_manifest():
    with torch.device("meta"):
        vae = V.VAE(V.CONFIGS["sd3"])
    ours = {k: list(v.shape) for k, v in vae.state_dict().items()}
    ref = {k.removeprefix("first_stage_model."): v for k, v in _vae_manifest("keys_sd3_vae.json").items()}
    assert ours == ref
    assert (_vae_count(vae), _vae_count(vae.encoder), _vae_count(vae.decoder)) == (83_819_683, 34_274_208, 49_545_475)


def test_vae_diffusers_names_equal_the_diffusers_manifest_and_invert():
    with torch.device("meta"):
        sd = V.VAE(V.CONFIGS["sd3"]).state_dict()
    ours = {k: list(v.shape) for k, v in vae_diffusers_state_dict(sd, 4).items()}
    assert ours == _vae_manifest("keys_sd3_vae_diffusers.json")
    assert all(checkpoints.from_diffusers_name(vae_diffusers_name(k, 4), 4) == k for k in sd)
    assert vae_diffusers_name("decoder.up.3.upsample.conv.weight", 4) == "decoder.up_blocks.0.upsamplers.0.conv.weight"


def test_vae_tiny_is_x4_with_16_latent_channels():
    torch.manual_seed(0)
    vae = V.VAE(V.CONFIGS["tiny"]).eval()
    with torch.no_grad():
        z = vae.encode(_vae_image(32))
        y = vae.decode(z)
    assert z.shape == (1, 16, 8, 8) and y.shape == (1, 3, 32, 32)
    assert y.abs().max() <= 1
    # every convolution of the patch VAE runs at latent resolution
    shapes = []
    hooks = [m.register_forward_hook(lambda m, i, o: shapes.append(o.shape[-2:]))
             for m in vae.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        vae.decode(vae.encode(_vae_image(32)))
    for h in hooks:
        h.remove()
    assert len(shapes) > 10 and set(shapes) == {(8, 8)}


# --------------------------------------------------------------------------------------------
# equivalence with diffusers.AutoencoderKL (test-only reference)


def _vae_diffusers_pair(cfg, tmp_path, route):
    """(diffusers AutoencoderKL, our VAE) holding the same random weights, ours loaded through
    route "diffusers" (our loader on a diffusers folder) or "single_file" (our original-layout
    export read by diffusers' own converter)."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    cfg_dir = tmp_path / "cfg"
    cfg_dir.mkdir()
    (cfg_dir / "config.json").write_text(json.dumps(vae_diffusers_config(cfg)))
    if route == "diffusers":
        ref = _vae_perturb(diffusers.AutoencoderKL.from_config(diffusers.AutoencoderKL.load_config(cfg_dir)))
        ref.save_pretrained(tmp_path / "vae")
        ours = checkpoints.load_vae(str(tmp_path / "vae"))
    else:
        ours = _vae_perturb(V.VAE(cfg))
        checkpoints.save_vae(ours, str(tmp_path / "vae.safetensors"))
        ref = diffusers.AutoencoderKL.from_single_file(str(tmp_path / "vae.safetensors"), config=str(cfg_dir),
                                                       local_files_only=True)
    assert ours.cfg == cfg
    return ref.eval(), ours.eval()


def _vae_compare(ref, ours, size):
    x = _vae_image(size, seed=1)
    z = torch.randn(1, 16, size // 8, size // 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        post = ref.encode(x).latent_dist
        mean, logvar = ours.moments(x)
        sample = ours.encode(x, torch.Generator().manual_seed(3), sample=True)
        ref_sample = post.sample(torch.Generator().manual_seed(3))
        image, ref_image = ours.decoder(z), ref.decode(z).sample
        decoded = ours.decode((z - 0.0609) * 1.5305)
    # 2e-5 per unit of each output's range: fp32 rounding through the encoder grows with the values
    # and with fewer threads (on 1 thread: 1.2e-5 on a mean of size 1.3; on 2: 6e-6)
    close = lambda a, ref: (a - ref).abs().max() < 2e-5 * max(1.0, ref.abs().max().item())   # noqa: E731
    assert close(mean, post.mean) and close(logvar, post.logvar)
    assert close(sample / 1.5305 + 0.0609, ref_sample)     # in the VAE's space, as the moments
    # 1e-5 per unit of the decoder's output range: with random full-width weights the raw output
    # reaches 2.5 and fp32 rounding grows with it (vae.py runs channels-last; diffusers' own decoder
    # moves 1.2e-5 between the NCHW and channels-last layouts on this case)
    tol = 1e-5 * max(1.0, ref_image.abs().max().item())
    assert (image - ref_image).abs().max() < tol
    assert (decoded - ref_image.clamp(-1, 1)).abs().max() < tol
    assert ref_image.abs().mean() > 0.05 and post.mean.std() > 0.01   # not a trivially zero output


@pytest.mark.parametrize("route,mid_attn", [("diffusers", True), ("single_file", True), ("diffusers", False)])
def test_vae_matches_diffusers_autoencoderkl(route, mid_attn, tmp_path):
    _vae_compare(*_vae_diffusers_pair(replace(_VAE_NARROW, mid_attn=mid_attn), tmp_path, route), 64)


@pytest.mark.slow
def test_vae_full_width_matches_diffusers_on_64px(tmp_path):
    _vae_compare(*_vae_diffusers_pair(V.CONFIGS["sd3"], tmp_path, "diffusers"), 64)


# --------------------------------------------------------------------------------------------
# loading, saving, bad files


# the SD3 structure at x4 (three levels; the shipped tiny VAE has one, on 4 x 4 patches), so the
# tests below reach the down / up-sampling levels, and diffusers can read it
_VAE_X4 = V.CONFIGS["x4"]


def _vae_tiny(seed=0, mid_attn=True, cfg=_VAE_X4):
    """A small random VAE (with the mid attention by default, so tests reach that code too)."""
    torch.manual_seed(seed)
    return _vae_perturb(V.VAE(replace(cfg, mid_attn=mid_attn)).eval(), seed)


def test_vae_patch_config_round_trips_and_is_read_from_shapes(tmp_path):
    """The shipped (patch) VAE: saved and loaded with its config; a bare file without metadata is
    read as RGB 4 x 4 patches from the linear code's shape; diffusers cannot hold it."""
    vae = _vae_tiny(mid_attn=False, cfg=V.CONFIGS["tiny"])
    checkpoints.save_vae(vae, str(tmp_path / "own.safetensors"))
    save_file(dict(vae.state_dict()), str(tmp_path / "bare.safetensors"))
    for name, kw in (("own.safetensors", {}), ("bare.safetensors", {"groups": 8})):
        back = checkpoints.load_vae(str(tmp_path / name), **kw)
        assert back.cfg.patch == 4 and back.cfg.image_channels == 3 and _vae_same(back, vae), name
        if name == "own.safetensors":
            assert back.cfg == vae.cfg
    with pytest.raises(ValueError, match="no patch"):
        save_vae_diffusers(vae, str(tmp_path / "pipe"))
    assert not (tmp_path / "pipe").exists()                       # refused before writing anything


def _vae_same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("mid_attn", [True, False])
def test_vae_save_load_round_trips_in_every_layout(tmp_path, mid_attn):
    vae = _vae_tiny(mid_attn=mid_attn)
    checkpoints.save_vae(vae, str(tmp_path / "own.safetensors"))
    save_vae_diffusers(vae, str(tmp_path / "pipe" / "vae"))
    sd = {"first_stage_model." + k: v for k, v in vae.state_dict().items()}
    sd["model.diffusion_model.x_embedder.proj.bias"] = torch.zeros(4)       # an SD3.5 single file
    save_file(sd, str(tmp_path / "single.safetensors"))
    for path in ("own.safetensors", "pipe", "pipe/vae", "pipe/vae/diffusion_pytorch_model.safetensors",
                 "single.safetensors"):
        # a single file has no metadata: GroupNorm groups cannot be read from shapes (SD3's 32 unless told)
        back = checkpoints.load_vae(str(tmp_path / path), **({"groups": vae.cfg.groups} if path.startswith("single") else {}))
        assert back.cfg == vae.cfg, path
        assert _vae_same(back, vae), path
    assert not list(tmp_path.rglob("*.tmp*"))   # atomic writes leave nothing behind


def test_vae_reads_older_diffusers_attention_names(tmp_path):
    """Older diffusers files name the mid attention query / key / value / proj_attn (not to_q ...)."""
    vae = _vae_tiny()
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    sd = {re.sub(r"attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.", lambda m: f"attentions.0.{old[m[1]]}.", k): v
          for k, v in vae_diffusers_state_dict(vae.state_dict(), 3).items()}
    assert any(".attentions.0.query." in k for k in sd)
    save_file(sd, str(tmp_path / "diffusion_pytorch_model.safetensors"), metadata={"vae_config": '{"groups": 8}'})
    assert _vae_same(checkpoints.load_vae(str(tmp_path)), vae)


def test_vae_mixed_precision_file_is_cast_on_load(tmp_path):
    vae = _vae_tiny()
    sd = {k: (v.half() if i % 2 else v) for i, (k, v) in enumerate(vae.state_dict().items())}
    save_file(sd, str(tmp_path / "mixed.safetensors"), metadata={"vae_config": json.dumps(asdict(vae.cfg))})
    back = checkpoints.load_vae(str(tmp_path / "mixed.safetensors"))
    assert {p.dtype for p in back.parameters()} == {torch.float32}
    assert (back.encoder.conv_in.weight - vae.encoder.conv_in.weight).abs().max() < 1e-3
    bf16 = checkpoints.load_vae(str(tmp_path / "mixed.safetensors"), dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}


def test_vae_bad_files_give_clear_errors(tmp_path):
    vae = _vae_tiny()
    sd = dict(vae.state_dict())
    good = tmp_path / "good.safetensors"
    save_file(sd, str(good))
    cases = {}
    save_file({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": torch.zeros(6, 2)},
              str(tmp_path / "transformer.safetensors"))
    cases["transformer.safetensors"] = "transformer checkpoint"
    (tmp_path / "truncated.safetensors").write_bytes(good.read_bytes()[:5000])
    cases["truncated.safetensors"] = "not a readable safetensors file"
    save_file({**sd, "quant_conv.weight": torch.zeros(8, 8, 1, 1)}, str(tmp_path / "quant.safetensors"))
    cases["quant.safetensors"] = "quant convs"
    save_file({k: v for k, v in sd.items() if k != "decoder.up.1.block.0.conv2.bias"},
              str(tmp_path / "missing.safetensors"))
    cases["missing.safetensors"] = "missing (1): decoder.up.1.block.0.conv2.bias"
    save_file({**sd, "decoder.mid.block_1.conv1.weight": torch.zeros(64, 64, 1, 1)}, str(tmp_path / "misshapen.safetensors"))
    cases["misshapen.safetensors"] = "decoder.mid.block_1.conv1.weight: file (64, 64, 1, 1) vs model (64, 64, 3, 3)"
    save_file({**_vae_tiny(mid_attn=False).state_dict(), "decoder.mid.attn_1.q.weight": torch.zeros(64, 64, 1, 1)},
              str(tmp_path / "half_attn.safetensors"))     # attention in the decoder only
    cases["half_attn.safetensors"] = "unexpected (1): decoder.mid.attn_1.q.weight"
    torch.save(sd, str(tmp_path / "vae.ckpt"))
    cases["vae.ckpt"] = "only .safetensors"
    for name, needle in cases.items():
        with pytest.raises(CheckpointError) as e:
            checkpoints.load_vae(str(tmp_path / name))
        assert name in str(e.value) and needle in str(e.value), (name, str(e.value))


def test_vae_groups_that_a_bare_file_cannot_tell_give_a_clear_error(tmp_path):
    torch.manual_seed(0)
    odd = V.VAE(V.VAEConfig(channels=(24, 48), enc_blocks=1, dec_blocks=2, groups=8))
    save_file(dict(odd.state_dict()), str(tmp_path / "bare.safetensors"))   # no metadata: groups unknown
    with pytest.raises(CheckpointError, match="bare.safetensors: GroupNorm groups 32 do not divide"):
        checkpoints.load_vae(str(tmp_path / "bare.safetensors"))
    assert _vae_same(checkpoints.load_vae(str(tmp_path / "bare.safetensors"), groups=8), odd)


# --------------------------------------------------------------------------------------------
# tiling


def _vae_band_ratio(err, starts, tile, r):
    """Mean error within 2 output pixels of an inner tile edge, over the mean error elsewhere,
    along the width: a seam would show as a ratio well above 1."""
    prof = err.mean(dim=(0, 1, 2))                                         # (W,)
    edges = {round(s * r) for s in starts if s > 0} | {round((s + tile) * r) for s in starts}
    mask = torch.zeros(prof.numel(), dtype=torch.bool)
    for e in edges - {prof.numel()}:
        mask[max(e - 2, 0):e + 2] = True
    return (prof[mask].mean() / prof[~mask].mean()).item()


def _vae_tiled_errors(kind, tile_norm, cfg=_VAE_X4):
    vae = _vae_tiny(cfg=cfg)
    x = _vae_image(256)
    with torch.no_grad():
        if kind == "encode":
            ref = vae.encode(x)
            out = tiling.encode(vae, x, tile=128, overlap=32, tile_norm=tile_norm)
            starts, tile, r = tiling.tile_starts(256, 128, 32), 128, 1 / 4
        else:
            z = vae.encode(x)
            ref = vae.decode(z, clamp=False)
            out = tiling.decode(vae, z, tile=32, overlap=8, tile_norm=tile_norm, clamp=False)
            starts, tile, r = tiling.tile_starts(64, 32, 8), 32, 4
    err = (out - ref).abs()
    return err.max().item(), err.mean().item() / ref.abs().mean().item(), _vae_band_ratio(err, starts, tile, r)


def test_vae_outputs_are_plain_contiguous_tensors():
    """vae.py computes channels-last; what it returns is NCHW-contiguous, tiled or not, so the
    layout never leaks (a latent cached to disk and read back must equal the one kept in memory)."""
    vae = _vae_tiny()
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert all(t.is_contiguous() for t in vae.moments(x))
        for tile in (0, 32, 64):   # untiled, 2 x 2 tiles, one tile through run_tiled
            z = tiling.encode(vae, x, tile=tile)
            y = tiling.decode(vae, z, tile=tile // 4)
            assert z.is_contiguous() and y.is_contiguous(), tile


@pytest.mark.parametrize("kind,max_bound,rel_mean_bound,band_bound,cfg", [
    ("encode", 0.65, 0.09, 1.5, _VAE_X4), ("decode", 0.65, 0.12, 1.5, _VAE_X4),
    ("encode", 0.2, 0.03, 2.5, V.CONFIGS["tiny"]), ("decode", 0.3, 0.03, 1.5, V.CONFIGS["tiny"])])
def test_vae_tiled_is_close_to_untiled_without_seams(kind, max_bound, rel_mean_bound, band_bound, cfg):
    """Bounds measured on random small weights (docs/modules.md): 3 x 3 tiles on 256 px,
    where per-tile GroupNorm statistics ("local") are clearly worse than shared ones. Measured:
    x4 structure encode max 0.26, mean 3.4 %, border / elsewhere 1.49; decode 0.33, 5.7 %, 0.92;
    the patch VAE encode 0.13, 1.6 %, 1.86 (a ratio of a smaller error: its 32 px overlap is only
    8 latents against 3 convolutions; sample.py tiles overlap 128 px); decode 0.22, 1.9 %, 0.99."""
    worst, rel_mean, band = _vae_tiled_errors(kind, "tiles", cfg)
    _, rel_mean_local, _ = _vae_tiled_errors(kind, "local", cfg)
    print(f"{kind}: max {worst:.3f}, mean/|ref| {rel_mean:.4f} (local {rel_mean_local:.4f}), border/else {band:.2f}")
    assert worst < max_bound and rel_mean < rel_mean_bound
    assert rel_mean < 0.8 * rel_mean_local
    assert band < band_bound


def test_vae_tile_plan_is_automatic_above_the_limit():
    sd3, tiny = V.CONFIGS["sd3"], V.CONFIGS["tiny"]
    plan = lambda cfg, H, W, tile=None: tiling.tile_plan(cfg, H, W, tile, None, 512, 128, 8)   # noqa: E731
    assert plan(sd3, 1024, 1024) is None                      # 1024 * 1024 * 128 first-level elements: the limit
    assert plan(sd3, 1024, 1032) == (512, 128)
    # the patch VAE's first level works at latent resolution (4 x 4 patches, 64 channels)
    assert plan(tiny, 4096, 8192) is None and plan(tiny, 4096, 8200) == (512, 128)
    assert plan(sd3, 4096, 4096, tile=0) is None
    assert plan(sd3, 64, 64, tile=256) == (256, 64)
    with pytest.raises(ValueError, match="multiples of 8"):
        plan(sd3, 64, 64, tile=100)


def test_vae_tiled_by_default_above_the_limit_and_left_plain(monkeypatch):
    """tiling.encode / decode tile by themselves above TILE_AUTO_ELEMENTS (here made 0), with the
    default tiles; afterwards the VAE's modules are plain again (no hidden body or forward left)."""
    vae = _vae_tiny()
    x = _vae_image(64)
    monkeypatch.setattr(tiling, "TILE_AUTO_ELEMENTS", 0)
    for name, value in (("ENCODE_TILE", 32), ("ENCODE_OVERLAP", 8), ("DECODE_TILE", 8), ("DECODE_OVERLAP", 2)):
        monkeypatch.setattr(tiling, name, value)
    with torch.no_grad():
        z = tiling.encode(vae, x)
        assert torch.equal(z, tiling.encode(vae, x, tile=32, overlap=8)) and not torch.equal(z, vae.encode(x))
        y = tiling.decode(vae, z)
        assert torch.equal(y, tiling.decode(vae, z, tile=8, overlap=2)) and not torch.equal(y, vae.decode(z))
    assert not any({"body", "forward"} & vars(m).keys() for m in vae.modules())


def test_vae_blending_weights_sum_to_one_and_untouched_tiles_reproduce_the_input():
    """With a net that is the identity (no GroupNorm), tiling must give back the input exactly."""
    x = torch.randn(2, 3, 40, 56)
    out = tiling.run_tiled(lambda t: t, [], x, 16, 6, "local")
    assert (out - x).abs().max() < 1e-6
    with pytest.raises(ValueError, match="tile_norm 'tiles' or 'local'"):
        tiling.run_tiled(lambda t: t, [], x, 16, 6, "down")
    w = sum(tiling._ramp(56, s, 16, 6) for s in tiling.tile_starts(56, 16, 6))
    assert w.min() > 0.5


# --------------------------------------------------------------------------------------------
# precision


def test_vae_bf16_and_fp16_run_close_to_fp32():
    vae = _vae_tiny()
    x = _vae_image(64)
    with torch.no_grad():
        z32 = vae.encode(x)
        y32 = vae.decode(z32)
        for dtype, tol in ((torch.bfloat16, 0.15), (torch.float16, 0.02)):
            low = V.set_dtype(_vae_tiny(), dtype)
            z = low.encode(x.to(dtype))
            y = low.decode(z)
            assert z.dtype == dtype and y.dtype == dtype
            assert (z.float() - z32).abs().mean() < tol * z32.abs().mean(), dtype
            assert (y.float() - y32).abs().mean() < tol * y32.abs().mean(), dtype


def _vae_overflowing(dtype, upcast):
    """Tiny VAE whose decoder top level adds 2 x 4e4 to its residual stream: past fp16's 65504."""
    vae = _vae_tiny()
    with torch.no_grad():
        for b in vae.decoder.up[0].block:
            b.conv2.bias.fill_(4e4)
    return V.set_dtype(vae, dtype, upcast) if dtype != torch.float32 else vae


def test_vae_fp16_upcast_keeps_an_overflowing_decoder_finite():
    """All-fp16 overflows to inf; set_dtype's default keeps the up levels and the head in fp32
    (what diffusers does for SD VAEs), stays finite and matches fp32."""
    z = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y32 = _vae_overflowing(torch.float32, None).decoder(z)
        y_naive = _vae_overflowing(torch.float16, ()).decoder(z.half())
        upcast = _vae_overflowing(torch.float16, V.FP16_UPCAST)
        y_up = upcast.decoder(z.half())
    assert not torch.isfinite(y_naive).all()
    assert torch.isfinite(y_up).all() and y_up.dtype == torch.float32
    assert (y_up - y32).abs().max() < 0.02 * y32.abs().max()
    assert upcast.decoder.up[0].block[0].conv1.weight.dtype == torch.float32
    assert upcast.decoder.mid.attn_1.q.weight.dtype == torch.float16

