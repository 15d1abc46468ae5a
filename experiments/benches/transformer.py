"""model: the transformer's forward, JVP and training-step variants; mfsr: one MeanFlow-distillation
step (split / fused) vs plain training steps. Time and peak memory of each."""
import os

import torch

from benches.common import _as_programs_run, bench, median_times, peak_mb


# --------------------------------------------------------------------------------------------
# model: forward, JVP (custom attention vs the math backend), JVP + backward


def _model_case(cfg, H, W, B=1, L=16, two_times=True):
    import fastjvp
    import mfsr
    import model
    from dataclasses import replace
    torch.manual_seed(0)
    net = fastjvp.accelerate(model.MMDiT(replace(cfg, two_times=two_times, time_scale=1.0)))   # as train.py
    x = torch.randn(B, 16, H, W)
    args = dict(pooled=torch.randn(B, cfg.pooled_dim), context=torch.randn(B, L, cfg.context_dim),
                lr=torch.randn_like(x), sigma_s=torch.rand(B))
    f = lambda x_, t_: net(x_, t_, **args)
    sigma, tx, tt = torch.rand(B), torch.randn_like(x), torch.ones(B)

    def jvp(mode):
        def run():
            with torch.no_grad(), fastjvp.attention_mode(mode):
                return mfsr.jvp(f, (x, sigma), (tx, tt))      # as mfsr.py runs it
        return run

    def fwd():
        with torch.no_grad():
            return f(x, sigma)

    def fwd_bwd():
        net.zero_grad(set_to_none=True)
        f(x, sigma).square().mean().backward()

    def split():          # target by a no-grad JVP, then an ordinary forward + backward
        _, dudt = jvp("auto")()
        net.zero_grad(set_to_none=True)
        (f(x, sigma) - dudt).square().mean().backward()

    def fused():          # one grad-enabled JVP; backward through its primal output (as mfsr.py)
        net.zero_grad(set_to_none=True)
        with fastjvp.detached_tangents():
            u, dudt = mfsr.jvp(f, (x, sigma), (tx, tt))
        (u - dudt.detach()).square().mean().backward()
    fns = {"forward": fwd, "fwd+bwd": fwd_bwd, "jvp custom": jvp("auto"), "jvp math": jvp("math"),
           "split jvp+fwd+bwd": split, "fused jvp+bwd": fused}
    return {k: _as_programs_run(f) for k, f in fns.items()}



def _load_row(cfg):
    """Peak memory of load_transformer vs the file size: one copy of the weights, not two."""
    import tempfile
    import model
    from plumbing import checkpoints
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "t.safetensors")
        checkpoints.save_transformer(model.MMDiT(cfg), path)
        size = os.path.getsize(path) / 2 ** 20
        secs = median_times({"load": lambda: checkpoints.load_transformer(path)}, repeat=1, warmup=0)["load"]
        mb = peak_mb(lambda: checkpoints.load_transformer(path))[1]
    return {"config": "6x384", "tokens (X+LR)": "-",
            "variant": f"load_transformer: {size:.0f} MB file, peak/file {mb / size:.2f}",
            "seconds": secs, "peak MB": mb, "x fwd mem": "-", "time ratio": "-"}


@bench
def bench_model(args):
    """Time and peak memory of the transformer's forward, JVP and training-step variants."""
    import model
    from dataclasses import replace
    cpu = replace(model.CONFIGS["tiny"], depth=6, heads=6, dual_layers=(0, 1, 2), pos_grid=64)
    cases = [("tiny", model.CONFIGS["tiny"], 16, 16, 5)]
    if not args.quick:   # 2 x 1024 tokens for all variants, 2 x 2048 for the memory target
        cases += [("6x384", cpu, 64, 64, 3), ("6x384", cpu, 128, 64, 1)]
    rows, figures = [], {}
    for name, cfg, H, W, repeat in cases:
        tokens = 2 * (H // 2) * (W // 2)
        fns = _model_case(cfg, H, W)
        if tokens >= 4096:   # only what the memory target needs at this size
            fns = {k: fns[k] for k in ("forward", "jvp custom", "jvp math")}
        times = median_times(fns, repeat=repeat, warmup=1)
        mems = {k: peak_mb(fn)[1] for k, fn in fns.items()}
        base_t = times.get("fwd+bwd", times["forward"])
        for k in fns:
            rows.append({"config": name, "tokens (X+LR)": tokens, "variant": k, "seconds": times[k],
                         "x fwd+bwd" if "fwd+bwd" in times else "x forward": times[k] / base_t,
                         "peak MB": mems[k], "x fwd mem": mems[k] / mems["forward"]})
            figures[f"{name}/{tokens}/{k}"] = {"s": times[k], "peak_mb": mems[k]}
    for r in rows:   # one column name for the time ratio
        r["time ratio"] = r.pop("x fwd+bwd", None) or r.pop("x forward")
    rows.append(_load_row(cpu))
    note = "time ratio: vs fwd+bwd of the same case (vs forward at 4096 tokens)"
    return f"model (threads {torch.get_num_threads()}; {note})", rows, figures


# --------------------------------------------------------------------------------------------
# mfsr: one MeanFlow-distillation step (split / fused) vs plain training steps


def _mfsr_case(cfg, H, W, B=2, L=16, rank=16):
    import fastjvp
    import mfsr
    import model
    torch.manual_seed(0)
    teacher = model.MMDiT(cfg)
    student = fastjvp.accelerate(model.make_student(teacher, lora_rank=rank))   # as train.py
    fastjvp.accelerate(teacher)
    for p in teacher.parameters():
        p.requires_grad_(False)
    z_hr, eps, z_lr = (torch.randn(B, 16, H, W) for _ in range(3))
    c = mfsr.Cond(z_lr, torch.randn(B, cfg.pooled_dim), torch.randn(B, L, cfg.context_dim))
    c_neg = mfsr.Cond(z_lr, torch.randn(B, cfg.pooled_dim), torch.randn(B, L, cfg.context_dim))
    u, v_t = mfsr.average_velocity(student), mfsr.velocity(teacher)
    g = torch.Generator().manual_seed(0)

    def mfd(mode, ratio=0.5):
        def step():
            t, s = mfsr.sample_times(B, ratio, g)
            z = t.view(-1, 1, 1, 1) * z_hr + (1 - t.view(-1, 1, 1, 1)) * eps
            v = mfsr.teacher_velocity("neg", z, t, teacher=v_t, cond=c, cond_neg=c_neg, w=6.0)
            student.zero_grad(set_to_none=True)
            with fastjvp.detached_tangents():                     # as train.py runs it
                mfsr.mfd_loss(u, z, t, s, v, cond=c, mode=mode)["loss"].backward()
        return step

    def plain_student():
        t, s = mfsr.sample_times(B, 0.5, g)
        student.zero_grad(set_to_none=True)
        mfsr.pseudo_huber(u(z_hr, t, s, c), eps)[0].backward()

    def teacher_rf():     # DiT4SR-style stage: only the control layers train
        for n, p in teacher.named_parameters():
            p.requires_grad_("control" in n)
        t = torch.rand(B, generator=g)
        z = t.view(-1, 1, 1, 1) * z_hr + (1 - t.view(-1, 1, 1, 1)) * eps
        teacher.zero_grad(set_to_none=True)
        (v_t(z, t, c) - (z_hr - eps)).square().mean().backward()
        for p in teacher.parameters():
            p.requires_grad_(False)
    fns = {"student fwd+bwd": plain_student, "teacher RF fwd+bwd": teacher_rf,
           "MFD split": mfd("split"), "MFD fused": mfd("fused"), "MFD split, ratio 1": mfd("split", 1.0)}
    return {k: _as_programs_run(f) for k, f in fns.items()}


@bench
def bench_mfsr(args):
    """One MFD training step (split / fused; ratio 0.5 and 1) vs plain student and teacher steps."""
    import model
    from dataclasses import replace
    cpu = replace(model.CONFIGS["tiny"], depth=6, heads=6, dual_layers=(0, 1, 2), pos_grid=64)
    cases = [("tiny", model.CONFIGS["tiny"], 16, 16, 16, 5)]
    if not args.quick:
        cases.append(("6x384", cpu, 32, 32, 64, 3))
    rows, figures = [], {}
    for name, cfg, H, W, rank, repeat in cases:
        fns = _mfsr_case(cfg, H, W, rank=rank)
        times = median_times(fns, repeat=repeat, warmup=1)
        mems = {k: peak_mb(fn)[1] for k, fn in fns.items()}
        for k in fns:
            rows.append({"config": name, "latent": f"2x16x{H}x{W}", "step": k, "seconds": times[k],
                         "x student step": times[k] / times["student fwd+bwd"], "peak MB": mems[k],
                         "mem x student": mems[k] / mems["student fwd+bwd"]})
            figures[f"{name}/{k}"] = {"s": times[k], "peak_mb": mems[k]}
    return f"mfsr training steps (threads {torch.get_num_threads()})", rows, figures
