"""A GPU's device boundary, checked on the CPU: the models and tensors live on the `meta` device,
standing in for a GPU's, while the generators are made as train.py and sample.py make them.
CUDA refuses a draw on the GPU from a CPU generator ("Expected a 'cuda' device type for
generator"), and torch.where refuses a CPU mask among GPU tensors; meta refuses the second and
this file's mode flags the first, so a step that would stop on the first GPU stops here."""

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

import mfsr
import model
import sample
import train
import vae as vae_lib
from builders import _TINY
from plumbing import checkpoints, runs

# Reading a meta tensor's values: stand-ins, so that code paths that print or branch on a value go on
_READS = {torch.Tensor.item: lambda t: False if t.dtype == torch.bool else 0,
          torch.Tensor.__bool__: lambda t: False, torch.Tensor.__float__: lambda t: 0.0,
          torch.Tensor.__int__: lambda t: 0, torch.Tensor.__index__: lambda t: 0,
          torch.Tensor.tolist: lambda t: np.zeros(t.shape).tolist(),
          torch.Tensor.cpu: lambda t: torch.zeros(t.shape, dtype=t.dtype),
          torch.Tensor.numpy: lambda t: np.zeros(t.shape)}


class GeneratorDevices(TorchFunctionMode):
    """Records every draw made with an explicit generator, and those whose output lies on another
    device than the generator (what CUDA refuses). Lets meta tensors be read (as zeros)."""

    def __init__(self):
        super().__init__()
        self.draws, self.crossed = 0, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _READS and args and isinstance(args[0], torch.Tensor) and args[0].is_meta:
            return _READS[func](args[0])
        out = func(*args, **kwargs)
        g = kwargs.get("generator")
        if isinstance(g, torch.Generator):
            self.draws += 1
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.device != g.device:
                    self.crossed.append(f"{getattr(func, '__name__', func)}: generator on {g.device}, "
                                        f"draw on {t.device}")
        return out


@pytest.fixture
def on_meta():
    """The mode for a body with meta tensors, where (s != t).nonzero() counts every row."""
    import torch.fx.experimental._config as fx_config
    with fx_config.patch(meta_nonzero_assume_all_nonzero=True):
        yield GeneratorDevices()


def _meta_models():
    with torch.device("meta"):
        teacher = model.MMDiT(model.CONFIGS["tiny"]).eval().requires_grad_(False)
        vae = vae_lib.VAE(vae_lib.CONFIGS["tiny"]).eval().requires_grad_(False)
    return teacher, vae


def _meta_batch(B=4, size=32, L=5):
    with torch.device("meta"):
        return {"gt": torch.zeros(B, 3, size, size), "lr": torch.zeros(B, 3, size // 4, size // 4),
                "context": torch.zeros(B, L, 64), "pooled": torch.zeros(B, 32), "names": [f"{i}" for i in range(B)]}


def _prompts():
    with torch.device("meta"):
        null = mfsr.Cond(None, torch.zeros(32), torch.zeros(1, 64))
        neg = mfsr.Cond(None, torch.zeros(32), torch.zeros(3, 64))
    return null, neg


def _check(mode, least):
    assert not mode.crossed, "draws from a generator on another device:\n" + "\n".join(mode.crossed)
    assert mode.draws >= least, f"only {mode.draws} draws with a generator: the path did not run"


def test_teacher_step_draws_on_its_generators_device(on_meta, tmp_path):
    teacher, vae = _meta_models()
    cfg = train.parse_args(_TINY + ["--data", str(tmp_path), "--stage", "teacher", "--caption-dropout", "0.3",
                                    "--neg-prob", "0.3"])
    null, neg = _prompts()
    g = torch.Generator().manual_seed(0)                          # as train.main makes it
    with on_meta:
        batch = _meta_batch()
        z_hr, z_lr = train.encode_pair(vae, batch, g)
        mb = dict(z_hr=z_hr, z_lr=z_lr, context=batch["context"], pooled=batch["pooled"], null=null, neg=neg)
        loss = train.teacher_loss(teacher, mb, cfg, g)
    assert loss.is_meta and loss.shape == ()
    _check(on_meta, 4)


def test_distill_step_draws_on_its_generators_device(on_meta, tmp_path):
    teacher, vae = _meta_models()
    with torch.device("meta"):
        student = model.make_student(teacher, lora_rank=4)
    cfg = train.parse_args(_TINY + ["--data", str(tmp_path), "--anchor", "0.25", "--cond-drop", "0.5",
                                    "--diagnose-every", "1"])
    null, neg = _prompts()
    g = torch.Generator().manual_seed(0)
    with on_meta:
        batch = _meta_batch()
        z_hr, z_lr = train.encode_pair(vae, batch, g)
        mb = dict(z_hr=z_hr, z_lr=z_lr, context=batch["context"], pooled=batch["pooled"], null=null, neg=neg)
        loss, info = train.distill_loss(student, teacher, mb, cfg, g, step=0)
        t, s = mfsr.sample_times(4, 0.5, g, device="meta", pairs="logit-normal")
    assert t.is_meta and s.is_meta
    assert loss.is_meta and "dudt_time" in info and "anchor_loss" in info   # every branch ran
    _check(on_meta, 8)


def test_progress_grid_and_upscale_draw_on_their_generators_device(on_meta, tmp_path):
    teacher, vae = _meta_models()
    with torch.device("meta"):
        student = model.make_student(teacher, lora_rank=4)
    null, _ = _prompts()
    with on_meta:
        batch = _meta_batch(B=2)
        z_lr = torch.zeros(2, 16, 8, 8, device="meta")
        runs.save_grid(str(tmp_path / "grid.png"), vae, student, "distill", batch, z_lr)
        runs.save_grid(str(tmp_path / "grid-teacher.png"), vae, teacher, "teacher", batch, z_lr)
        for net, is_teacher in ((student, False), (teacher, True)):
            y = sample.upscale(torch.rand(1, 3, 8, 8), net, vae, checkpoints.prompt_rows(null), steps=2,
                               teacher=is_teacher, tile=8, tile_overlap=0)
            assert y.shape == (1, 3, 32, 32)
    assert (tmp_path / "grid.png").exists() and (tmp_path / "grid-teacher.png").exists()
    _check(on_meta, 4)
