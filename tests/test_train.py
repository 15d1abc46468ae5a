"""Tests of train.py (tiny preset, CPU): the stages end to end, resuming, two processes, the losses, its messages."""

import io
import json
import math
import os
import re
import time
from dataclasses import asdict, fields, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import fastjvp
import mfsr
import model
import sample
import train
from builders import _TINY, _images, _randomize
from model import CONFIGS, MMDiT
from plumbing import checkpoints, images, pairs, runs


def _fixed_teacher_loss(net, data):
    """The teacher-stage loss of `net` on one fixed batch with fixed noise (mean of 4 draws)."""
    cfg = train.parse_args(_TINY + ["--data", data, "--stage", "teacher"])
    torch.manual_seed(cfg.seed)
    vae_ = train.vae_lib.VAE(train.vae_lib.CONFIGS["tiny"]).eval()
    null = mfsr.Cond(None, torch.zeros(32), torch.zeros(1, 64))
    import degrade
    ds = pairs.PairDataset(images.find_images(data), 32, null, degrade.DegradeConfig())
    batch = pairs.collate([ds[(i, 100 + i)] for i in range(4)])
    g = torch.Generator().manual_seed(0)
    z_hr, z_lr = train.encode_pair(vae_, batch, g)
    cfg.caption_dropout = 0.0
    with torch.no_grad():
        mb = dict(z_hr=z_hr, z_lr=z_lr, context=batch["context"], pooled=batch["pooled"], null=null)
        return sum(train.teacher_loss(net, mb, cfg, g).item() for _ in range(4)) / 4


@pytest.mark.slow
def test_train_tiny_teacher_then_distill_end_to_end(tmp_path):
    data = _images(tmp_path / "data")
    t_out, s_out = tmp_path / "teacher", tmp_path / "student"
    train.main(_TINY + ["--data", data, "--stage", "teacher", "--steps", "40", "--lr", "1e-3",
                        "--out", str(t_out), "--save-every", "40", "--sample-every", "40"])
    teacher_file = t_out / "ckpt-0000040" / "teacher.safetensors"
    trained = checkpoints.load_transformer(str(teacher_file)).eval()
    torch.manual_seed(0)
    init = MMDiT(CONFIGS["tiny"]).eval()                       # what train.py starts from (seed 0)
    before, after = _fixed_teacher_loss(init, data), _fixed_teacher_loss(trained, data)
    assert after < 0.95 * before, (before, after)   # measured 1.97 -> 1.75 (stand-in degradation)
    assert (t_out / "grid-0000040.png").exists()
    train.main(_TINY + ["--data", data, "--teacher", str(teacher_file), "--steps", "3", "--lora-rank", "4",
                        "--out", str(s_out), "--save-every", "3", "--sample-every", "3"])
    student = checkpoints.load_transformer(str(s_out / "ckpt-0000003" / "student.safetensors"))
    assert student.cfg.two_times and student.cfg.time_scale == 1.0 and student.cfg.lr_stream
    # the export records its training tile (32^2 crops / the tiny VAE's x4 = 8) for sample.py
    assert student.sampling == {"tile": 8, "tile_overlap": 4} and trained.sampling["tile"] == 8
    assert trained.sampling["shift"] == 3.0          # the teacher's sampler grid: its training's --time-shift
    logs = [json.loads(line) for line in (s_out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in logs)
    assert all(math.isfinite(r["jvp_term"]) and r["jvp_term"] >= 0 for r in logs)
    assert "dudt_time" not in logs[0] and logs[-1]["dudt_secant"] > 0   # du/dt's terms on printed steps, the last
    # sample.py takes the export as it is: student, the VAE and the prompt embedding beside it
    from PIL import Image as PILImage
    PILImage.fromarray((torch.rand(12, 10, 3) * 255).byte().numpy()).save(tmp_path / "lr.png")
    assert sample.main([str(tmp_path / "lr.png"), "--ckpt", str(s_out / "ckpt-0000003" / "student.safetensors"),
                        "-o", str(tmp_path / "sr")]) == 0
    with PILImage.open(tmp_path / "sr" / "lr_mfsr.png") as im:
        assert im.size == (40, 48)


def test_train_export_carries_the_ema_weights(tmp_path):
    data = _images(tmp_path / "data")
    args = ["--data", data, "--stage", "teacher", "--steps", "3", "--lr", "1e-2", "--ema", "0.5", "--lr-decay", "cosine",
            "--out", str(tmp_path / "t"), "--save-every", "3", "--sample-every", "100"]
    train.main(_TINY + args)
    logged = [json.loads(line)["lr"] for line in (tmp_path / "t" / "log.jsonl").read_text().splitlines()]
    cfg = train.parse_args(_TINY + args)
    assert logged == [train.learning_rate(cfg, s) for s in range(3)] and logged[0] > logged[1] > logged[2]
    ck = tmp_path / "t" / "ckpt-0000003"
    saved = load_file(str(ck / "trainable.safetensors"))
    exported = checkpoints.load_transformer(str(ck / "teacher.safetensors")).state_dict()
    ema = {k[4:]: v for k, v in saved.items() if k.startswith("ema.")}
    assert ema and set(ema) == {k for k in saved if not k.startswith("ema.")}
    for name, value in ema.items():
        assert torch.equal(exported[name], value), name
    assert any(not torch.equal(saved[n], ema[n]) for n in ema)      # the live weights differ from the EMA


@pytest.mark.slow
@pytest.mark.parametrize("cache", [[], ["--cache-latents", "6"]])
def test_train_resume_repeats_the_uninterrupted_run(tmp_path, cache):
    data = _images(tmp_path / "data")
    common = _TINY + ["--data", data, "--lora-rank", "4", "--save-every", "2"] + cache
    train.main(common + ["--steps", "4", "--out", str(tmp_path / "a")])
    train.main(common + ["--steps", "2", "--out", str(tmp_path / "b")])
    if cache:   # the resumed run must reuse the cache, not encode new pairs
        (tmp_path / "b" / "latents-0.safetensors").touch()
        stamp = (tmp_path / "b" / "latents-0.safetensors").stat().st_mtime_ns
    train.main(common + ["--steps", "4", "--out", str(tmp_path / "b"), "--resume"])
    losses = lambda d: [json.loads(line)["loss"] for line in (tmp_path / d / "log.jsonl").read_text().splitlines()]
    assert len(losses("a")) == 4 and losses("a") == losses("b")
    if cache:
        assert (tmp_path / "b" / "latents-0.safetensors").stat().st_mtime_ns == stamp
        z = load_file(tmp_path / "a" / "latents-0.safetensors")
        assert z["z_hr"].shape == (6, 16, 8, 8) and z["z_lr"].shape == z["z_hr"].shape
        assert not torch.equal(z["z_hr"], z["z_lr"])


@pytest.mark.slow
def test_train_compile_gives_the_eager_losses(tmp_path):
    """--compile (the student's forward with gradients and its JVP, static shapes) trains like the eager run."""
    data = _images(tmp_path / "data")
    common = _TINY + ["--data", data, "--lora-rank", "4", "--steps", "2", "--save-every", "2"]
    train.main(common + ["--out", str(tmp_path / "eager")])
    from torch._dynamo.utils import counters
    counters.clear()
    train.main(common + ["--out", str(tmp_path / "compiled"), "--compile"])
    assert counters["stats"]["unique_graphs"] >= 1             # the compiled path really ran
    logs = lambda d: [json.loads(line) for line in (tmp_path / d / "log.jsonl").read_text().splitlines()]
    eager, compiled = logs("eager"), logs("compiled")
    assert [r["step"] for r in compiled] == [1, 2]
    for a, b in zip(eager, compiled):   # step 2 also checks the update made from step 1's gradients
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4) and a["loss"] > 0
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3)


@pytest.mark.slow
def test_distill_step_with_compile_and_grad_ckpt_gives_the_eager_loss_and_gradients():
    """--compile --grad-ckpt as main builds it (the student and fastjvp.func_jvp compiled with static
    shapes, every block checkpointed), one distill step inside lean_memory() with backward outside
    it, as main runs it: the loss and gradients of the eager step, and the JVP really compiled.
    The fused mode: its grad-enabled JVP puts the checkpointed blocks, the JVP and its backward into
    one compiled graph, and its s = t rows run the compiled student with checkpointing (the split
    mode's two passes are each a part of that; test_train_compile_gives_the_eager_losses runs it).
    The eager reference runs without checkpointing, which gives the same gradients
    (test_gradient_checkpointing_gives_the_same_gradients) and which the eager fused mode needs:
    there backward would recompute a block outside the JVP's forward-AD level.
    Tolerance: 1e-4 relative on the loss, 1e-4 of the largest gradient entry on every entry, as
    test_train_compile_gives_the_eager_losses: inductor fuses and reorders fp32 sums (measured here:
    8e-8 on the loss, 2.8e-7 on the gradients); a wrong path (a block recomputed another way, a
    tangent leaking into the gradient) adds or drops whole terms, far above it."""
    torch.manual_seed(0)
    teacher = _randomize(MMDiT(replace(CONFIGS["tiny"], depth=1))).eval().requires_grad_(False)   # one block:
    student = _randomize(model.make_student(teacher, lora_rank=4), std=0.02, seed=1)   # the compile time
    for net in (teacher, student):                                                      # as main
        fastjvp.accelerate(net)
    trainable = [p for p in student.parameters() if p.requires_grad]
    cfg = train.parse_args(_TINY + ["--data", "data", "--out", "/nonexistent/out", "--mode", "fused"])
    g = torch.Generator().manual_seed(0)
    z_hr, z_lr, ctx, pooled = (torch.randn(*shape, generator=g) for shape in ((2, 16, 8, 8), (2, 16, 8, 8),
                                                                            (2, 3, 64), (2, 32)))
    null = mfsr.Cond(None, torch.zeros(32), torch.zeros(1, 64))
    batch = dict(z_hr=z_hr, z_lr=z_lr, context=ctx, pooled=pooled, null=null, neg=null)

    def step(run, jvp, grad_ckpt):
        student.grad_checkpointing = grad_ckpt
        student.zero_grad(set_to_none=True)
        with fastjvp.lean_memory():
            loss, _ = train.distill_loss(run, teacher, batch, cfg, torch.Generator().manual_seed(1), 0, jvp)
        loss.backward()
        assert all(p.grad is not None for p in trainable)
        return loss.item(), torch.cat([p.grad.flatten() for p in trainable])
    eager_loss, eager_grad = step(student, mfsr.jvp, False)
    from torch._dynamo.utils import counters
    torch._dynamo.reset()          # no compiled code of an earlier test
    counters.clear()
    jvp = torch.compile(fastjvp.func_jvp, dynamic=False)
    loss, grad = step(torch.compile(student, dynamic=False), jvp, True)
    assert counters["stats"]["unique_graphs"] == 2 and not counters["graph_break"]   # the student, the JVP
    assert len(torch._dynamo.eval_frame._debug_get_cache_entry_list(fastjvp.func_jvp)) == 1
    assert loss == pytest.approx(eager_loss, rel=1e-4) and eager_loss > 0
    assert eager_grad.abs().max() > 0 and (grad - eager_grad).abs().max() <= 1e-4 * eager_grad.abs().max()


def _ddp_worker(rank, world, init_file, data_file, out_file, mode):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    student, d = _ddp_student(), torch.load(data_file)
    params = [p for p in student.parameters() if p.requires_grad]
    runs.BUCKET_ELEMENTS = 5000        # many buckets, some tensors larger than one
    u = mfsr.average_velocity(student)
    for a in (0, 1):                   # this rank's two rows as two accumulated micro-batches
        row = slice(2 * rank + a, 2 * rank + a + 1)
        res = mfsr.mfd_loss(u, d["z"][row], d["t"][row], d["s"][row], d["v"][row],
                            cond=mfsr.Cond(*d["cond"]).rows(row), mode=mode)
        (res["loss"] / 2).backward()
    runs.all_reduce_grads(params)
    torch.save({n: p.grad for n, p in student.named_parameters() if p.grad is not None}, f"{out_file}.{rank}")
    dist.barrier()                     # as train.py ends: no rank tears gloo down while another still talks
    dist.destroy_process_group()


def _ddp_student():
    torch.manual_seed(0)
    student = model.make_student(_randomize(MMDiT(CONFIGS["tiny"])), lora_rank=4)
    with torch.no_grad():
        for n, p in student.named_parameters():
            if "lora_up" in n:
                p.normal_(0, 0.02)
    return student


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["split", "fused"])
def test_two_process_gradients_equal_one_process_on_the_union_batch(tmp_path, mode):
    import torch.multiprocessing as mp
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 16, 8, 8, generator=g)
    d = {"z": z, "v": torch.randn_like(z), "t": torch.tensor([0.1, 0.5, 0.3, 0.7]),
         "s": torch.tensor([0.6, 0.5, 0.9, 0.8]),
         "cond": (torch.randn_like(z), torch.randn(4, 32, generator=g), torch.randn(4, 5, 64, generator=g))}   # a file: plain
    torch.save(d, tmp_path / "data.pt")
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "data.pt"), str(tmp_path / "g"), mode),
             nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"g.{r}") for r in (0, 1)]
    student = _ddp_student()
    mfsr.mfd_loss(mfsr.average_velocity(student), d["z"], d["t"], d["s"], d["v"], cond=mfsr.Cond(*d["cond"]),
                  mode=mode)["loss"].backward()
    one = {n: p.grad for n, p in student.named_parameters() if p.grad is not None}
    assert set(one) == set(ranks[0]) == set(ranks[1]) and len(one) > 10
    for n, g1 in one.items():
        assert torch.equal(ranks[0][n], ranks[1][n]), n
        assert (ranks[0][n] - g1).abs().max() <= 1e-5 * (g1.abs().max() + 1e-8), n


def _torchrun_worker(rank, world, port, argv, out):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    saved = runs.save_checkpoint

    def spy(cfg, net, *args, **kw):      # every rank's trainable weights, to compare across ranks
        torch.save({n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad},
                   os.path.join(out, f"weights-{rank}.pt"))
        return saved(cfg, net, *args, **kw)

    runs.save_checkpoint = spy
    train.main(argv)


@pytest.mark.slow
def test_train_main_under_two_processes_keeps_ranks_in_step(tmp_path):
    """train.main as torchrun starts it (RANK / WORLD_SIZE / MASTER_* in the environment), fused
    JVP mode with gradient accumulation: both ranks end with identical weights, which moved."""
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    data = _images(tmp_path / "data", n=4)
    out = tmp_path / "run"
    argv = _TINY + ["--data", data, "--steps", "2", "--lora-rank", "4", "--mode", "fused", "--accum", "2",
                    "--save-every", "2", "--out", str(out)]
    mp.spawn(_torchrun_worker, args=(2, port, argv, str(tmp_path)), nprocs=2, join=True)
    w0, w1 = (torch.load(tmp_path / f"weights-{r}.pt") for r in (0, 1))
    assert set(w0) == set(w1) and all(torch.equal(w0[n], w1[n]) for n in w0)
    lines = (out / "log.jsonl").read_text().splitlines()
    assert len(lines) == 2 and all(math.isfinite(json.loads(x)["loss"]) for x in lines)
    first = load_file(out / "ckpt-0000002" / "trainable.safetensors")
    assert all(torch.equal(first[n], w0[n]) for n in w0)
    init = model.make_student(MMDiT(CONFIGS["tiny"]), lora_rank=4)
    assert any(not torch.equal(w0[n], p) for n, p in init.named_parameters() if n in w0 and "lora_up" in n)


def test_train_bad_inputs_give_clear_messages(tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit, match="no such folder"):
        train.main(_TINY + ["--data", str(tmp_path / "absent"), "--out", str(tmp_path / "o")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no images"):
        train.main(_TINY + ["--data", str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit):
        train.main(_TINY + ["--data", str(tmp_path / "empty"), "--stage", "student"])
    assert "--stage 'student': choose from distill, teacher" in capsys.readouterr().err
    with pytest.raises(SystemExit):   # progress grids written into the data would be trained on
        train.main(_TINY + ["--data", str(tmp_path / "empty"), "--out", str(tmp_path / "empty" / "run")])
    assert "is inside --data" in capsys.readouterr().err and not (tmp_path / "empty" / "run").exists()
    data = _images(tmp_path / "data", n=2)
    (tmp_path / "data" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")      # no header
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "data" / "tiny.png")   # below the 32^2 crop
    good = Image.open(Path(data) / "img0.png")       # a whole header, the pixel data cut short
    good.save(tmp_path / "data" / "cut.png")
    raw = (tmp_path / "data" / "cut.png").read_bytes()
    (tmp_path / "data" / "cut.png").write_bytes(raw[:len(raw) // 2])
    out = tmp_path / "run"
    train.main(_TINY + ["--data", data, "--steps", "6", "--lora-rank", "4", "--out", str(out), "--save-every", "6"])
    captured = capsys.readouterr()
    # each bad file is named once: the two found before training, the cut one when first drawn
    assert captured.err.count("broken.png") == 1 and "unreadable" in captured.err
    assert captured.err.count("tiny.png") == 1 and "20x20, smaller than the 32x32 crop" in captured.err
    assert captured.err.count("cut.png") == 1
    assert "2 of 5 images were left out before training" in captured.out
    assert re.search(r"\d+ draws of 1 unreadable image\(s\) were skipped: .*cut.png", captured.out)
    # a run whose losses are all non-finite stops with the step and the images, keeping what was written
    monkeypatch.setattr(mfsr, "mfd_loss", lambda *a, **k: {"loss": None, "per_sample": None, "n_nonfinite": 2,
                                                            "jvp_term": float("nan")})
    with pytest.raises(SystemExit, match=r"2 non-finite steps in a row, stopping at step \d+ \(.*img"):
        train.main(_TINY + ["--data", data, "--steps", "10", "--lora-rank", "4", "--out", str(out),
                            "--resume", "--max-bad", "2"])
    assert (out / "ckpt-0000006" / "student.safetensors").exists()


def test_teacher_loss_negative_rows_get_the_negative_prompt_and_the_lr_target():
    cfg = train.parse_args(_TINY + ["--data", "x", "--stage", "teacher", "--caption-dropout", "0"])
    g = torch.Generator().manual_seed(0)
    z_hr, z_lr = torch.randn(3, 16, 4, 4, generator=g), torch.randn(3, 16, 4, 4, generator=g)
    ctx, pooled = torch.randn(3, 2, 64, generator=g), torch.randn(3, 32, generator=g)
    null, neg = mfsr.Cond(None, torch.zeros(32), torch.zeros(1, 64)), mfsr.Cond(None, torch.ones(32), torch.ones(3, 64))
    seen = {}

    def net(x, sigma, pooled, context, lr):   # predicts the velocity that lands exactly on z_lr
        seen.update(context=context, pooled=pooled)
        return (x - lr) / sigma.view(-1, 1, 1, 1)

    for neg_prob, want_loss in ((1.0, 0.0), (0.0, (z_lr - z_hr).pow(2).mean().item())):
        cfg.neg_prob = neg_prob
        loss = train.teacher_loss(net, dict(z_hr=z_hr, z_lr=z_lr, context=ctx, pooled=pooled, null=null, neg=neg), cfg, g)
        assert abs(loss.item() - want_loss) < 1e-5 * max(1, want_loss)
        if neg_prob:   # every row: the negative prompt, padded to the longer length
            assert seen["context"].shape == (3, 3, 64) and (seen["context"] == 1).all() and (seen["pooled"] == 1).all()
        else:
            assert torch.equal(seen["context"], ctx)


def test_teacher_loss_time_shift_is_sd3s_shift_of_the_logit_normal_sigma():
    """--time-shift a: sigma = a u / (1 + (a - 1) u), u = sigmoid(N(0, 1)): median a / (1 + a)
    (0.75 for SD3.5's 3, 0.5 without a shift); a shift <= 0 is refused by name."""
    z = torch.zeros(4000, 1, 1, 1)
    seen = []

    def net(x, sigma, pooled, context, lr):
        seen.append(sigma)
        return torch.zeros_like(x)
    for shift in (3.0, 1.0):
        cfg = train.parse_args(_TINY + ["--data", "x", "--stage", "teacher", "--time-shift", str(shift)])
        train.teacher_loss(net, dict(z_hr=z, z_lr=z, context=torch.zeros(4000, 2, 64), pooled=torch.zeros(4000, 32),
                                     null=mfsr.Cond(None, torch.zeros(32), torch.zeros(1, 64))), cfg, torch.Generator().manual_seed(0))
        assert abs(seen[-1].median().item() - shift / (1 + shift)) < 0.02, (shift, seen[-1].median())
    assert (seen[0] > seen[1]).all()                         # the same u, shifted towards noise
    with pytest.raises(SystemExit):
        train.parse_args(_TINY + ["--data", "x", "--time-shift", "0"])


def test_depth_and_heads_size_a_tiny_teacher_from_scratch_and_are_refused_elsewhere(capsys):
    """--depth / --heads (the size scan's): the teacher stage builds that size, the unset one keeps
    the tiny config's value; for a distill stage, a given --teacher or the full preset they are refused."""
    tiny = model.CONFIGS["tiny"]
    for flags, want in ((["--depth", "2", "--heads", "1"], (2, 1)), (["--depth", "4"], (4, tiny.heads)), ([], (3, 2))):
        cfg = train.parse_args(_TINY + ["--data", "x", "--stage", "teacher"] + flags)
        net, _, _ = train.build_models(cfg, torch.device("cpu"))
        assert (net.cfg.depth, net.cfg.heads, len(net.joint_blocks), net.cfg.hidden) == (*want, want[0], 64 * want[1])
        assert net.cfg.lr_stream and net.cfg.dual_layers == tiny.dual_layers
    assert (tiny.depth, tiny.heads) == (3, 2)
    for bad in (["--stage", "distill", "--depth", "2"], ["--stage", "teacher", "--teacher", "t.safetensors", "--heads", "1"],
                ["--stage", "teacher", "--preset", "full", "--depth", "2"], ["--stage", "teacher", "--heads", "-1"],
                ["--stage", "distill", "--prediction", "x"]):
        with pytest.raises(SystemExit):
            train.parse_args(_TINY + ["--data", "x"] + bad)
        assert "--depth" in capsys.readouterr().err, bad


def test_train_learning_rate_schedules():
    cfg = train.parse_args(["--data", "d", "--lr", "2e-3", "--steps", "100", "--lr-decay", "cosine"])
    lrs = [train.learning_rate(cfg, s) for s in range(100)]
    assert lrs[0] == 2e-3 and abs(lrs[50] - 1e-3) < 1e-12 and 0 < lrs[99] < 1e-6
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    assert {train.learning_rate(replace(cfg, lr_decay="none"), s) for s in range(100)} == {2e-3}


# ---- train.py: the traps a new user walks into


def test_train_help_gives_every_flag_a_text_its_default_and_choices_in_groups(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    text = capsys.readouterr().out
    for group in ("data:", "model:", "stage:", "optimisation:", "checkpoints and logs:", "distributed and speed",
                  "miniature and extensions"):
        assert f"\n{group}" in text, group
    flags = fields(train.TrainConfig)
    body = " ".join(text.split())
    helps = {f.name: f.metadata["help"] for f in fields(train.TrainConfig)}   # flag()'s text
    for f in flags:
        flag = "--" + f.name.replace("_", "-")
        assert body.count(flag + " ") + body.count(flag + ",") >= 1, flag
        first_words = " ".join(helps[f.name].split()[:3])
        assert len(helps[f.name]) > 10 and first_words in body, f.name   # its comment is its help
    assert "[default: 12000]" in body and "[default: 5e-05]" in body and "(choices: distill, teacher)" in body
    assert "(choices: gt, meanflow, null, neg)" in body


def _other_value(f, tmp_path):
    """A value of TrainConfig field `f` other than its default that parse_args accepts."""
    d = f.default
    if f.name in train.CHOICES:
        return next(c for c in reversed(train.CHOICES[f.name]) if c not in (d, "fp16"))   # fp16 is refused
    if isinstance(d, bool):
        return True
    if isinstance(d, int):
        return d + 32                                  # --size a multiple of 32, counts >= 0
    if isinstance(d, float):
        return d / 2 + 0.125                           # a share stays in [0, 1), a scale stays > 0
    path = tmp_path / f.name                           # the embedding flags must name files
    path.write_bytes(b"")
    return str(path)


def test_every_train_config_field_is_a_flag_that_round_trips(capsys, tmp_path):
    """The flags --help lists are exactly TrainConfig's fields, and a config with every field away
    from its default, written as those flags, parses back to itself. Two configs: --depth / --heads /
    --prediction shape a teacher from scratch, which a --teacher file rules out."""
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    listed = re.findall(r"^\s+(?:-\w, )?(--[\w-]+)", capsys.readouterr().out, re.MULTILINE)
    flag_of = {f[2:].replace("-", "_"): f for f in listed if f != "--help"}
    assert sorted(flag_of) == sorted(f.name for f in fields(train.TrainConfig))
    other = {f.name: _other_value(f, tmp_path) for f in fields(train.TrainConfig)}
    assert all(v != getattr(train.TrainConfig, k) for k, v in other.items())
    scratch = ("depth", "heads", "prediction")
    for kept in (("teacher",), scratch):
        want = train.TrainConfig(**{k: v for k, v in other.items() if k not in kept})
        argv = []
        for name, value in asdict(want).items():
            if value != getattr(train.TrainConfig, name):
                argv += [flag_of[name]] if value is True else [flag_of[name], str(value)]
        assert train.parse_args(argv) == want, argv


def test_train_refuses_an_untrained_vae_unless_asked(tmp_path):
    data = _images(tmp_path / "data", n=2)
    base = [a for a in _TINY if a != "--untrained-vae"] + ["--data", data, "--steps", "1", "--out", str(tmp_path / "o")]
    for stage in ("teacher", "distill"):
        with pytest.raises(SystemExit, match="--vae.*--untrained-vae"):
            train.main(base + ["--stage", stage])
    assert not (tmp_path / "o" / "ckpt-0000001").exists()


def test_train_without_one_usable_image_stops_before_step_one(tmp_path, capsys):
    d = tmp_path / "data"
    d.mkdir()
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(d / "small.png")
    (d / "bad.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(SystemExit, match="none of the 2 images in --data is usable"):
        train.main(_TINY + ["--data", str(d), "--steps", "2", "--out", str(tmp_path / "o")])
    assert not any(p.name.startswith("ckpt-") for p in (tmp_path / "o").iterdir())
    assert not (tmp_path / "o" / "log.jsonl").exists()


def test_train_resume_falls_back_from_a_truncated_checkpoint_keeps_it_and_logs_each_step_once(tmp_path, capsys):
    data = _images(tmp_path / "data")
    out = tmp_path / "run"
    common = _TINY + ["--data", data, "--lora-rank", "4", "--save-every", "2", "--out", str(out)]
    old = os.umask(0o022)
    try:
        train.main(common + ["--steps", "4"])
    finally:
        os.umask(old)
    # files are written with the umask's permissions (0644), as everything else in the tree
    for f in (out / "ckpt-0000004").iterdir():
        assert f.stat().st_mode & 0o777 == 0o644, (f.name, oct(f.stat().st_mode))
    reference = {k: v.clone() for k, v in load_file(out / "ckpt-0000004" / "trainable.safetensors").items()}
    t = out / "ckpt-0000004" / "trainable.safetensors"
    t.write_bytes(t.read_bytes()[: t.stat().st_size // 2])              # a crash mid-write, or a full disk
    cut = t.stat().st_size
    capsys.readouterr()
    train.main(common + ["--steps", "4", "--resume"])
    printed = capsys.readouterr().out
    assert "ckpt-0000004 is not a whole checkpoint" in printed and "resuming from" in printed and "step 2)" in printed
    assert (out / "ckpt-0000004.broken" / "trainable.safetensors").stat().st_size == cut   # kept aside, as it was
    again = load_file(out / "ckpt-0000004" / "trainable.safetensors")   # steps 3-4 redone from step 2
    assert all(torch.equal(again[k], reference[k]) for k in reference)
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_train_clean_prob_gives_bicubic_pairs_and_the_plain_gt(tmp_path):
    import degrade
    null = mfsr.Cond(None, torch.zeros(32), torch.zeros(1, 64))
    rng = np.random.default_rng(1)
    folder = tmp_path
    Image.fromarray((rng.random((48, 48, 3)) * 255).astype(np.uint8)).save(folder / "a.png")
    paths = images.find_images(str(folder))
    clean = pairs.PairDataset(paths, 32, null, degrade.DegradeConfig(gt_size=32), clean_prob=1.0)
    real = pairs.PairDataset(paths, 32, null, degrade.DegradeConfig(gt_size=32, usm_gt=False), clean_prob=0.0)
    for seed in range(3):
        c, r = clean[(0, seed)], real[(0, seed)]
        assert torch.equal(c["gt"], r["gt"])                               # the same crop, not sharpened
        assert torch.equal(c["lr"], degrade.bicubic_down(c["gt"][None])[0])
        assert not torch.equal(r["lr"], c["lr"])
    mixed = pairs.PairDataset(paths, 32, null, degrade.DegradeConfig(gt_size=32, usm_gt=False), clean_prob=0.5)
    n_clean = sum(torch.equal(mixed[(0, k)]["lr"], degrade.bicubic_down(mixed[(0, k)]["gt"][None])[0]) for k in range(40))
    assert 8 <= n_clean <= 32, n_clean
    cfg = train.parse_args(["--data", str(folder), "--plain-gt", "--clean-prob", "0.3"])
    assert cfg.plain_gt and cfg.clean_prob == 0.3


def test_distill_warmup_steps_have_every_row_at_s_equal_t(monkeypatch):
    """--warmup N: the first N steps sample times at ratio 0 (no s != t rows, no JVP), then cfg.ratio."""
    seen = []
    real = mfsr.sample_times
    monkeypatch.setattr(mfsr, "sample_times", lambda B, ratio, g, **kw: seen.append(ratio) or real(B, ratio, g, **kw))
    cfg = train.parse_args(["--data", "data", "--out", "/nonexistent/out", "--preset", "tiny", "--warmup", "2",
                            "--ratio", "0.5", "--target", "gt"])
    torch.manual_seed(0)
    teacher = MMDiT(CONFIGS["tiny"]).eval()
    student = model.make_student(teacher, lora_rank=4)
    z = torch.randn(2, 16, 8, 8)
    ctx, pooled = torch.randn(2, 4, 64), torch.randn(2, 32)
    null = mfsr.Cond(None, torch.zeros(32), torch.zeros(1, 64))
    logs = []
    for step in range(4):
        _, log = train.distill_loss(student, teacher, dict(z_hr=z, z_lr=z, context=ctx, pooled=pooled, null=null, neg=null),
                                    cfg, torch.Generator().manual_seed(step), step)
        logs.append(log["jvp_term"])
    assert seen == [0.0, 0.0, 0.5, 0.5]
    assert logs[0] == logs[1] == 0.0 and logs[2] > 0 and logs[3] > 0


def test_distill_time_pairs_gap_ramp_and_the_du_dt_diagnostic_reach_the_step(monkeypatch):
    """--time-pairs and --gap-ramp (the cap on s - t rises by 1 / gap_ramp a step after --warmup)
    reach mfsr.sample_times; a diagnosed step logs du/dt's terms, the others do not."""
    seen = []
    real = mfsr.sample_times
    monkeypatch.setattr(mfsr, "sample_times", lambda B, ratio, g, **kw: seen.append(kw) or real(B, ratio, g, **kw))
    cfg = train.parse_args(["--data", "data", "--out", "/nonexistent/out", "--preset", "tiny", "--warmup", "1",
                            "--time-pairs", "to-data", "--gap-ramp", "4", "--ratio", "1", "--target", "gt",
                            "--diagnose-every", "4"])                    # step 3 is a diagnosed step
    torch.manual_seed(0)
    student = model.make_student(MMDiT(CONFIGS["tiny"]).eval(), lora_rank=4)
    z = torch.randn(2, 16, 8, 8)
    ctx, pooled, null = torch.randn(2, 4, 64), torch.randn(2, 32), mfsr.Cond(None, torch.zeros(32), torch.zeros(1, 64))
    logs = []
    for step in range(4):
        logs.append(train.distill_loss(student, None, dict(z_hr=z, z_lr=z, context=ctx, pooled=pooled, null=null, neg=null),
                                       cfg, torch.Generator().manual_seed(step), step)[1])
    assert [k["pairs"] for k in seen] == ["to-data"] * 4 and [k["max_gap"] for k in seen][1:] == [0.25, 0.5, 0.75]
    keys = {"dudt_time", "dudt_noise", "dudt_jvp", "dudt_secant_time", "dudt_secant"}
    assert keys <= set(logs[3]) and all(math.isfinite(logs[3][k]) and logs[3][k] > 0 for k in keys)
    assert not keys & set(logs[2])
    for bad in (["--time-pairs", "corner"], ["--gap-ramp", "-1"]):
        with pytest.raises(SystemExit):
            train.parse_args(["--data", "data", "--preset", "tiny", *bad])


def test_distill_anchor_rows_regress_the_one_step_jump_on_the_teachers_samples(monkeypatch):
    """--anchor 0.5: after the warm-up the last half of the rows is trained at (t, s) = (0, 1) on the
    teacher's 40-step sample from the noise it starts the student from (cfg scale cfg_w + 1), the
    rest on Eq. 12; the step's loss is the row-weighted mean of the two."""
    calls = []

    def fake_teacher_sampler(net, cond, cond_neg, steps, cfg, shift, noise, **kw):
        calls.append((cond.z_lr.shape[0], steps, cfg, noise.clone()))
        return noise + 0.5                                                # a known endpoint
    monkeypatch.setattr(mfsr, "sample_teacher", fake_teacher_sampler)
    cfg = train.parse_args(["--data", "data", "--out", "/nonexistent/out", "--preset", "tiny", "--anchor", "0.5",
                            "--warmup", "1", "--cfg-w", "0.5", "--target", "gt"])
    torch.manual_seed(0)
    teacher = MMDiT(CONFIGS["tiny"]).eval()
    student = model.make_student(teacher, lora_rank=4)
    z, z_lr = torch.randn(4, 16, 8, 8), torch.randn(4, 16, 8, 8)
    ctx, pooled, null = torch.randn(4, 4, 64), torch.randn(4, 32), mfsr.Cond(None, torch.zeros(32), torch.zeros(1, 64))
    batch = dict(z_hr=z, z_lr=z_lr, context=ctx, pooled=pooled, null=null, neg=null)
    with torch.no_grad():
        warm, log = train.distill_loss(student, teacher, batch, cfg, torch.Generator().manual_seed(0), 0)
        assert not calls and "anchor_loss" not in log                    # no anchor rows in the warm-up
        loss, log = train.distill_loss(student, teacher, batch, cfg, torch.Generator().manual_seed(1), 1)
        (n, steps, scale, z0), = calls
        assert (n, steps, scale) == (2, 40, 1.5)
        u = mfsr.average_velocity(student)(z0, torch.zeros(2), torch.ones(2), mfsr.Cond(z_lr[2:], pooled[2:], ctx[2:]))
        expect = mfsr.pseudo_huber(u, torch.full_like(u, 0.5))[0]
        assert log["anchor_loss"] == pytest.approx(expect.item(), rel=1e-5)
        cfg.anchor = 0.0                                                   # the other rows alone: Eq. 12
        rest, _ = train.distill_loss(student, teacher, {k: v[:2] if torch.is_tensor(v) else v for k, v in batch.items()},
                                     cfg, torch.Generator().manual_seed(1), 1)
    assert loss.item() == pytest.approx((rest.item() * 2 + expect.item() * 2) / 4, rel=1e-5)
    with pytest.raises(SystemExit):
        train.parse_args(["--data", "data", "--preset", "tiny", "--anchor", "1"])


@pytest.mark.parametrize("target", ["meanflow", "neg"])
def test_distill_cond_drop_trains_the_null_branch_unguided(monkeypatch, target):
    """--cond-drop 1: every row's condition is the null prompt and its target the unguided velocity
    (meanflow: the data path z_HR - eps; neg: the teacher's v(z | null)); --kappa reaches Eq. 9."""
    seen = {}
    real_tv, real_loss = mfsr.teacher_velocity, mfsr.mfd_loss
    monkeypatch.setattr(mfsr, "teacher_velocity", lambda *a, **k: seen.update(tv=k) or real_tv(*a, **k))
    monkeypatch.setattr(mfsr, "mfd_loss", lambda u, z, t, s, v, **k: seen.update(z=z, t=t, v=v, cond=k["cond"])
                        or real_loss(u, z, t, s, v, **k))
    cfg = train.parse_args(["--data", "data", "--out", "/nonexistent/out", "--preset", "tiny", "--target", target,
                            "--cond-drop", "1", "--kappa", "0.5", "--cfg-w", "2"])
    torch.manual_seed(0)
    teacher = MMDiT(CONFIGS["tiny"]).eval()
    student = model.make_student(teacher, lora_rank=4)
    g = torch.Generator().manual_seed(1)
    z_hr, z_lr = torch.randn(3, 16, 8, 8, generator=g), torch.randn(3, 16, 8, 8, generator=g)
    ctx, pooled = torch.randn(3, 4, 64, generator=g), torch.randn(3, 32, generator=g)
    null = mfsr.Cond(None, torch.ones(32), torch.zeros(1, 64))
    neg = mfsr.Cond(None, torch.full((32,), 2.0), torch.full((4, 64), 2.0))
    train.distill_loss(student, teacher, dict(z_hr=z_hr, z_lr=z_lr, context=ctx, pooled=pooled, null=null, neg=neg), cfg,
                       torch.Generator().manual_seed(2))
    c_pooled, c_ctx = seen["cond"].pooled, seen["cond"].context
    assert torch.equal(c_pooled, torch.ones(3, 32)) and not c_ctx[:, :1].any()          # null everywhere
    assert seen["tv"]["kappa"] == 0.5 and seen["tv"]["w"] == 2.0
    if target == "meanflow":
        expected = seen["tv"]["z_hr"] - seen["tv"]["eps"]
    else:
        with torch.no_grad():
            expected = mfsr.velocity(teacher)(seen["z"], seen["t"], seen["cond"])
    torch.testing.assert_close(seen["v"], expected, rtol=1e-5, atol=1e-5)


def test_train_refuses_a_prompt_embedding_path_that_does_not_exist(tmp_path, capsys):
    """A mistyped --null-emb / --neg-emb / --prompt-emb is an error naming the flag and the path, not a
    silent run on the zero (null) prompt."""
    real = tmp_path / "neg.safetensors"
    real.write_bytes(b"")
    assert train.parse_args(_TINY + ["--data", "x", "--neg-emb", str(real)]).neg_emb == str(real)
    for flag in ("--null-emb", "--neg-emb", "--prompt-emb"):
        with pytest.raises(SystemExit):
            train.parse_args(_TINY + ["--data", "x", flag, str(tmp_path / "typo.safetensors")])
        assert f"{flag} {tmp_path / 'typo.safetensors'}: no such file" in capsys.readouterr().err


def test_log_step_writes_null_peak_where_the_system_reports_none(monkeypatch, capsys):
    """Without /proc (macOS, Windows) cli.peak_memory_mb is NaN: log.jsonl gets peak_mb null, valid
    JSON, and the printed line still comes; with a figure, peak_mb is its rounded value."""
    cfg = train.parse_args(_TINY + ["--data", "x", "--steps", "4", "--log-every", "2"])
    for peak, want in ((float("nan"), None), (123.4, 123)):
        monkeypatch.setattr(runs, "peak_memory_mb", lambda device, p=peak: p)
        log = io.StringIO()
        runs.log_step(cfg, log, 2, 0, time.time() - 1, 0.5, torch.tensor(1.0), 1e-4, torch.device("cpu"), {})
        rec = json.loads(log.getvalue(), parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
        assert rec["peak_mb"] == want and rec["step"] == 2
        assert f"peak {want} MB" in capsys.readouterr().out


def test_saves_write_the_merged_export_only_at_the_end_and_a_resume_needs_the_same_world_size(tmp_path, capsys):
    """A save holds what a resume needs (trainable weights, optimizer, prompts); the merged model
    sample.py reads (10 GB at full scale) comes with the last one or --export-every-save. The world
    size is recorded: each rank's data and noise are seeded by its rank, so another one is refused."""
    data = _images(tmp_path / "data", n=2)
    common = _TINY + ["--data", data, "--lora-rank", "4", "--steps", "2", "--save-every", "1", "--keep", "5"]
    train.main(common + ["--out", str(tmp_path / "a")])
    first, last = tmp_path / "a" / "ckpt-0000001", tmp_path / "a" / "ckpt-0000002"
    assert {"trainable.safetensors", "optimizer.safetensors", "null.safetensors"} <= set(os.listdir(first))
    assert not (first / "student.safetensors").exists() and (last / "student.safetensors").exists()
    train.main(common + ["--out", str(tmp_path / "b"), "--export-every-save"])
    assert (tmp_path / "b" / "ckpt-0000001" / "student.safetensors").exists()
    cfg = train.parse_args(common + ["--out", str(tmp_path / "a")])
    net, _, _ = train.build_models(cfg, torch.device("cpu"))
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad])
    assert runs.load_checkpoint(cfg, net, opt, world=1)[0] == 2
    with pytest.raises(SystemExit, match="written by a run of 1 process.*this one has 2"):
        runs.load_checkpoint(cfg, net, opt, world=2)


def test_merged_export_equals_merge_lora_and_is_written_one_tensor_at_a_time(tmp_path, monkeypatch):
    """runs.save_full: the LoRA update (and EMA weights) merged in fp32 tensor by tensor, read back equal
    to model.merge_lora of the same student (bf16 frozen weights included); the file format is
    safetensors' own (load_file reads every dtype, 0-d tensors included)."""
    import copy
    student = _ddp_student()
    train.store_in(student, torch.bfloat16)
    ema = {n: p.detach() + 0.01 for n, p in student.named_parameters() if "lora_up" in n}
    made = []
    real = checkpoints.Later.__init__
    monkeypatch.setattr(checkpoints.Later, "__init__",
                        lambda self, shape, dtype, make: real(self, shape, dtype, lambda: made.append(1) or make()))
    runs.save_full(student, str(tmp_path / "s.safetensors"), {"tile": 8}, ema)
    want = copy.deepcopy(student).float()
    with torch.no_grad():
        for n, p in want.named_parameters():
            if n in ema:
                p.copy_(ema[n])
    want = model.merge_lora(want).state_dict()
    got = checkpoints.load_transformer(str(tmp_path / "s.safetensors"))
    assert len(made) == len(want) and got.sampling == {"tile": 8}
    for k, v in got.state_dict().items():
        assert v.dtype == torch.float32 and torch.allclose(v, want[k], rtol=1e-6, atol=1e-7), k
    tensors = {"f": torch.randn(3, 5), "h": torch.randn(2, 7).bfloat16(), "i": torch.arange(4), "b": torch.tensor([True, False]),
               "s": torch.tensor(2.5), "e": torch.zeros(0, 3)}
    checkpoints.atomic_save(tensors, str(tmp_path / "t.safetensors"), {"k": "v"})
    back = load_file(str(tmp_path / "t.safetensors"))
    assert set(back) == set(tensors) and all(torch.equal(back[k], v) and back[k].dtype == v.dtype for k, v in tensors.items())


def test_data_workers_default_to_this_processes_share_of_the_cpus(monkeypatch, capsys):
    cfg = train.parse_args(["--data", "d"])
    monkeypatch.setattr(os, "cpu_count", lambda: 96)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert cfg.workers == -1 and train.data_workers(cfg) == 8          # 12 CPUs each, at most 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")
    assert train.data_workers(cfg) == 3
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert train.data_workers(cfg) == 1
    assert train.data_workers(train.parse_args(["--data", "d", "--workers", "0"])) == 0
    with pytest.raises(SystemExit):
        train.parse_args(["--data", "d", "--workers", "-2"])
