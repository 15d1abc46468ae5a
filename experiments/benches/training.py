"""train: seconds and peak memory of one step of train.py per stage, eager and compiled; data
pairs per second per worker."""
import time

import torch

from benches.common import _as_programs_run, bench, median_times, peak_mb

# train: train.py's step functions (teacher stage, distill split / fused), eager and compiled,
# on random latents (the data pipeline is measured on its own: pairs per second in one process)


def _train_case(cfg, h, B, compiled):
    import fastjvp
    import mfsr
    import model
    import train
    torch.manual_seed(0)
    teacher = model.MMDiT(cfg)
    trained_teacher = model.MMDiT(cfg)                      # the teacher stage trains its control layers
    trained_teacher.load_state_dict(teacher.state_dict())
    for n, p in trained_teacher.named_parameters():
        p.requires_grad_("control" in n and n not in set(model.dead_lr_params(trained_teacher)))
    student = fastjvp.accelerate(model.make_student(teacher, lora_rank=16))   # as train.py
    fastjvp.accelerate(teacher), fastjvp.accelerate(trained_teacher)
    teacher.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    z_hr, z_lr = torch.randn(B, 16, h, h, generator=g), torch.randn(B, 16, h, h, generator=g)
    ctx, pooled = torch.randn(B, 8, cfg.context_dim, generator=g), torch.randn(B, cfg.pooled_dim, generator=g)
    null = mfsr.Cond(None, torch.zeros(cfg.pooled_dim), torch.zeros(1, cfg.context_dim))
    neg = mfsr.Cond(None, torch.randn(cfg.pooled_dim, generator=g), torch.randn(8, cfg.context_dim, generator=g))
    run_t = torch.compile(trained_teacher, dynamic=False) if compiled else trained_teacher   # as train.py
    run_s = torch.compile(student, dynamic=False) if compiled else student
    jvp = torch.compile(fastjvp.func_jvp, dynamic=False) if compiled else mfsr.jvp

    def step(net, loss_fn, mode="split"):
        def go():
            tc = train.parse_args(["--data", "-", "--preset", "tiny", "--mode", mode])
            net.zero_grad(set_to_none=True)
            loss_fn(tc)[0].backward()
        return _as_programs_run(go)

    batch = dict(z_hr=z_hr, z_lr=z_lr, context=ctx, pooled=pooled, null=null, neg=neg)
    fns = {"teacher stage": step(trained_teacher, lambda tc: (train.teacher_loss(run_t, batch, tc, g),))}
    for mode in ("split", "fused"):
        fns[f"distill {mode}"] = step(student, lambda tc: train.distill_loss(run_s, teacher, batch, tc, g, jvp=jvp),
                                      mode)
    return fns


def _pairs_per_second(size, n=6):
    """train.PairDataset (crop, degrade.py, embeddings) items per second in this process."""
    import tempfile

    import numpy as np
    from PIL import Image

    import degrade
    import mfsr
    from plumbing import images, pairs
    with tempfile.TemporaryDirectory() as d:
        rng = np.random.default_rng(0)
        for i in range(3):   # smooth random photographs-to-be, larger than the crop
            small = rng.random((size // 16, size // 16, 3)) * 255
            Image.fromarray(small.astype(np.uint8)).resize((size + 64, size + 64), Image.BICUBIC).save(f"{d}/{i}.png")
        ds = pairs.PairDataset(images.find_images(d), size, mfsr.Cond(None, torch.zeros(32), torch.zeros(1, 64)),
                                degrade.DegradeConfig())
        ds[(0, 0)]
        t0 = time.perf_counter()
        for i in range(n):
            ds[(i % 3, i + 1)]
        return n / (time.perf_counter() - t0)


@bench
def bench_train(args):
    """Seconds and peak memory of one training step per stage; data pairs per second per worker."""
    import model
    from dataclasses import replace
    tiny = model.CONFIGS["tiny"]
    cases = [("tiny", tiny, 16, 4)]                      # 64^2 HR through the x4 tiny VAE, batch 4
    if not args.quick:
        cases.append(("6x384", replace(tiny, depth=6, heads=6, dual_layers=(0, 1, 2), pos_grid=64), 32, 4))
    rows, figures = [], {}
    for name, cfg, h, B in cases:
        for compiled in (False,) if args.quick else (False, True):
            fns = _train_case(cfg, h, B, compiled)
            for fn in fns.values():      # compile (and first-call) time is not part of a step
                fn()
            times = median_times(fns, repeat=3, warmup=1)
            mems = {k: peak_mb(fn)[1] for k, fn in fns.items()}
            for k in fns:
                rows.append({"config": name, "latent": f"{B}x16x{h}x{h}", "compile": compiled, "step": k,
                             "steps/s": 1 / times[k], "x teacher stage": times[k] / times["teacher stage"],
                             "peak MB": mems[k]})
                figures[f"{name}/{'compiled' if compiled else 'eager'}/{k}"] = {"s": times[k], "peak_mb": mems[k]}
    for size in (128,) if args.quick else (128, 512):
        pps = _pairs_per_second(size)
        rows.append({"config": f"data {size}^2", "latent": "-", "compile": "-", "step": "pairs (crop+degrade)",
                     "steps/s": pps, "x teacher stage": "-", "peak MB": "-"})
        figures[f"data {size} pairs/s per worker"] = pps
    return f"train.py steps (threads {torch.get_num_threads()}; random latents, LoRA rank 16)", rows, figures
