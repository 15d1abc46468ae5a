"""Tests of mfsr.py, the method: the identity and the distillation, in closed form (2-D flows) and on the tiny model."""

from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

import mfsr
import model
from builders import _randomize
from toy_flows import PLANTED_BUGS, identity_error, linear_flow_u, mlp_u, toy_eval, toy_student, two_time_net
from model import CONFIGS, MMDiT
from plumbing import checkpoints


def test_sample_times_ranges_ratio_and_determinism():
    g = torch.Generator().manual_seed(0)
    t, s = mfsr.sample_times(64, ratio=0.5, generator=g)
    assert t.shape == s.shape == (64,)
    assert (t >= 0).all() and (t <= 1).all() and (s >= t).all() and (s <= 1).all()
    assert int((s != t).sum()) == 32 and (s[:32] != t[:32]).all()   # fixed count, rows first
    t2, s2 = mfsr.sample_times(64, ratio=0.5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(t, t2) and torch.equal(s, s2)
    # batch 1: the share is right on average (stochastic rounding), 4000 draws: std 0.008
    neq = [bool(mfsr.sample_times(1, 0.25, g)[1] != mfsr.sample_times(1, 0.25, g)[0]) for _ in range(1)]
    counts = sum(int((lambda ts: (ts[1] != ts[0]).sum())(mfsr.sample_times(1, 0.25, g))) for _ in range(4000))
    assert abs(counts / 4000 - 0.25) < 0.03 and len(neq) == 1
    # s | t is uniform on [t, 1]: (s - t) / (1 - t) has mean 1/2 and variance 1/12
    t, s = mfsr.sample_times(20000, ratio=1.0, generator=g)
    r = (s - t) / (1 - t)
    assert abs(r.mean() - 0.5) < 0.01 and abs(r.var() - 1 / 12) < 0.005


def test_meanflow_identity_is_exact_on_a_closed_form_flow():
    assert identity_error() <= 1e-9


@pytest.mark.parametrize("bug", PLANTED_BUGS)
def test_identity_test_catches_planted_bugs(bug):
    assert identity_error(bug) > 1e-2
    assert identity_error() <= 1e-9                      # the bug is gone again outside planted_bug


class _ClosedFormNet:
    """A network in model.py's convention (sigma = 1 - t) whose u, through mfsr.average_velocity,
    is the closed-form flow: it outputs -u ("v") or x - z_LR with x = z + (1 - t) u ("x")."""

    def __init__(self, prediction):
        self.cfg = type("Cfg", (), {"prediction": prediction})()

    def __call__(self, z, sigma, pooled, context, lr=None, sigma_s=None):
        u = linear_flow_u(z, 1 - sigma, 1 - sigma_s)
        return -u if self.cfg.prediction == "v" else z + sigma[:, None] * u - lr


@pytest.mark.parametrize("prediction", ["v", "x"])
@pytest.mark.parametrize("bug", (None,) + PLANTED_BUGS)
def test_identity_holds_through_the_adapter_for_both_predictions(prediction, bug):
    """The JVP differentiates through the adapter: exact for both outputs, and the planted bugs show."""
    u = mfsr.average_velocity(_ClosedFormNet(prediction))
    z_lr = torch.randn(256, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    err = identity_error(bug, lambda z, t, s: u(z, t, s, mfsr.Cond(z_lr, None, None)))
    assert err <= 1e-9 if bug is None else err > 1e-2


def test_an_x_network_is_trained_on_the_error_of_its_own_output():
    """mfd_loss's scale: for an x-predicting network the distance is taken between (1 - t) u and
    (1 - t) u_tgt (the x it outputs against the x the target implies), clamped as the adapter clamps;
    a v network keeps the paper's u-space distance."""
    g = torch.Generator().manual_seed(7)
    t = torch.tensor([0.0, 0.5, 0.97, 1.0], dtype=torch.float64)
    assert mfsr.error_scale(_ClosedFormNet("v"), t) is None
    assert torch.equal(mfsr.error_scale(_ClosedFormNet("x"), t), torch.tensor([1.0, 0.5, 0.05, 0.05], dtype=torch.float64))
    _, u_fn = mlp_u()
    z, v = torch.randn(16, 2, generator=g, dtype=torch.float64), torch.randn(16, 2, generator=g, dtype=torch.float64)
    t, s = (x.double() for x in mfsr.sample_times(16, ratio=0.5, generator=g))
    u, u_tgt = mfsr.meanflow_target(u_fn, z, t, s, v)
    k = (1 - t).clamp_min(mfsr.X_PRED_MIN_SIGMA)
    for loss in mfsr.LOSSES:
        got = mfsr.mfd_loss(u_fn, z, t, s, v, loss=loss, scale=k)["loss"]
        want = mfsr.LOSSES[loss](k[:, None] * u, k[:, None] * u_tgt)[0]
        assert torch.allclose(got, want, rtol=1e-12)
        assert not torch.allclose(got, mfsr.mfd_loss(u_fn, z, t, s, v, loss=loss)["loss"], rtol=1e-3)


def test_jvp_du_dt_matches_finite_differences_on_an_mlp():
    _, u_fn = mlp_u()
    g = torch.Generator().manual_seed(1)
    z, v = torch.randn(64, 2, generator=g, dtype=torch.float64), torch.randn(64, 2, generator=g, dtype=torch.float64)
    t, s = (x.double() for x in mfsr.sample_times(64, ratio=1.0, generator=g))
    _, u_tgt = mfsr.meanflow_target(u_fn, z, t, s, v)
    dudt = (u_tgt - v) / (s - t)[:, None]
    eps = 1e-6
    fd = (u_fn(z + eps * v, t + eps, s) - u_fn(z - eps * v, t - eps, s)) / (2 * eps)
    assert ((dudt - fd).norm() / fd.norm()).item() <= 1e-6


def test_split_and_fused_give_the_same_loss_and_gradients():
    net, u_fn = mlp_u()
    g = torch.Generator().manual_seed(2)
    z, v = torch.randn(32, 2, generator=g, dtype=torch.float64), torch.randn(32, 2, generator=g, dtype=torch.float64)
    t, s = (x.double() for x in mfsr.sample_times(32, ratio=0.5, generator=g))
    out = {}
    for mode in ("split", "fused"):
        net.zero_grad()
        res = mfsr.mfd_loss(u_fn, z, t, s, v, mode=mode)
        res["loss"].backward()
        out[mode] = (res["loss"].item(), torch.cat([p.grad.flatten() for p in net.parameters()]))
    assert abs(out["split"][0] - out["fused"][0]) <= 1e-12
    assert (out["split"][1] - out["fused"][1]).abs().max() <= 1e-9
    # the stop-gradient matters: a target that is not detached gives other gradients
    net.zero_grad()
    u, dudt = torch.func.jvp(u_fn, (z, t, s), (v, torch.ones_like(t), torch.zeros_like(s)))
    mfsr.pseudo_huber(u, v + (s - t)[:, None] * dudt)[0].backward()
    leaky = torch.cat([p.grad.flatten() for p in net.parameters()])
    assert (leaky - out["split"][1]).abs().max() > 1e-3


def test_teacher_velocity_variants_follow_eq_9_to_11():
    B = 3
    z, t = torch.randn(B, 2), torch.rand(B)
    c, c_neg, c_null = (torch.full((B, 2), x) for x in (1.0, -2.0, 0.5))
    calls = []

    def teacher(zz, tt, cc):        # stub: v = c + t (known outputs per condition)
        calls.append(zz.shape[0])
        return cc.z_lr + tt[:, None]

    def student(zz, tt, ss, cc):    # stub at s = t: u = 3 c
        assert torch.equal(tt, ss)
        return 3 * cc.z_lr
    z_hr, eps = torch.randn(B, 2), torch.randn(B, 2)
    kw = dict(z_hr=z_hr, eps=eps, teacher=teacher, student_u=student,
              cond=mfsr.Cond(c, None, None), cond_neg=mfsr.Cond(c_neg, None, None), cond_null=mfsr.Cond(c_null, None, None),
              w=6.0, kappa=0.25)
    vc = c + t[:, None]
    assert torch.equal(mfsr.teacher_velocity("gt", z, t, **kw), z_hr - eps)
    assert torch.allclose(mfsr.teacher_velocity("neg", z, t, **kw), vc + 6 * (vc - (c_neg + t[:, None])))
    assert torch.allclose(mfsr.teacher_velocity("null", z, t, **kw), vc + 6 * (vc - (c_null + t[:, None])))
    assert calls == [2 * B, 2 * B]                                   # one batched call each
    mf = mfsr.teacher_velocity("meanflow", z, t, **kw)
    assert torch.allclose(mf, 6 * (z_hr - eps) + 0.25 * 3 * c + (1 - 6 - 0.25) * 3 * c_null)
    with pytest.raises(ValueError, match="unknown teacher velocity"):
        mfsr.teacher_velocity("cfg", z, t, **kw)


def test_pseudo_huber_and_nan_guard():
    a, b = torch.zeros(2, 4, 8, 8), torch.ones(2, 4, 8, 8)
    c = 0.00054 * 16                                                   # sqrt(dim) = 16
    mean, per = mfsr.pseudo_huber(a, b)
    assert torch.allclose(per, torch.full((2,), (256 + c * c) ** 0.5 - c))
    assert mfsr.pseudo_huber(a, a)[0] == 0
    u_fn = lambda z, t, s: z * float("nan")
    res = mfsr.mfd_loss(u_fn, torch.ones(2, 2), torch.zeros(2), torch.ones(2), torch.ones(2, 2))
    assert res["loss"] is None and res["n_nonfinite"] == 2


def test_mfd_loss_reports_the_size_of_the_jvp_correction():
    """u = 3 z + 5 t: du/dt = 3 v + 5, so u_tgt - v = (s - t)(3 v + 5), per row against ||v||."""
    z = torch.randn(3, 4, dtype=torch.float64)
    v = torch.randn(3, 4, dtype=torch.float64)
    t, s = torch.tensor([0.2, 0.5, 0.1], dtype=torch.float64), torch.tensor([0.6, 0.5, 0.9], dtype=torch.float64)
    res = mfsr.mfd_loss(lambda z_, t_, s_: 3 * z_ + 5 * t_[:, None], z, t, s, v)
    want = ((s - t)[:, None] * (3 * v + 5)).norm(dim=1) / v.norm(dim=1)
    assert want[1] == 0 and abs(res["jvp_term"] - want.max().item()) < 1e-12


def test_sd3_sigma_grid_matches_the_reference_values():
    sig = mfsr.sd3_sigmas(40, 3.0)
    # reference/ARCHITECTURE.md §1: 1.0, 0.99133, 0.98236, 0.97306, ..., 0.14651, 0.08105, 0.00893, 0
    assert len(sig) == 41
    for i, ref in [(0, 1.0), (1, 0.99133), (2, 0.98236), (3, 0.97306), (37, 0.14651), (38, 0.08105),
                   (39, 0.00893), (40, 0.0)]:
        assert abs(sig[i].item() - ref) < 1e-5


def test_student_sampler_steps_follow_alg_2():
    seen = []
    u_fn = lambda z, t, s: seen.append((t[0].item(), s[0].item())) or torch.ones_like(z)
    z1 = mfsr.sample(u_fn, torch.zeros(2, 3), steps=4)
    assert seen == [(0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0)]
    assert torch.allclose(z1, torch.ones(2, 3))   # constant velocity 1 over [0, 1]


# ---- toy distillation: a 2-D Gaussian-mixture teacher with CFG, distilled into an MLP

@pytest.mark.slow
def test_toy_distillation_with_teacher_cfg_gives_a_one_step_sampler():
    r = toy_eval(1.0, {"student": toy_student("neg", 1.0)})
    print(r)
    # measured (torch 2.13, CPU): teacher 1-step 1.01, 4-step 0.125; student 1-step 0.168, 2-step 0.189
    assert r["teacher 1"] > 0.9
    assert r["student 1"] < 0.3 * r["teacher 1"]
    assert r["student 2"] < 0.3 * r["teacher 1"]


@pytest.mark.slow
def test_toy_teacher_target_beats_gt_target_and_two_steps_beat_one():
    r = toy_eval(0.0, {"teacher-target": toy_student("neg", 0.0), "gt-target": toy_student("gt", 0.0)})
    print(r)
    # measured: teacher-velocity target 1-step 0.095, 2-step 0.068; gt target 1-step 0.148
    assert r["teacher-target 2"] <= r["teacher-target 1"]
    assert r["gt-target 1"] > 1.2 * r["teacher-target 1"]
    assert r["teacher-target 1"] < 0.15 * r["teacher 1"]


def _tiny_pair(dtype=torch.float64):
    torch.manual_seed(0)
    teacher = _randomize(MMDiT(CONFIGS["tiny"])).to(dtype).eval()
    student = model.make_student(teacher, lora_rank=4)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if "lora_up" in name or name.startswith("s_embedder.mlp.2"):
                p.normal_(0, 0.02)
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)
    B = 4
    z_lr = r(B, 16, 8, 6)
    cond, cond_neg = mfsr.Cond(z_lr, r(B, 32), r(B, 5, 64)), mfsr.Cond(z_lr, r(B, 32), r(B, 5, 64))
    return teacher, student, cond, cond_neg, g


def test_model_level_distillation_step_split_equals_fused():
    teacher, student, cond, cond_neg, g = _tiny_pair()
    B = cond.z_lr.shape[0]
    t, s = (x.double() for x in mfsr.sample_times(B, 0.5, g))
    z_hr, eps = torch.randn_like(cond.z_lr), torch.randn_like(cond.z_lr)
    z = t.view(-1, 1, 1, 1) * z_hr + (1 - t.view(-1, 1, 1, 1)) * eps
    v = mfsr.teacher_velocity("neg", z, t, teacher=mfsr.velocity(teacher), cond=cond, cond_neg=cond_neg, w=6.0)
    u_fn = mfsr.average_velocity(student)
    res = {}
    for mode in ("split", "fused"):
        student.zero_grad()
        u, u_tgt = mfsr.meanflow_target(u_fn, z, t, s, v, cond=cond, mode=mode)
        mfsr.pseudo_huber(u, u_tgt)[0].backward()
        res[mode] = (u_tgt, torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None]))
    same = s == t
    assert same.sum() == 2 and torch.equal(res["split"][0][same], v[same])   # s = t rows: target is v
    assert (res["split"][0] - res["fused"][0]).abs().max() <= 1e-9 * res["split"][0].abs().max()
    assert (res["split"][1] - res["fused"][1]).abs().max() <= 1e-9 * res["split"][1].abs().max()
    # rows are independent: the JVP on the s != t rows alone equals the JVP of the whole batch
    full = torch.func.jvp(lambda zz, tt, ss: u_fn(zz, tt, ss, cond), (z, t, s),
                          (v, torch.ones_like(t), torch.zeros_like(s)))[1]
    neq = ~same
    expect = v[neq] + (s - t)[neq].view(-1, 1, 1, 1) * full[neq]
    assert (res["split"][0][neq] - expect).abs().max() <= 1e-9 * expect.abs().max()


def test_x_prediction_untrained_samples_the_lr_latent_in_one_step():
    """An x-predicting network starts at output 0, i.e. x = z_LR: the teacher's one Euler step and
    the student's one step both land on z_LR exactly, and its teacher loss sees x = z_LR."""
    torch.manual_seed(0)
    teacher = MMDiT(replace(CONFIGS["tiny"], prediction="x")).eval()
    student = model.make_student(teacher, lora_rank=4)
    assert student.cfg.prediction == "x"
    g = torch.Generator().manual_seed(0)
    z_lr = torch.randn(2, 16, 8, 6, generator=g)
    pooled, ctx = torch.randn(2, 32, generator=g), torch.randn(2, 5, 64, generator=g)
    assert teacher(z_lr, torch.full((2,), 0.7), pooled, ctx, lr=z_lr).abs().max() == 0
    c = mfsr.Cond(z_lr, pooled, ctx)
    z_t = mfsr.sample_teacher(teacher, c, c, steps=1, cfg=3.0, generator=g)
    z_s = mfsr.sample_student(student, c, steps=1, generator=g)
    assert torch.allclose(z_t, z_lr, atol=1e-6) and torch.allclose(z_s, z_lr, atol=1e-6)
    x = mfsr.denoised(teacher)(torch.randn(z_lr.shape, generator=g), torch.full((2,), 0.3), c)
    assert torch.equal(x, z_lr)
    with pytest.raises(ValueError, match="prediction"):
        MMDiTConfig = type(CONFIGS["tiny"])
        MMDiTConfig(**{**asdict(CONFIGS["tiny"]), "prediction": "eps"})


def test_v_prediction_samples_as_before_and_x_is_recorded_in_the_file(tmp_path):
    """A v student's file written before x-prediction existed (no "prediction" in its config, as
    the previous release's, tag miniature-v1) loads as v and samples bit-identically to -net(...)
    in the plain Euler loop, as the adapter did before; an x model's file records x and loads it back."""
    import json
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open
    _, student, cond, _, _ = _tiny_pair(torch.float32)
    checkpoints.save_transformer(student, str(tmp_path / "v.safetensors"))
    with safe_open(str(tmp_path / "v.safetensors"), "pt") as f:
        meta = f.metadata()
    config = json.loads(meta["mfsr_config"])
    assert config.pop("prediction") == "v"
    save_file(load_file(str(tmp_path / "v.safetensors")), str(tmp_path / "old.safetensors"),
              {**meta, "mfsr_config": json.dumps(config)})
    net = checkpoints.load_transformer(str(tmp_path / "old.safetensors")).eval()
    assert net.cfg.prediction == "v"
    z_lr, pooled, ctx = cond.rows(slice(0, 1))
    with torch.no_grad():
        got = mfsr.sample_student(net, cond.rows(slice(0, 1)), steps=2, generator=torch.Generator().manual_seed(1))
        z = torch.randn(z_lr.shape, generator=torch.Generator().manual_seed(1))
        for i in range(2):
            t, s = torch.full((1,), i / 2), torch.full((1,), (i + 1) / 2)
            z = z + (s - t).view(-1, 1, 1, 1) * -net(z, 1 - t, pooled, ctx, lr=z_lr, sigma_s=1 - s)
    assert torch.equal(got, z) and z.abs().sum() > 0
    with torch.no_grad():    # the loaded student is the saved one (its LoRA merged: to rounding)
        one, half = torch.ones(1), torch.ones(1) / 2
        torch.testing.assert_close(net(z, one, pooled, ctx, lr=z_lr, sigma_s=half),
                                   student.eval()(z, one, pooled, ctx, lr=z_lr, sigma_s=half), rtol=1e-5, atol=1e-5)
    x_net = MMDiT(replace(CONFIGS["tiny"], prediction="x"))
    checkpoints.save_transformer(x_net, str(tmp_path / "x.safetensors"))
    assert checkpoints.load_transformer(str(tmp_path / "x.safetensors")).cfg.prediction == "x"


def test_samplers_on_the_tiny_model():
    teacher, student, cond, cond_neg, _ = _tiny_pair(torch.float32)
    z_lr = cond.z_lr
    out = [mfsr.sample_student(student, cond, steps=n, generator=torch.Generator().manual_seed(1))
           for n in (1, 1, 2)]
    assert out[0].shape == z_lr.shape and torch.equal(out[0], out[1]) and not torch.equal(out[0], out[2])
    calls = []
    forward = teacher.forward
    teacher.forward = lambda *a, **k: calls.append(a[0].shape[0]) or forward(*a, **k)
    zt = mfsr.sample_teacher(teacher, cond, cond_neg, steps=3, cfg=8.0,
                             generator=torch.Generator().manual_seed(1))
    assert zt.shape == z_lr.shape and calls == [8, 8, 8]     # one batched [neg ; pos] call per step
    # CFG scale 1 is the positive branch alone: one call of B rows, the same samples
    sigmas = []
    teacher.forward = lambda *a, **k: calls.append(a[0].shape[0]) or sigmas.append(a[1][0].item()) or forward(*a, **k)
    calls.clear()
    z1 = mfsr.sample_teacher(teacher, cond, cond_neg, steps=3, cfg=1.0,
                             generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    z, v = torch.randn(z_lr.shape, generator=g), mfsr.velocity(teacher)
    sig = mfsr.sd3_sigmas(3)
    for i in range(3):
        z = z + (sig[i] - sig[i + 1]).item() * v(z, torch.full((4,), 1 - sig[i].item()), cond)
    assert calls[:3] == [4, 4, 4] and torch.allclose(z1, z, atol=1e-6)
    # the uniform grid (Alg. 2's, for the teacher's rows beside the student's): sigma 1, 1/2, then 0
    calls.clear(), sigmas.clear()
    mfsr.sample_teacher(teacher, cond, cond_neg, steps=2, cfg=1.0, grid="uniform")
    assert sigmas == [1.0, 0.5] and mfsr.uniform_sigmas(4).tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    with pytest.raises(ValueError, match="grid"):
        mfsr.sample_teacher(teacher, cond, cond_neg, steps=2, grid="linear")


def test_model_du_dt_at_s_equal_t_matches_finite_differences():
    """At s = t the identity cannot see d_t u (it is multiplied by s - t = 0); check it directly
    along the trajectory, in float64, on the student through the paper-convention adapter."""
    _, student, cond, _, g = _tiny_pair()
    u = mfsr.average_velocity(student)
    B = cond.z_lr.shape[0]
    z, v = (torch.randn(cond.z_lr.shape, generator=g, dtype=torch.float64) for _ in range(2))
    t = torch.rand(B, generator=g, dtype=torch.float64) * 0.8 + 0.1
    f = lambda zz, tt, ss: u(zz, tt, ss, cond)
    _, dudt = torch.func.jvp(f, (z, t, t), (v, torch.ones_like(t), torch.zeros_like(t)))
    eps = 1e-6
    fd = (f(z + eps * v, t + eps, t) - f(z - eps * v, t - eps, t)) / (2 * eps)
    assert fd.norm() > 1e-3 and ((dudt - fd).norm() / fd.norm()).item() <= 1e-6


def test_target_stays_fp32_when_the_network_runs_in_bf16():
    teacher, student, cond, cond_neg, g = _tiny_pair(torch.float32)
    B = cond.z_lr.shape[0]
    t, s = mfsr.sample_times(B, 1.0, g)
    z, v = torch.randn(cond.z_lr.shape, generator=g), torch.randn(cond.z_lr.shape, generator=g)
    u_fn = mfsr.average_velocity(student)
    _, ref = mfsr.meanflow_target(u_fn, z, t, s, v, cond=cond)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        u, tgt = mfsr.meanflow_target(u_fn, z, t, s, v, cond=cond)
    assert u.dtype == torch.bfloat16 and tgt.dtype == torch.float32
    rel = ((tgt - ref).norm() / (ref - v).norm()).item()   # error relative to the JVP term itself
    assert rel < 0.05, rel   # bf16 rounds the JVP term to ~1%: 5% leaves room, a lost fp32 target does not


def test_eq11_w_is_the_samplers_cfg_scale_minus_one():
    """One meaning, two spellings: the teacher sampler's v_neg + scale (v_c - v_neg) is Eq. 11's
    v_c + w (v_c - v_neg) with w = eq11_w(scale); checked through both code paths on one Euler step."""
    torch.manual_seed(0)
    net = MMDiT(CONFIGS["tiny"]).eval()
    B = 2
    z_lr = torch.randn(B, 16, 8, 8)
    cond = mfsr.Cond(z_lr, torch.randn(B, 32), torch.randn(B, 4, 64))
    neg = mfsr.Cond(z_lr, torch.randn(B, 32), torch.randn(B, 4, 64))
    scale = 2.5
    z1 = mfsr.sample_teacher(net, cond, neg, steps=1, cfg=scale, generator=torch.Generator().manual_seed(3))
    z0 = torch.randn(z_lr.shape, generator=torch.Generator().manual_seed(3))
    sig = mfsr.sd3_sigmas(1)
    t = torch.full((B,), 1 - sig[0].item())
    v = mfsr.teacher_velocity("neg", z0, t, teacher=mfsr.velocity(net), cond=cond, cond_neg=neg,
                              w=mfsr.eq11_w(scale))
    assert mfsr.eq11_w(scale) == 1.5
    torch.testing.assert_close(z1, z0 + (sig[0] - sig[1]).item() * v, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("time_scale, time_cutoff, agrees", [(1.0, 0.0, True), (1000.0, 0.0, False),
                                                              (1000.0, 20.0, True)])
def test_jvp_du_dt_agrees_with_a_central_difference_only_for_a_smooth_time_embedding(time_scale, time_cutoff,
                                                                                        agrees):
    """§4.4: du/dt as the trainer computes it (meanflow_target's JVP, fp32) against a central
    difference along the flow at h = 1e-2. With c_noise = t (or 1000 t low-passed at 20 rad per
    unit t) they agree within 20 %; with SD3's 1000 t the embedding ripples faster than h resolves
    and the JVP's du/dt is the ripple's slope, not the flow's."""
    net = two_time_net(time_scale, time_cutoff)
    g = torch.Generator().manual_seed(1)
    B = 6
    z, v, z_lr = (torch.randn(B, 16, 8, 8, generator=g) for _ in range(3))
    cond = mfsr.Cond(z_lr, torch.randn(B, 32, generator=g), torch.randn(B, 4, 64, generator=g))
    t = torch.rand(B, generator=g) * 0.6 + 0.1
    s = t + 0.2
    u = mfsr.average_velocity(net)
    with torch.no_grad():
        _, u_tgt = mfsr.meanflow_target(u, z, t, s, v, cond=cond)
        dudt = (u_tgt - v) / (s - t).view(-1, 1, 1, 1)
        h = 1e-2
        fd = (u(z + h * v, t + h, s, cond) - u(z - h * v, t - h, s, cond)) / (2 * h)
    err = ((dudt - fd).flatten(1).norm(dim=1) / fd.flatten(1).norm(dim=1)).max().item()
    assert (err < 0.2) == agrees, err


def test_dudt_terms_split_the_jvp_and_see_the_ripple():
    """dudt_terms: time + noise terms are the JVP's du/dt (the tangent is linear); the time term's
    secant over h = 0.1 is near the time term for c_noise = t and far below it for 1000 t."""
    g = torch.Generator().manual_seed(2)
    B = 4
    z, v, z_lr = (torch.randn(B, 16, 8, 8, generator=g) for _ in range(3))
    cond = mfsr.Cond(z_lr, torch.randn(B, 32, generator=g), torch.randn(B, 4, 64, generator=g))
    t = torch.tensor([0.1, 0.3, 0.5, 0.95])
    s = torch.tensor([0.6, 0.3, 0.9, 1.0])          # one row with s = t: left out
    ratio = {}
    for scale in (1.0, 1000.0):
        u = mfsr.average_velocity(two_time_net(scale))
        d = mfsr.dudt_terms(u, z, t, s, v, cond=cond)
        rows = torch.tensor([0, 2, 3])
        with torch.no_grad():
            _, u_tgt = mfsr.meanflow_target(u, z[rows], t[rows], s[rows], v[rows], cond=cond.rows(rows))
        dudt = (u_tgt - v[rows]) / (s - t)[rows].view(-1, 1, 1, 1)
        rms = dudt.flatten(1).pow(2).mean(1).sqrt().mean().item()
        assert d["dudt_jvp"] == pytest.approx(rms, rel=1e-4)
        assert d["dudt_time"] > 0 and d["dudt_noise"] > 0 and d["dudt_secant"] > 0
        ratio[scale] = d["dudt_time"] / d["dudt_secant_time"]
    assert 0.5 < ratio[1.0] < 2 and ratio[1000.0] > 5, ratio
    assert mfsr.dudt_terms(u, z, t, t, v, cond=cond) == {}


def test_time_pair_options():
    g = lambda: torch.Generator().manual_seed(3)                                     # noqa: E731
    for pairs in mfsr.TIME_PAIRS:
        t, s = mfsr.sample_times(4000, ratio=0.75, generator=g(), pairs=pairs)
        assert (t >= 0).all() and (s <= 1).all() and (s >= t).all()
        assert (s[:3000] != t[:3000]).all() and (s[3000:] == t[3000:]).all()        # the ratio holds
    t, s = mfsr.sample_times(4000, ratio=0.75, generator=g(), pairs="to-data")
    assert (s[:3000:2] == 1).all() and (s[1:3000:2] < 1).all()                       # every other row jumps to data
    corner = lambda t, s: ((t < 0.1) & (s > 0.9)).float().mean().item()               # noqa: E731
    assert corner(t, s) > 3 * corner(*mfsr.sample_times(4000, 0.75, g()))           # the one-step corner: ~5x
    t, s = mfsr.sample_times(4000, ratio=0.75, generator=g(), pairs="logit-normal")
    noise = 1 - t[:3000]                                                             # sigmoid(N(-0.4, 1)) max of two
    assert abs(torch.logit(1 - s[:3000]).mean().item() - torch.logit(noise).mean().item()) > 0.5
    for pairs in mfsr.TIME_PAIRS:
        t, s = mfsr.sample_times(4000, ratio=1.0, generator=g(), pairs=pairs, max_gap=0.25)
        assert (s - t <= 0.25 + 1e-6).all() and (s - t).max() > 0.2
    a, b = mfsr.sample_times(64, 0.5, g()), mfsr.sample_times(64, 0.5, g(), pairs="uniform", max_gap=1.0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])                       # the paper's draw unchanged
    with pytest.raises(ValueError, match="pairs must be one of"):
        mfsr.sample_times(4, pairs="corner")


def test_a_later_start_runs_the_same_grid_from_z_t0():
    """start = t0: the student's steps split [t0, 1] uniformly from z_t0 = t0 z_lr + (1 - t0) eps, and
    the teacher's sigmas are its grid's scaled by 1 - t0; t0 = 0 is Alg. 2 bit for bit."""
    teacher, student, cond, cond_neg, _ = _tiny_pair(torch.float32)
    seen = []
    forward = student.forward
    student.forward = lambda z, sigma, *a, **k: seen.append((z.clone(), 1 - sigma, 1 - k["sigma_s"])) or forward(z, sigma, *a, **k)
    g = lambda: torch.Generator().manual_seed(4)                                 # noqa: E731
    eps = torch.randn(cond.z_lr.shape, generator=g())
    with torch.no_grad():
        today = mfsr.sample_student(student, cond, steps=2, generator=g())
        assert torch.equal(mfsr.sample_student(student, cond, steps=2, generator=g(), start=0.0), today)
        assert torch.equal(seen[0][0], eps)                                    # from pure noise
        seen.clear()
        later = mfsr.sample_student(student, cond, steps=2, generator=g(), start=0.5)
    assert [(t[0].item(), s[0].item()) for _, t, s in seen] == [(0.5, 0.75), (0.75, 1.0)]
    torch.testing.assert_close(seen[0][0], 0.5 * cond.z_lr + 0.5 * eps)
    assert not torch.equal(later, today)
    sigmas = []
    forward_t = teacher.forward
    teacher.forward = lambda z, sigma, *a, **k: sigmas.append(sigma[0].item()) or forward_t(z, sigma, *a, **k)
    for grid, full in (("shifted", mfsr.sd3_sigmas(3)), ("uniform", mfsr.uniform_sigmas(3))):
        sigmas.clear()
        mfsr.sample_teacher(teacher, cond, cond_neg, steps=3, cfg=1.0, generator=g(), grid=grid, start=0.25)
        assert sigmas == pytest.approx((0.75 * full[:3]).tolist(), abs=1e-6)      # through fp32 t = 1 - sigma
    with pytest.raises(ValueError, match="start"):
        mfsr.sample_student(student, cond, start=1.0)
