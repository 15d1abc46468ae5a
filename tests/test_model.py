"""Tests of model.py (and fastjvp.py): the MMDiT against SD3.5 / DiT4SR / diffusers, files, JVP attention, LoRA."""

import contextlib
import copy
import json
import math
import os
import re
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

import fastjvp
import mfsr
import model
import plumbing.checkpoints
from builders import ROOT, _randomize
from model import CONFIGS, MMDiT
from plumbing.checkpoints import CheckpointError


KEYS = ROOT / "reference" / "keys"   # manifests of the real checkpoints


def _manifest(name):
    return json.loads((KEYS / name).read_text())


def _meta(cfg):
    with torch.device("meta"):
        return MMDiT(cfg)


def _n_params(net):
    return sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize("name,manifest,count", [
    ("sd35-medium", "keys_sd35_medium_mmdit.json", 2_243_171_520),
    ("sd35-large", "keys_sd35_large_mmdit.json", 8_056_627_520),
])
def test_full_size_keys_and_shapes_equal_the_sd35_manifests(name, manifest, count):
    net = _meta(CONFIGS[name])
    ours = {k: list(v.shape) for k, v in net.state_dict().items()}
    ref = {k.removeprefix("model.diffusion_model."): v for k, v in _manifest(manifest).items()}
    assert ours == ref
    assert _n_params(net) == count


def test_full_size_dit4sr_in_diffusers_layout_equals_the_dit4sr_manifest():
    net = _meta(CONFIGS["dit4sr"])
    ours = {k: list(v.shape) for k, v in plumbing.checkpoints.to_diffusers_state_dict(net.state_dict(), 24).items()}
    ref = _manifest("keys_dit4sr_full_diffusers.json")
    unused = {k for k in ref if plumbing.checkpoints.DIT4SR_UNUSED.match(k)}
    assert len(unused) == 130
    assert ours == {k: v for k, v in ref.items() if k not in unused}
    assert _n_params(net) == 2_594_049_216
    extras = sum(torch.Size(ref[k]).numel() for k in unused)
    assert _n_params(net) + extras == 2_716_814_144   # the paper's 2716.8M


def _inputs(cfg, B=2, H=8, W=12, L=7, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)
    x = r(B, cfg.in_channels, H, W)
    return dict(x=x, sigma=torch.rand(B, generator=g, dtype=dtype), pooled=r(B, cfg.pooled_dim),
                context=r(B, L, cfg.context_dim), lr=r(*x.shape) if cfg.lr_stream else None,
                sigma_s=torch.rand(B, generator=g, dtype=dtype) if cfg.two_times else None)


_DIFFUSERS_TINY = dict(sample_size=32, patch_size=2, in_channels=16, num_layers=3, attention_head_dim=64,
                       num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=128,
                       pooled_projection_dim=32, out_channels=16, pos_embed_max_size=32,
                       dual_attention_layers=(0,), qk_norm="rms_norm")


def test_matches_diffusers_sd3_transformer_both_ways(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
    torch.manual_seed(0)
    ref = _randomize(diffusers.SD3Transformer2DModel(**_DIFFUSERS_TINY).eval())
    path = tmp_path / "diffusers.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    net = plumbing.checkpoints.load_transformer(str(path)).eval()          # our diffusers-layout loader
    assert net.cfg == replace(CONFIGS["tiny"], lr_stream=False)
    inp = _inputs(net.cfg)                                   # non-square 8 x 12 latent
    run_ref = lambda m: m(hidden_states=inp["x"], encoder_hidden_states=inp["context"],
                          pooled_projections=inp["pooled"], timestep=1000 * inp["sigma"]).sample
    with torch.no_grad():
        ours, theirs = net(inp["x"], inp["sigma"], inp["pooled"], inp["context"]), run_ref(ref)
        assert theirs.abs().max() > 0.5
        assert (ours - theirs).abs().max() <= 1e-5
        # our original-layout export through diffusers' own single-file converter
        plumbing.checkpoints.save_transformer(net, str(tmp_path / "orig.safetensors"), layout="original")
        conv = convert_sd3_transformer_checkpoint_to_diffusers(load_file(str(tmp_path / "orig.safetensors")))
        ref2 = diffusers.SD3Transformer2DModel(**_DIFFUSERS_TINY).eval()
        ref2.load_state_dict(conv, strict=True)
        assert (ours - run_ref(ref2)).abs().max() <= 1e-5


def _zero_control(net):
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "control" in name:
                p.zero_()
    return net


def test_lr_stream_with_zero_control_r1_only_dilutes_attention(monkeypatch):
    """ARCH §3.3: with zero control weights (r1), LR tokens have q = k = v = 0 and add nothing
    but they still sit in every softmax: the image stream equals SD3.5 attention with K extra
    zero keys and values, and does not depend on the LR latent."""
    torch.manual_seed(0)
    cfg = replace(CONFIGS["tiny"], lr_key_mode="r1")
    dit = _zero_control(_randomize(MMDiT(cfg))).eval()
    base = MMDiT(replace(cfg, lr_stream=False)).eval()
    base.load_state_dict({k: v for k, v in dit.state_dict().items() if "control" not in k})
    inp = _inputs(cfg)
    with torch.no_grad():
        out = dit(**inp)
        out_other_lr = dit(**{**inp, "lr": torch.randn_like(inp["lr"])})
        plain = base(inp["x"], inp["sigma"], inp["pooled"], inp["context"])
        K = inp["x"].shape[-2] * inp["x"].shape[-1] // 4
        orig = model.JointBlock.attention

        def with_zero_tokens(q, k, v):
            pad = torch.zeros(*k.shape[:2], K, k.shape[3])
            return orig(q, torch.cat([k, pad], 2), torch.cat([v, pad], 2))
        monkeypatch.setattr(model.JointBlock, "attention", staticmethod(with_zero_tokens))
        diluted = base(inp["x"], inp["sigma"], inp["pooled"], inp["context"])
    assert torch.equal(out, out_other_lr)
    assert (out - plain).abs().max() > 1e-3           # not identical to SD3.5 at init
    assert (out - diluted).abs().max() < 1e-5


def test_lr_key_modes_v1_ignores_k_control_r1_uses_it():
    torch.manual_seed(0)
    nets = {m: _randomize(MMDiT(replace(CONFIGS["tiny"], lr_key_mode=m))).eval() for m in ("v1", "r1")}
    nets["r1"].load_state_dict(nets["v1"].state_dict())
    inp = _inputs(CONFIGS["tiny"])
    with torch.no_grad():
        before = {m: n(**inp) for m, n in nets.items()}
        for n in nets.values():
            for blk in n.joint_blocks:
                blk.x_block.attn.k_control.weight.add_(0.3)
        after = {m: n(**inp) for m, n in nets.items()}
    assert (before["v1"] - before["r1"]).abs().max() > 1e-4
    assert torch.equal(before["v1"], after["v1"])       # v1: LR keys come from the image keys
    assert (before["r1"] - after["r1"]).abs().max() > 1e-4


def test_lr_stream_depends_on_lr_and_handles_non_square():
    torch.manual_seed(0)
    net = _randomize(MMDiT(CONFIGS["tiny"])).eval()
    inp = _inputs(net.cfg, H=6, W=16)
    with torch.no_grad():
        a = net(**inp)
        b = net(**{**inp, "lr": inp["lr"].flip(-1)})
    assert a.shape == inp["x"].shape
    assert (a - b).abs().max() > 1e-3


def test_forward_refuses_wrong_inputs_with_value_errors():
    net = MMDiT(CONFIGS["tiny"]).eval()
    student = MMDiT(replace(CONFIGS["tiny"], two_times=True)).eval()
    inp = _inputs(net.cfg, H=4, W=4)
    big = CONFIGS["tiny"].pos_grid * CONFIGS["tiny"].patch + 2
    for net_, changes, message in (
            (net, {"lr": None}, "the LR stream needs lr"),
            (net, {"x": inp["x"][:, :3]}, "x has 3 channels"),
            (net, {"x": inp["x"][..., :3]}, "not divisible by the patch"),
            (net, {"x": torch.zeros(1, 16, big, big), "lr": torch.zeros(1, 16, big, big)}, "exceeds the position grid"),
            (net, {"sigma": inp["sigma"][:, None]}, "sigma must be (B,)"),
            (net, {"pooled": inp["pooled"][:, :3]}, "pooled must be"),
            (net, {"sigma_s": inp["sigma"]}, "this model has one time input"),
            (student, {}, "a two-time model needs sigma_s")):
        with pytest.raises(ValueError, match=re.escape(message)):
            net_(**{**inp, **changes})


def test_dit4sr_layout_file_round_trips_and_drops_unused_extras(tmp_path):
    torch.manual_seed(0)
    net = _randomize(MMDiT(CONFIGS["tiny"])).eval()
    path = tmp_path / "transformer" / "diffusion_pytorch_model.safetensors"
    path.parent.mkdir()
    sd = plumbing.checkpoints.to_diffusers_state_dict(net.state_dict(), net.cfg.depth)
    for i in net.cfg.dual_layers:   # DiT4SR's never-used attn2 text projections, half precision
        for n in ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"):
            sd[f"transformer_blocks.{i}.attn2.{n}.weight"] = torch.randn(128, 128).half()
            sd[f"transformer_blocks.{i}.attn2.{n}.bias"] = torch.randn(128).half()
        for n in ("norm_added_q", "norm_added_k"):
            sd[f"transformer_blocks.{i}.attn2.{n}.weight"] = torch.ones(64).half()
    sd = {k: v.half() if "control" not in k else v for k, v in sd.items()}  # mixed, as DiT4SR saves
    save_file(sd, str(path))
    loaded = plumbing.checkpoints.load_transformer(str(tmp_path)).eval()    # folder with transformer/
    assert loaded.cfg == net.cfg and all(p.dtype == torch.float32 for p in loaded.parameters())
    for k, v in net.state_dict().items():
        tol = 0 if "control" in k else 1e-3 * v.abs().max()
        assert (loaded.state_dict()[k] - v).abs().max() <= tol, k
    inp = _inputs(net.cfg)
    with torch.no_grad():
        ref = MMDiT(net.cfg).eval()
        ref.load_state_dict({k: v.half().float() if "control" not in k else v
                             for k, v in net.state_dict().items()})
        assert torch.equal(loaded(**inp), ref(**inp))


def test_sharded_diffusers_folder_loads(tmp_path):
    torch.manual_seed(0)
    net = MMDiT(CONFIGS["tiny"])
    sd = plumbing.checkpoints.to_diffusers_state_dict(net.state_dict(), net.cfg.depth)
    keys = sorted(sd)
    shards = {"a.safetensors": keys[::2], "b.safetensors": keys[1::2]}
    for f, ks in shards.items():
        save_file({k: sd[k] for k in ks}, str(tmp_path / f))
    index = {"weight_map": {k: f for f, ks in shards.items() for k in ks}}
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    loaded = plumbing.checkpoints.load_transformer(str(tmp_path))
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in net.state_dict().items())


def test_sd35_single_file_ignores_vae_and_reads_config_from_shapes(tmp_path):
    cfg = replace(CONFIGS["tiny"], lr_stream=False, depth=2, dual_layers=(), qk_norm=False)
    net = MMDiT(cfg)
    sd = {"model.diffusion_model." + k: v for k, v in net.state_dict().items()}
    sd["first_stage_model.decoder.conv_in.weight"] = torch.zeros(4, 16, 3, 3)
    sd["text_encoders.clip_l.x"] = torch.zeros(3)
    save_file(sd, str(tmp_path / "sd35.safetensors"))
    loaded = plumbing.checkpoints.load_transformer(str(tmp_path / "sd35.safetensors"), time_scale=1.0)
    assert loaded.cfg == replace(cfg, time_scale=1.0)


def test_malformed_checkpoints_give_clear_errors(tmp_path):
    net = MMDiT(CONFIGS["tiny"])
    good = {"model.diffusion_model." + k: v for k, v in net.state_dict().items()}
    cases = {}
    missing = dict(good)
    del missing["model.diffusion_model.joint_blocks.1.x_block.mlp.fc2.weight"]
    cases["missing.safetensors"] = (missing, r"missing \(1\): joint_blocks\.1\.x_block\.mlp\.fc2\.weight")
    wrong = dict(good)
    wrong["model.diffusion_model.final_layer.linear.bias"] = torch.zeros(65)
    cases["wrong.safetensors"] = (wrong, r"misshapen \(1\): final_layer\.linear\.bias: file \(65,\) vs model \(64,\)")
    extra = dict(good)
    extra["model.diffusion_model.joint_blocks.0.x_block.foo"] = torch.zeros(2)
    cases["extra.safetensors"] = (extra, r"unexpected \(1\): joint_blocks\.0\.x_block\.foo")
    cases["vae.safetensors"] = ({"first_stage_model.encoder.conv_in.weight": torch.zeros(1)},
                                r"no SD3/MMDiT transformer keys")
    for name, (sd, pattern) in cases.items():
        save_file(sd, str(tmp_path / name))
        with pytest.raises(CheckpointError, match=pattern) as e:
            plumbing.checkpoints.load_transformer(str(tmp_path / name))
        assert name in str(e.value)
    data = (tmp_path / "missing.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 100)
    torch.save({"a": torch.zeros(1)}, tmp_path / "pickled.pt")
    for name, pattern in [("truncated.safetensors", "not a readable safetensors"),
                          ("garbage.safetensors", "not a readable safetensors"),
                          ("pickled.pt", "only .safetensors"), ("absent.safetensors", "no such file")]:
        with pytest.raises(CheckpointError, match=pattern) as e:
            plumbing.checkpoints.load_transformer(str(tmp_path / name))
        assert name in str(e.value)
    with pytest.raises(TypeError, match="unknown config overrides"):
        plumbing.checkpoints.load_transformer(str(tmp_path / "extra.safetensors"), lr_mode="r1")


def test_overwrite_is_atomic_and_project_files_keep_settings(tmp_path):
    torch.manual_seed(0)
    student = model.make_student(_randomize(MMDiT(CONFIGS["tiny"])), time_scale=1.0, lora_rank=4)
    with torch.no_grad():
        for m in student.modules():
            if isinstance(m, model.LoRALinear):
                m.lora_up.weight.normal_(0, 0.1)
    path = str(tmp_path / "student.safetensors")
    plumbing.checkpoints.save_transformer(student, path)
    assert os.listdir(tmp_path) == ["student.safetensors"]   # no temporary file left behind
    loaded = plumbing.checkpoints.load_transformer(path)
    assert loaded.cfg == student.cfg and loaded.lora == student.lora
    inp = _inputs(student.cfg)
    with torch.no_grad():
        assert torch.equal(loaded(**inp), student(**inp))


# ---- attention with forward-mode AD


def _qkv(B=1, H=2, N=37, M=53, d=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, n, d, generator=g, dtype=dtype) for n in (N, M, M)]


def _fw_jvp(f, primals, tangents):
    """A JVP through dual tensors of torch.autograd.forward_ad (as mfsr.jvp runs it)."""
    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level():
        return tuple(fwAD.unpack_dual(f(*(fwAD.make_dual(p, t) for p, t in zip(primals, tangents)))))


def _set_budget(monkeypatch, name, nbytes):
    """fastjvp's memory budget `name` (ATTN_BLOCK_BYTES, MLP_BAND_BYTES) set to nbytes on every device."""
    monkeypatch.setattr(fastjvp, name, {"cpu": nbytes, "gpu": nbytes})


def _backward_nodes(t, depth=3):
    """Class names of the autograd nodes within `depth` steps of t."""
    names, front = set(), [t.grad_fn]
    for _ in range(depth):
        names |= {type(n).__name__ for n in front}
        front = [f for n in front for f, _ in n.next_functions if f is not None]
    return names


# the two JVP entry points: torch.func (JVPAttention) and dual tensors (DualAttention when the
# tangent is not trained, i.e. without grad mode or inside detached_tangents)
JVPS = {"torch.func": torch.func.jvp, "dual tensors": _fw_jvp}


@pytest.mark.parametrize("jvp", JVPS.values(), ids=JVPS.keys())
def test_attention_jvp_matches_float64_finite_differences(jvp, monkeypatch):
    q, k, v = _qkv()
    dq, dk, dv = _qkv(seed=1)
    f = lambda q_, k_, v_: fastjvp.attention(q_, k_, v_)
    calls, orig = [], fastjvp.attention_and_tangent
    monkeypatch.setattr(fastjvp, "attention_and_tangent", lambda *a, **kw: calls.append(1) or orig(*a, **kw))
    for block in (2 * 53 * 5 * 8, 2 ** 22):             # fp64 blocks: chunks of 5 query rows, or one
        _set_budget(monkeypatch, "ATTN_BLOCK_BYTES", block)
        with torch.no_grad():
            out, tangent = jvp(f, (q, k, v), (dq, dk, dv))
        eps = 1e-6
        fd = (f(q + eps * dq, k + eps * dk, v + eps * dv) - f(q - eps * dq, k - eps * dk, v - eps * dv)) / (2 * eps)
        assert (tangent - fd).norm() / fd.norm() <= 1e-6
        math_out, math_tangent = jvp(lambda *a: fastjvp.attention(*a, mode="math"), (q, k, v), (dq, dk, dv))
        plain_out, plain_tangent = jvp(model.JointBlock.attention, (q, k, v), (dq, dk, dv))   # model.py's
        assert (tangent - plain_tangent).abs().max() <= 1e-12 and (out - plain_out).abs().max() <= 1e-12
        assert (tangent - math_tangent).abs().max() <= 1e-12 and (out - math_out).abs().max() <= 1e-12
    assert fd.norm() > 1.0 and len(calls) == 2


def test_attention_and_tangent_casts_k_and_v_once_under_autocast(monkeypatch):
    """Under autocast the inputs are cast to its dtype once per call, not for every chunk (K, dK, V,
    dV: 4 casts of their size over 8 chunks), and O, dO are those of fp32 to bf16's rounding."""
    from torch.utils._python_dispatch import TorchDispatchMode
    q, k, v = _qkv(dtype=torch.float32)
    dq, dk, dv = _qkv(dtype=torch.float32, seed=1)
    ref = fastjvp.attention_and_tangent(q, k, v, dq, dk, dv)

    class Casts(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Casts.count += func is torch.ops.aten._to_copy.default and args[0].numel() == k.numel()
            return func(*args, **(kwargs or {}))
    _set_budget(monkeypatch, "ATTN_BLOCK_BYTES", 2 * 53 * 5 * 4)      # fp32 softmax blocks of 5 query rows
    with torch.autocast("cpu", dtype=torch.bfloat16), Casts():
        o, do, _ = fastjvp.attention_and_tangent(q, k, v, dq, dk, dv)
    assert o.dtype == do.dtype == torch.bfloat16 and Casts.count == 4
    for a, b in zip((o, do), ref):
        assert (a.float() - b).abs().max() <= 0.03 * b.abs().max()


def test_attention_paths_agree_and_backward_through_the_jvp_primal():
    q, k, v = _qkv(dtype=torch.float32)
    ref = fastjvp.attention(q, k, v, mode="math")
    for mode in ("sdpa", "function", "chunked"):
        assert (fastjvp.attention(q, k, v, mode=mode) - ref).abs().max() < 1e-6
    # fused-mode use: grad-enabled JVP, backward through the primal output
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    tangents = _qkv(dtype=torch.float32, seed=1)
    out, _ = torch.func.jvp(lambda *a: fastjvp.attention(*a), tuple(leaves), tuple(tangents))
    w = torch.randn_like(out)
    grads = torch.autograd.grad((out * w).sum(), leaves)
    leaves2 = [t.clone().requires_grad_() for t in (q, k, v)]
    grads_ref = torch.autograd.grad((fastjvp.attention(*leaves2, mode="math") * w).sum(), leaves2)
    for a, b in zip(grads, grads_ref):
        assert (a - b).abs().max() < 1e-5
    # mfsr's fused mode promises to detach the tangent: then the tangent rule records nothing,
    # and the primal's gradients stay those above
    leaves3 = [t.clone().requires_grad_() for t in (q, k, v)]
    with fastjvp.detached_tangents():
        out3, tan3 = torch.func.jvp(lambda *a: fastjvp.attention(*a), tuple(leaves3), tuple(tangents))
    _, tan = torch.func.jvp(lambda *a: fastjvp.attention(*a), tuple(leaves), tuple(tangents))
    assert tan.requires_grad and not tan3.requires_grad and not fastjvp._SWITCHES["detached_tangents"]
    assert torch.equal(tan3, tan.detach())
    grads3 = torch.autograd.grad((out3 * w).sum(), leaves3)
    for a, b in zip(grads3, grads):
        assert torch.equal(a, b)
    # the same with dual tensors: DualAttention, whose backward starts from its saved O and
    # log-sum-exp; without the promise the tangent stays trainable (JVPAttention)
    leaves4 = [t.clone().requires_grad_() for t in (q, k, v)]
    with fastjvp.detached_tangents():
        out4, tan4 = _fw_jvp(lambda *a: fastjvp.attention(*a), leaves4, tangents)
    assert "DualAttentionBackward" in _backward_nodes(out4) and not tan4.requires_grad
    assert (tan4 - tan).abs().max() < 1e-5
    for a, b in zip(torch.autograd.grad((out4 * w).sum(), leaves4), grads_ref):
        assert (a - b).abs().max() < 1e-5
    out5, tan5 = _fw_jvp(lambda *a: fastjvp.attention(*a), leaves4, tangents)
    assert "JVPAttentionBackward" in _backward_nodes(out5) and tan5.requires_grad


def test_dual_attention_backward_matches_float64_gradcheck_on_both_backward_paths(monkeypatch):
    q, k, v = (t.requires_grad_() for t in _qkv(N=7, M=9, d=4))
    dq, dk, dv = _qkv(N=7, M=9, d=4, seed=1)
    f = lambda *a: fastjvp.DualAttention.apply(*a, dq, dk, dv)[0]
    assert torch.autograd.gradcheck(f, (q, k, v))              # the CPU flash backward
    monkeypatch.setattr(fastjvp, "_FLASH_CPU_BACKWARD", None)    # recomputing (other devices)
    assert torch.autograd.gradcheck(f, (q, k, v))


@pytest.mark.parametrize("jvp", JVPS.values(), ids=JVPS.keys())
def test_model_jvp_uses_the_custom_attention_and_matches_math_backend(jvp, monkeypatch):
    """fastjvp.accelerate(net): the model's JVP through the attention rule, equal to the math
    backend's, to model.py's plain network's (a copy, not accelerated) and to finite differences."""
    torch.manual_seed(0)
    plain = _randomize(MMDiT(replace(CONFIGS["tiny"], two_times=True)).double()).eval()
    net = fastjvp.accelerate(copy.deepcopy(plain))
    inp = _inputs(net.cfg, dtype=torch.float64)
    f = lambda x, sig, n=net: n(x, sig, inp["pooled"], inp["context"], lr=inp["lr"], sigma_s=inp["sigma_s"])
    tx, ts = torch.randn_like(inp["x"]), torch.ones_like(inp["sigma"])
    calls, orig = [], fastjvp.attention_and_tangent
    monkeypatch.setattr(fastjvp, "attention_and_tangent", lambda *a, **kw: calls.append(1) or orig(*a, **kw))
    with torch.no_grad():
        _, jvp_out = jvp(f, (inp["x"], inp["sigma"]), (tx, ts))
        assert len(calls) == net.cfg.depth + len(net.cfg.dual_layers)
        with fastjvp.attention_mode("math"):
            _, jvp_math = jvp(f, (inp["x"], inp["sigma"]), (tx, ts))
        _, jvp_plain = jvp(lambda x, sig: f(x, sig, plain), (inp["x"], inp["sigma"]), (tx, ts))
    assert len(calls) == net.cfg.depth + len(net.cfg.dual_layers)       # neither ran the rule
    eps = 1e-6
    fd = (f(inp["x"] + eps * tx, inp["sigma"] + eps * ts) - f(inp["x"] - eps * tx, inp["sigma"] - eps * ts)) / (2 * eps)
    assert (jvp_out - jvp_math).abs().max() <= 1e-10 * jvp_out.abs().max()
    assert (jvp_out - jvp_plain).abs().max() <= 1e-10 * jvp_out.abs().max()
    assert (jvp_out - fd).norm() / fd.norm() <= 1e-6


@pytest.fixture
def lean():
    """The test runs inside fastjvp.lean_memory(), as the full-scale programs do."""
    with fastjvp.lean_memory():
        yield


def test_fast_paths_off_give_the_same_forward_jvp_and_gradients_through_plain_ops(monkeypatch, lean):
    """model.py's network (softmax(s Q K^T) V, F.linear, one MLP pass) gives the numbers of the same
    network after fastjvp.accelerate (chunked dual attention, the linear rule, MLP row bands) for the
    forward, the JVP mfsr.py takes and the fused mode's gradients; and no fast path runs in it, not
    even inside lean_memory()."""
    torch.manual_seed(0)
    plain_net = _randomize(MMDiT(replace(CONFIGS["tiny"], two_times=True)).double())
    net = fastjvp.accelerate(copy.deepcopy(plain_net))
    inp = _inputs(net.cfg, dtype=torch.float64)
    f = lambda x, sig: net(x, sig, inp["pooled"], inp["context"], lr=inp["lr"], sigma_s=inp["sigma_s"])
    prim, tan = (inp["x"], inp["sigma"]), (torch.randn_like(inp["x"]), torch.ones_like(inp["sigma"]))
    _set_budget(monkeypatch, "MLP_BAND_BYTES", 2 * 6 * 4 * net.cfg.hidden * 8)    # 1-row fp64 MLP bands
    calls = {"rule": 0, "bands": 0}
    rule, bands = fastjvp.attention_and_tangent, fastjvp.mlp_band_rows
    monkeypatch.setattr(fastjvp, "attention_and_tangent",
                        lambda *a, **kw: calls.__setitem__("rule", calls["rule"] + 1) or rule(*a, **kw))
    monkeypatch.setattr(fastjvp, "mlp_band_rows",
                        lambda x, h, *a: (lambda r: calls.__setitem__("bands", calls["bands"] + (r < h)) or r)(bands(x, h, *a)))

    def run():
        with torch.no_grad():
            out, dudt = mfsr.jvp(f, prim, tan)
        net.zero_grad(set_to_none=True)
        with fastjvp.detached_tangents():
            u, d = mfsr.jvp(f, prim, tan)
        (u - d.detach()).square().mean().backward()
        return out, dudt, [p.grad.clone() for p in net.parameters() if p.grad is not None]
    fast = run()
    assert calls["rule"] > 0 and calls["bands"] > 0
    calls.update(rule=0, bands=0)
    net = plain_net
    plain = run()
    assert calls == {"rule": 0, "bands": 0}
    assert (fast[0] - plain[0]).abs().max() <= 1e-10 and (fast[1] - plain[1]).abs().max() <= 1e-10 * fast[1].abs().max()
    assert len(fast[2]) == len(plain[2]) > 0
    assert all((a - b).abs().max() <= 1e-10 * max(1.0, a.abs().max().item()) for a, b in zip(fast[2], plain[2]))


def test_jvp_runs_the_mlps_in_row_bands_with_the_same_result(monkeypatch, lean):
    """Inside lean_memory() a JVP runs the MLPs over bands of image rows (fastjvp.JointBlock.mlp_rows)."""
    torch.manual_seed(0)
    net = fastjvp.accelerate(_randomize(MMDiT(replace(CONFIGS["tiny"], two_times=True)).double()).eval())   # conv random
    inp = _inputs(net.cfg, dtype=torch.float64)                                          # 4 x 6 token grid
    f = lambda x, sig: net(x, sig, inp["pooled"], inp["context"], lr=inp["lr"], sigma_s=inp["sigma_s"])
    prim, tan = (inp["x"], inp["sigma"]), (torch.randn_like(inp["x"]), torch.ones_like(inp["sigma"]))
    bands, rows_of = [], fastjvp.JointBlock.mlp_rows
    monkeypatch.setattr(fastjvp.JointBlock, "mlp_rows", lambda block, *a: bands.append(a[4:6]) or rows_of(block, *a))
    with torch.no_grad():
        ref = torch.func.jvp(f, prim, tan)                   # 4 x 6 x 512 x 2 x 8 < MLP_BAND_BYTES: one band
        assert set(bands) == {(0, 4)}
        wide = 2 * 6 * 4 * net.cfg.hidden * 8                # bytes of one row's fp64 hidden layer
        for rows, expect in ((1, {(0, 1), (1, 2), (2, 3), (3, 4)}), (3, {(0, 3), (3, 4)})):
            _set_budget(monkeypatch, "MLP_BAND_BYTES", rows * wide)
            bands.clear()
            out = torch.func.jvp(f, prim, tan)
            assert set(bands) == expect and len(bands) == len(expect) * net.cfg.depth
            for a, b in zip(out, ref):
                assert (a - b).abs().max() <= 1e-12 * b.abs().max()
        bands.clear()
        net(**inp)                                           # no tangent: never banded
        assert set(bands) == {(0, 4)}


@pytest.mark.parametrize("bands", [False, True], ids=["one MLP band", "1-row MLP bands"])
@pytest.mark.parametrize("lr_stream", [True, False], ids=["DiT4SR", "SD3.5"])
def test_lean_memory_path_gives_the_plain_paths_numbers(monkeypatch, lr_stream, bands):
    """Inside fastjvp.lean_memory() the accelerated JointBlock's attend / image_mlp (q, k, v freed
    part by part, the MLPs in row bands under a JVP) give model.py's numbers: the same forward and
    JVP (both entry points) in fp32 to rounding, for the tiny config's LR stream and dual MMDiT-X
    block 0 on a non-square grid; each path runs only where it is switched on."""
    torch.manual_seed(0)
    cfg = replace(CONFIGS["tiny"], two_times=True, lr_stream=lr_stream)
    assert cfg.dual_layers == (0,)
    plain_net = _randomize(MMDiT(cfg), std=0.1).eval()            # LR control layers and conv random
    net = fastjvp.accelerate(copy.deepcopy(plain_net))
    inp = _inputs(cfg, H=8, W=12)                                 # 4 x 6 token grid
    f = lambda x, sig: net(x, sig, inp["pooled"], inp["context"], lr=inp["lr"], sigma_s=inp["sigma_s"])
    prim, tan = (inp["x"], inp["sigma"]), (torch.randn_like(inp["x"]), torch.ones_like(inp["sigma"]))
    if bands:
        _set_budget(monkeypatch, "MLP_BAND_BYTES", 2 * 6 * 4 * cfg.hidden * 4)    # one fp32 row a band
    calls = {}

    def counted(owner, name):
        orig = getattr(owner, name)
        monkeypatch.setattr(owner, name, lambda *a: calls.__setitem__(name, calls.get(name, 0) + 1) or orig(*a))
    for owner, name in ((model.JointBlock, "attend"), (model.JointBlock, "image_mlp"), (fastjvp, "_lean_qkv"),
                        (fastjvp.JointBlock, "mlp_rows")):
        counted(owner, name)

    def run():
        calls.clear()
        with torch.no_grad():
            return (f(*prim), *torch.func.jvp(f, prim, tan), *mfsr.jvp(f, prim, tan))
    passes = 3 * cfg.depth                                        # forward, two JVPs: every block
    outs = []
    for n in (plain_net, net):                # outside lean_memory() the accelerated block runs model.py's
        f = lambda x, sig, n=n: n(x, sig, inp["pooled"], inp["context"], lr=inp["lr"], sigma_s=inp["sigma_s"])
        outs.append(run())
        assert calls == {"attend": passes, "image_mlp": passes}
    plain, fast = outs
    with fastjvp.lean_memory():
        lean = run()
    assert calls == {"_lean_qkv": passes + 3 * len(cfg.dual_layers),
                     "mlp_rows": cfg.depth * (1 + 2 * (4 if bands else 1))}   # the forward: one band
    for a, b in zip(plain, fast):
        assert (a - b).abs().max() <= 1e-5 * max(1.0, b.abs().max().item())
    for a, b in zip(plain, lean):
        assert b.abs().max() > 0.1
        assert (a - b).abs().max() <= 1e-5 * max(1.0, b.abs().max().item())
    assert (plain[2] - plain[4]).abs().max() <= 1e-4 * plain[2].abs().max()   # the two JVPs agree


def test_checkpointed_blocks_recompute_with_the_switches_of_their_forward():
    """A block checkpointed inside lean_memory() is recomputed the lean way by a backward outside
    it, and the reverse (fastjvp.forward_switches): torch.utils.checkpoint would otherwise meet
    other saved tensors. The gradients are those without checkpointing."""
    torch.manual_seed(0)
    net = fastjvp.accelerate(_randomize(MMDiT(CONFIGS["tiny"]), std=0.1))
    inp = _inputs(net.cfg)

    def grads(lean_forward, ckpt):
        net.zero_grad(set_to_none=True)
        net.grad_checkpointing = ckpt
        with fastjvp.lean_memory() if lean_forward else contextlib.nullcontext():
            loss = net(**inp).square().mean()
        with contextlib.nullcontext() if lean_forward else fastjvp.lean_memory():
            loss.backward()
        return torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])
    ref = grads(False, False)
    assert ref.abs().max() > 0
    for lean_forward in (True, False):
        assert (grads(lean_forward, True) - ref).abs().max() <= 1e-6 * ref.abs().max()


# ---- LoRA, student from teacher, trainable set


def test_lora_is_zero_at_init_and_merges_exactly():
    torch.manual_seed(0)
    net = _randomize(MMDiT(CONFIGS["tiny"])).eval()
    inp = _inputs(net.cfg)
    with torch.no_grad():
        before = net(**inp)
        model.add_lora(net, rank=4, alpha=8)
        n_lora = sum(isinstance(m, model.LoRALinear) for m in net.modules())
        assert torch.equal(net(**inp), before)
        for m in net.modules():
            if isinstance(m, model.LoRALinear):
                m.lora_up.weight.normal_(0, 0.05)
        with_lora = net(**inp)
        model.merge_lora(net)
        merged = net(**inp)
    # qkv + proj + fc1 + fc2 per stream and block, minus the last context block's proj/fc1/fc2,
    # plus qkv + proj for each dual block
    assert n_lora == 3 * 8 - 3 + 2
    assert (with_lora - before).abs().max() > 1e-3
    assert (merged - with_lora).abs().max() < 1e-5
    assert not any("lora" in k for k in net.state_dict())


def test_linear_forward_ad_rule_is_exact_and_takes_two_products():
    from torch.utils._python_dispatch import TorchDispatchMode
    import torch.autograd.forward_ad as fwAD

    class Products(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            names.append(func.__name__.split(".")[0])
            return func(*args, **(kwargs or {}))
    torch.manual_seed(0)
    lin = fastjvp.Linear(24, 40).double()
    x, dx = torch.randn(2, 5, 24, dtype=torch.float64), torch.randn(2, 5, 24, dtype=torch.float64)
    ref_out, ref_tan = torch.func.jvp(lambda a: torch.nn.functional.linear(a, lin.weight, lin.bias), (x,), (dx,))
    for detached in (False, True):
        names = []
        with fwAD.dual_level(), Products():
            with fastjvp.detached_tangents() if detached else contextlib.nullcontext():
                out, tan = fwAD.unpack_dual(lin(fwAD.make_dual(x, dx)))
        assert sum(n in ("mm", "addmm", "bmm") for n in names) == 2     # x W^T + b and dx W^T only
        assert (out - ref_out).abs().max() < 1e-12 and (tan - ref_tan).abs().max() < 1e-12
        assert tan.requires_grad != detached      # the weights require grad: recorded unless detached
        lin.zero_grad()
        out.square().sum().backward()             # the fused mode trains the primal output
        assert torch.allclose(lin.weight.grad, (2 * ref_out).flatten(0, 1).T @ x.flatten(0, 1))
    # a weight with a tangent of its own takes PyTorch's general rule (x dW^T counts too)
    dw = torch.randn_like(lin.weight)
    ref = torch.func.jvp(lambda a, w: torch.nn.functional.linear(a, w, lin.bias), (x, lin.weight.detach()), (dx, dw))[1]
    with fwAD.dual_level():
        tan = fwAD.unpack_dual(fastjvp.linear(fwAD.make_dual(x, dx), fwAD.make_dual(lin.weight.detach(), dw), lin.bias)).tangent
    assert (tan - ref).abs().max() < 1e-12


def test_lora_linear_merges_on_the_fly_only_without_lora_gradients():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Shapes(TorchDispatchMode):      # the shapes of every op's output
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            seen.append(tuple(out.shape) if isinstance(out, torch.Tensor) else None)
            return out
    torch.manual_seed(0)
    lin = fastjvp.accelerate(model.LoRALinear(torch.nn.Linear(24, 40), rank=4, alpha=8))   # fastjvp.LoRALinear merges
    torch.nn.init.normal_(lin.lora_up.weight, 0, 0.1)
    ref = lambda x: (torch.nn.functional.linear(x, lin.weight, lin.bias)
                     + 2.0 * x @ lin.lora_down.weight.T @ lin.lora_up.weight.T)
    for rows, merges in ((3, False), (64, True)):   # 64 rows: the merged weight is cheaper
        x = torch.randn(2, rows, 24)
        for grad in (False, True):
            seen = []
            with torch.set_grad_enabled(grad), Shapes():
                y = lin(x)
            assert (y - ref(x)).abs().max() < 1e-5
            assert ((40, 24) in seen) == (merges and not grad)   # a merged (out, in) weight was formed
        y.square().sum().backward()
        assert lin.lora_up.weight.grad.abs().max() > 0
        lin.zero_grad()


def test_student_from_teacher_reproduces_teacher_for_any_s():
    torch.manual_seed(0)
    teacher = _randomize(MMDiT(CONFIGS["tiny"])).eval()
    student = model.make_student(teacher, time_scale=teacher.cfg.time_scale, lora_rank=4).eval()
    inp = _inputs(student.cfg)
    with torch.no_grad():
        ref = teacher(inp["x"], inp["sigma"], inp["pooled"], inp["context"], lr=inp["lr"])
        for s in (inp["sigma_s"], torch.zeros(2), torch.ones(2)):
            assert torch.equal(student(**{**inp, "sigma_s": s}), ref)
    # the student's trainable control layers are its own; frozen base weights are shared
    c = "joint_blocks.0.x_block.attn.q_control.weight"
    assert student.get_parameter(c).data_ptr() != teacher.get_parameter(c).data_ptr()
    b = "joint_blocks.0.x_block.mlp.fc1.weight"
    assert student.get_parameter(b).data_ptr() == teacher.get_parameter(b).data_ptr()


def test_time_cutoff_low_passes_the_embedding_and_round_trips(tmp_path):
    """time_cutoff (a 1000 t teacher's student, beyond the paper): the features above the cutoff
    are zero, exactly as if the t-embedder's columns for them were cut; a student made with it
    starts as the low-passed teacher for every s; the file records it."""
    t = torch.tensor([0.0, 0.3, 0.9]) * 1000
    full, low = model.timestep_embedding(t), model.timestep_embedding(t, max_freq=20 / 1000)
    freqs = torch.exp(-math.log(10000.0) * torch.arange(128) / 128).repeat(2)
    assert torch.equal(low[:, freqs <= 0.02], full[:, freqs <= 0.02]) and (low[:, freqs > 0.02] == 0).all()
    assert 0 < int((freqs > 0.02).sum()) < 256
    torch.manual_seed(0)
    teacher = _randomize(MMDiT(CONFIGS["tiny"])).eval()
    cut = MMDiT(replace(CONFIGS["tiny"], time_cutoff=20.0)).eval()
    cut.load_state_dict(teacher.state_dict())
    with torch.no_grad():                           # the same as cutting the first layer's columns
        teacher.t_embedder.mlp[0].weight[:, freqs > 0.02] = 0
    student = model.make_student(cut, time_scale=1000.0, lora_rank=4, time_cutoff=20.0).eval()
    inp = _inputs(student.cfg)
    with torch.no_grad():
        ref = teacher(inp["x"], inp["sigma"], inp["pooled"], inp["context"], lr=inp["lr"])
        assert torch.allclose(cut(inp["x"], inp["sigma"], inp["pooled"], inp["context"], lr=inp["lr"]), ref, atol=1e-6)
        for s in (inp["sigma_s"], torch.ones(2)):
            assert torch.allclose(student(**{**inp, "sigma_s": s}), ref, atol=1e-6)
    plumbing.checkpoints.save_transformer(student, str(tmp_path / "s.safetensors"))
    assert plumbing.checkpoints.load_transformer(str(tmp_path / "s.safetensors")).cfg.time_cutoff == 20.0


def test_trainable_set_counts():
    with torch.device("meta"):
        net = MMDiT(replace(CONFIGS["dit4sr"], two_times=True, time_scale=1.0))
    model.add_lora(net, rank=64)
    n = model.set_trainable(net, teacher_time_scale=1000.0)
    D = 1536
    control = 350_877_696
    emb = 2 * (256 * D + D + D * D + D)                         # s- and t-embedders
    lora = 0
    for name, p in net.named_parameters():
        if "lora_" in name:
            lora += p.numel()
    # no gradient ever reaches block 23's attn.out_control (its output is dropped) nor, in v1
    # mode, any k_control (24 attn + 13 attn2): they are left frozen
    dead = (1 + 24 + 13) * (D * D + D)
    assert len(model.dead_lr_params(net)) == 2 * (1 + 24 + 13)
    assert lora > 0 and n == control - dead + emb + lora


def test_every_trainable_parameter_gets_a_gradient():
    """DDP (find_unused_parameters=False) silently skips the all-reduce of a bucket whose
    parameters never get a gradient: the trainable set must have none of those."""
    for mode in ("v1", "r1"):
        torch.manual_seed(0)
        net = model.make_student(MMDiT(replace(CONFIGS["tiny"], lr_key_mode=mode)), lora_rank=4)
        net(**_inputs(net.cfg)).square().mean().backward()
        assert [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None] == []
    assert all(not p.requires_grad for k, p in net.named_parameters()
               if k.startswith(("y_embedder", "context_embedder", "final_layer")) or k.endswith("qkv.weight"))


def _dit4sr_reference(sd, cfg, x, sigma, pooled, context, lr):
    """An independent restatement of DiT4SR's forward (ARCH §3.2-3.3) over a diffusers-layout
    state dict, dense attention, written from the text rather than from model.py."""
    import torch.nn.functional as F
    lin = lambda name, t: F.linear(t, sd[name + ".weight"], sd[name + ".bias"])
    ln = lambda t: F.layer_norm(t, t.shape[-1:], eps=1e-6)
    rms = lambda name, t: t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6) * sd[name + ".weight"]
    heads = lambda t: t.unflatten(-1, (cfg.heads, 64)).transpose(1, 2)
    mod = lambda t, sh, sc: t * (1 + sc[:, None]) + sh[:, None]

    def attend(q, k, v):
        p = torch.softmax(q @ k.transpose(-1, -2) / 8.0, dim=-1)
        return (p @ v).transpose(1, 2).flatten(2)

    B, _, H, W = x.shape
    h, w, M = H // 2, W // 2, cfg.pos_grid
    top, left = (M - h) // 2, (M - w) // 2
    pos = sd["pos_embed.pos_embed"].reshape(M, M, -1)[top:top + h, left:left + w].reshape(1, h * w, -1)
    embed = lambda z: F.conv2d(z, sd["pos_embed.proj.weight"], sd["pos_embed.proj.bias"], stride=2).flatten(2).transpose(1, 2) + pos
    X, L = embed(x), embed(lr)
    freqs = torch.exp(-torch.log(torch.tensor(10000.0, dtype=x.dtype)) * torch.arange(128, dtype=x.dtype) / 128)
    tf = torch.cat([torch.cos(1000 * sigma[:, None] * freqs), torch.sin(1000 * sigma[:, None] * freqs)], -1)
    mlp2 = lambda n, t: lin(n + ".linear_2", F.silu(lin(n + ".linear_1", t)))
    temb = mlp2("time_text_embed.timestep_embedder", tf) + mlp2("time_text_embed.text_embedder", pooled)
    C = lin("context_embedder", context)
    K = X.shape[1]
    for i in range(cfg.depth):
        b = f"transformer_blocks.{i}."
        dual = i in cfg.dual_layers
        m = lin(b + "norm1.linear", F.silu(temb)).chunk(9 if dual else 6, -1)
        nX, nL = ln(X), ln(L)
        last = i == cfg.depth - 1

        def lr_attn(a, xa, la):
            kx_raw = heads(lin(a + "to_k", xa))
            qx, kx, vx = rms(a + "norm_q", heads(lin(a + "to_q", xa))), rms(a + "norm_k", kx_raw), heads(lin(a + "to_v", xa))
            ql = rms(a + "norm_q", heads(lin(a + "to_q_control", lin(a + "to_q", la))))
            vl = heads(lin(a + "to_v_control", lin(a + "to_v", la)))
            kl = rms(a + "norm_k", heads(lin(a + "to_k_control", lin(a + "to_k", la)))) if cfg.lr_key_mode == "r1" \
                else rms(a + "norm_k", rms(a + "norm_k", kx_raw))
            return (qx, kx, vx), (ql, kl, vl)

        xa, la = mod(nX, m[0], m[1]), mod(nL, m[0], m[1])
        (qx, kx, vx), (ql, kl, vl) = lr_attn(b + "attn.", xa, la)
        if last:
            cm = lin(b + "norm1_context.linear", F.silu(temb)).chunk(2, -1)
            ca = mod(ln(C), cm[1], cm[0])   # AdaLayerNormContinuous: (scale, shift)
        else:
            cm = lin(b + "norm1_context.linear", F.silu(temb)).chunk(6, -1)
            ca = mod(ln(C), cm[0], cm[1])
        qc = rms(b + "attn.norm_added_q", heads(lin(b + "attn.add_q_proj", ca)))
        kc = rms(b + "attn.norm_added_k", heads(lin(b + "attn.add_k_proj", ca)))
        vc = heads(lin(b + "attn.add_v_proj", ca))
        o = attend(torch.cat([qx, ql, qc], 2), torch.cat([kx, kl, kc], 2), torch.cat([vx, vl, vc], 2))
        X2 = X + m[2][:, None] * lin(b + "attn.to_out.0", o[:, :K])
        L2 = L + m[2][:, None] * lin(b + "attn.to_out_control", o[:, K:2 * K] + la)
        if dual:
            xa2, la2 = mod(nX, m[6], m[7]), mod(nL, m[6], m[7])
            (qx, kx, vx), (ql, kl, vl) = lr_attn(b + "attn2.", xa2, la2)
            o2 = attend(torch.cat([qx, ql], 2), torch.cat([kx, kl], 2), torch.cat([vx, vl], 2))
            X2 = X2 + m[8][:, None] * lin(b + "attn2.to_out.0", o2[:, :K])
            L2 = L2 + m[8][:, None] * lin(b + "attn2.to_out_control", o2[:, K:] + la2)
        hX = F.gelu(lin(b + "ff.net.0.proj", mod(ln(X2), m[3], m[4])), approximate="tanh")
        hL = F.gelu(lin(b + "ff.net.0.proj", mod(ln(L2), m[3], m[4])), approximate="tanh")
        conv = F.conv2d(hL.transpose(1, 2).reshape(B, -1, h, w), sd[b + "ff.control_conv.weight"],
                        sd[b + "ff.control_conv.bias"], padding=1, groups=hL.shape[-1])
        hX = hX + 1.2 * conv.flatten(2).transpose(1, 2)
        X = X2 + m[5][:, None] * lin(b + "ff.net.2", hX)
        L = L2 + m[5][:, None] * lin(b + "ff.net.2", hL)
        if not last:
            C = C + cm[2][:, None] * lin(b + "attn.to_add_out", o[:, 2 * K:])
            hc = F.gelu(lin(b + "ff_context.net.0.proj", mod(ln(C), cm[3], cm[4])), approximate="tanh")
            C = C + cm[5][:, None] * lin(b + "ff_context.net.2", hc)
    scale, shift = lin("norm_out.linear", F.silu(temb)).chunk(2, -1)
    out = lin("proj_out", mod(ln(X), shift, scale))                                  # (B, K, 64)
    return out.reshape(B, h, w, 2, 2, 16).permute(0, 5, 1, 3, 2, 4).reshape(B, 16, H, W)


@pytest.mark.parametrize("mode", ["v1", "r1"])
def test_lr_stream_matches_an_independent_restatement_of_dit4sr(mode):
    torch.manual_seed(0)
    net = _randomize(MMDiT(replace(CONFIGS["tiny"], lr_key_mode=mode)), std=0.1).double().eval()
    sd = plumbing.checkpoints.to_diffusers_state_dict(net.state_dict(), net.cfg.depth)
    inp = _inputs(net.cfg, H=6, W=10, dtype=torch.float64)
    with torch.no_grad():
        ours = net(**inp)
        ref = _dit4sr_reference(sd, net.cfg, inp["x"], inp["sigma"], inp["pooled"], inp["context"], inp["lr"])
    assert ref.abs().max() > 0.1
    assert (ours - ref).abs().max() <= 1e-10


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    net = _randomize(MMDiT(CONFIGS["tiny"]))
    inp = _inputs(net.cfg)
    grads = []
    for ckpt in (False, True):
        net.zero_grad()
        net.grad_checkpointing = ckpt
        net(**inp).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None]))
    assert grads[0].abs().max() > 0
    assert (grads[0] - grads[1]).abs().max() <= 1e-6 * grads[0].abs().max()


@pytest.mark.slow
def test_torch_compile_forward_and_jvp():
    torch.manual_seed(0)
    cfg = replace(CONFIGS["tiny"], depth=2, two_times=True, time_scale=1.0)
    net = fastjvp.accelerate(_randomize(MMDiT(cfg)).eval())
    inp = _inputs(cfg, B=1)
    f = lambda x, sig: net(x, sig, inp["pooled"], inp["context"], lr=inp["lr"], sigma_s=inp["sigma_s"])
    tx, ts = torch.randn_like(inp["x"]), torch.ones_like(inp["sigma"])

    def jvp(x, sig, tx, ts):
        with fastjvp.compiled_jvp():
            return torch.func.jvp(f, (x, sig), (tx, ts))
    with torch.no_grad():
        eager_out, eager_tangent = torch.func.jvp(f, (inp["x"], inp["sigma"]), (tx, ts))
        compiled_out = torch.compile(f)(inp["x"], inp["sigma"])
        c_out, c_tangent = torch.compile(jvp, fullgraph=True)(inp["x"], inp["sigma"], tx, ts)
    assert (compiled_out - eager_out).abs().max() <= 1e-5 * eager_out.abs().max()
    assert (c_out - eager_out).abs().max() <= 1e-5 * eager_out.abs().max()
    assert (c_tangent - eager_tangent).abs().max() <= 1e-5 * eager_tangent.abs().max()


def test_add_lr_stream_turns_sd35_into_a_dit4sr_teacher():
    torch.manual_seed(0)
    base = _randomize(MMDiT(replace(CONFIGS["tiny"], lr_stream=False)))
    ref = {k: v.clone() for k, v in base.state_dict().items()}
    net = model.add_lr_stream(base)
    want = MMDiT(CONFIGS["tiny"]).state_dict()
    assert {k: v.shape for k, v in net.state_dict().items()} == {k: v.shape for k, v in want.items()}
    assert all(torch.equal(net.state_dict()[k], v) for k, v in ref.items())   # base untouched
    assert all(net.get_parameter(f"joint_blocks.{i}.x_block.attn.{n}_control.weight").abs().max() == 0
               for i in range(3) for n in "qkv")
    inp = _inputs(net.cfg)
    with torch.no_grad():
        assert net(**inp).shape == inp["x"].shape


def test_save_transformer_diffusers_export_loads_back_equal_and_refuses_unmerged_lora(tmp_path):
    """save_transformer(layout="diffusers") writes DiT4SR's names (qkv split, last adaLN halves swapped),
    keeps the recorded config and sampler settings, and loads back to the same network; a LoRA model
    must be merged first."""
    torch.manual_seed(0)
    net = _randomize(MMDiT(replace(CONFIGS["tiny"], time_scale=1.0, lr_key_mode="r1"))).eval()
    net.sampling = {"tile": 16, "tile_overlap": 6}
    path = tmp_path / "net.safetensors"
    plumbing.checkpoints.save_transformer(net, str(path), layout="diffusers")
    on_disk = load_file(str(path))
    assert set(on_disk) == set(plumbing.checkpoints.to_diffusers_state_dict(net.state_dict(), net.cfg.depth))
    assert "transformer_blocks.0.attn.to_q.weight" in on_disk and not any(k.startswith("joint_blocks") for k in on_disk)
    loaded = plumbing.checkpoints.load_transformer(str(path)).eval()
    assert loaded.cfg == net.cfg and loaded.sampling == net.sampling
    inp = _inputs(net.cfg)
    with torch.no_grad():
        assert torch.equal(loaded(**inp), net(**inp))
    with pytest.raises(ValueError, match="merge_lora"):
        plumbing.checkpoints.save_transformer(model.add_lora(net, rank=2), str(tmp_path / "lora.safetensors"), layout="diffusers")
    with pytest.raises(ValueError, match="layout must be"):
        plumbing.checkpoints.save_transformer(net, str(tmp_path / "x.safetensors"), layout="sd3")


def test_building_on_the_meta_device_imports_no_compiler():
    # Loading a checkpoint builds the model on meta first. An op there such as arange or cat runs
    # torch's Python reference, whose first use imports torch._dynamo: 1.6 s of sample.py's start.
    code = ("import sys, torch, model\nwith torch.device('meta'):\n    net = model.MMDiT(model.CONFIGS['dit4sr'])\n"
            "assert net.pos_embed.is_meta and net.pos_embed.shape == (1, 384 * 384, 1536)\n"
            "print('torch._dynamo' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-1000:]
    assert done.stdout.strip() == "False"
