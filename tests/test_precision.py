"""The dtype path of a GPU run, on the CPU: bf16 autocast (train.py --dtype bf16) with the time path
(sinusoids, t and s embedders, adaLN modulation) in fp32, and the frozen weights in bf16."""

from dataclasses import replace

import pytest
import torch

import mfsr
import model
import train
from builders import _TINY, _images, _randomize
from model import CONFIGS, MMDiT

BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


def _student(seed=0):
    torch.manual_seed(seed)
    teacher = _randomize(MMDiT(replace(CONFIGS["tiny"], time_scale=1.0)), seed=seed)
    student = model.make_student(teacher, lora_rank=4)
    return _randomize(student, std=0.02, seed=seed + 1).eval()     # a non-zero s-embedder and LoRA


def _modulation(net, t):
    """Block 0's adaLN output (shift, scale, gate, ...) for times t, as the network computes it."""
    c = net.t_embedder(1 - t) + net.s_embedder(1 - t)
    return torch.cat(net.joint_blocks[0].x_block.modulation(c), -1).float()


def test_time_path_runs_in_fp32_under_bf16_autocast():
    """In bf16 the modulation moves in steps along t while a JVP sees a smooth function: with
    c_noise = t, 89 of the 256 sinusoids are constant in bf16 over [0, 1]. Under autocast the time
    path must give fp32's numbers, and its secant over a small h must agree with its tangent."""
    net = _student()
    t = torch.linspace(0.3, 0.7, 9)
    h = 1e-4
    with torch.no_grad():
        exact = _modulation(net, t)
        with torch.autocast(**BF16):
            m, m_h = _modulation(net, t), _modulation(net, t + h)
    assert (m - exact).abs().max() <= 1e-5 * exact.abs().max()
    with torch.autocast(**BF16):
        _, tangent = torch.func.jvp(lambda t_: _modulation(net, t_), (t,), (torch.ones_like(t),))
    secant = (m_h - m) / h
    err = (secant - tangent).norm(dim=1) / tangent.norm(dim=1)
    assert err.max() < 0.02, err                  # fp32 over h = 1e-4: ~1e-3; bf16 steps: ~1


def test_dudt_time_term_under_bf16_autocast_stays_near_fp32():
    """The JVP's time term of the whole student, under bf16 autocast, within 5 % (RMS over rows)
    of its fp32 value: the body's bf16 rounding is what is left, the time path adds none."""
    net = _student()
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 16, 8, 8, generator=g)
    v = torch.randn(3, 16, 8, 8, generator=g)
    t, s = torch.tensor([0.2, 0.5, 0.3]), torch.tensor([0.7, 0.9, 1.0])
    cond = mfsr.Cond(torch.randn(3, 16, 8, 8, generator=g), torch.randn(3, 32, generator=g), torch.randn(3, 4, 64, generator=g))
    u = mfsr.average_velocity(net)
    ref = mfsr.dudt_terms(u, z, t, s, v, cond=cond)
    with torch.autocast(**BF16):
        got = mfsr.dudt_terms(u, z, t, s, v, cond=cond)
    assert ref["dudt_time"] > 0
    assert got["dudt_time"] == pytest.approx(ref["dudt_time"], rel=0.05)
    assert got["dudt_noise"] == pytest.approx(ref["dudt_noise"], rel=0.05)


def test_train_dtype_bf16_on_the_cpu_keeps_frozen_weights_in_bf16_and_trains_fp32(tmp_path, monkeypatch):
    """--dtype bf16 runs the GPU's dtype path on the CPU: frozen weights (the teacher and the student's
    base) in bf16, the trained ones in fp32 (Adam's), a finite loss; --dtype fp16 is refused."""
    data = _images(tmp_path / "data", n=2)
    seen = {}
    build = train.build_models

    def spy(cfg, device, dtype=None):
        seen["nets"] = build(cfg, device, dtype)
        return seen["nets"]
    monkeypatch.setattr(train, "build_models", spy)
    train.main(_TINY + ["--data", data, "--steps", "1", "--lora-rank", "4", "--dtype", "bf16",
                        "--out", str(tmp_path / "run")])
    student, teacher, _ = seen["nets"]
    assert {p.dtype for p in teacher.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in student.parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in student.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert student.pos_embed.dtype == torch.float32
    for bad in (["--dtype", "fp16"], ["--mode", "fused", "--grad-ckpt"]):
        with pytest.raises(SystemExit):
            train.parse_args(_TINY + ["--data", data, *bad])
    assert train.parse_args(_TINY + ["--data", data, "--mode", "fused", "--grad-ckpt", "--compile"]).compile
