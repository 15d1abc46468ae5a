"""The method's wiring, where a one-line slip would pass every numerical test: the convention
distill_loss builds z_t in, which time the s-embedder sees, and which image the colour fix follows."""
import pytest
import torch
import torch.nn.functional as F

import mfsr
import model
import sample
import train
from model import CONFIGS, MMDiT
from plumbing import checkpoints
from builders import _TINY


def test_distill_loss_builds_z_t_in_the_papers_convention(monkeypatch):
    """Alg. 1 l. 5, z_t = t z_HR + (1 - t) eps with t = 0 noise: with the gt target v = z_HR - eps,
    z_t + (1 - t) v lands on z_HR and z_t - t v on eps, row by row (t and 1 - t swapped fails both)."""
    seen = {}
    real = mfsr.mfd_loss
    monkeypatch.setattr(mfsr, "mfd_loss", lambda u, z, t, s, v, **k: seen.update(z=z, t=t, v=v) or real(u, z, t, s, v, **k))
    cfg = train.parse_args(_TINY + ["--data", "data", "--target", "gt", "--ratio", "1"])
    torch.manual_seed(0)
    teacher = MMDiT(CONFIGS["tiny"]).eval()
    student = model.make_student(teacher, lora_rank=4)
    g = torch.Generator().manual_seed(3)
    z_hr, z_lr = torch.randn(4, 16, 8, 8, generator=g), torch.randn(4, 16, 8, 8, generator=g)
    null = mfsr.Cond(None, torch.zeros(32), torch.zeros(1, 64))
    batch = dict(z_hr=z_hr, z_lr=z_lr, context=torch.randn(4, 2, 64), pooled=torch.randn(4, 32), null=null, neg=null)
    train.distill_loss(student, teacher, batch, cfg, g)
    t = seen["t"].view(-1, 1, 1, 1)
    assert 0.05 < seen["t"].std() and (seen["t"] - 0.5).abs().max() > 0.1       # t differs from 1 - t in every sense
    torch.testing.assert_close(seen["z"] + (1 - t) * seen["v"], z_hr, rtol=1e-5, atol=1e-5)
    eps = seen["z"] - t * seen["v"]
    assert abs(eps.std().item() - 1) < 0.2 and (eps - z_hr).abs().mean() > 0.5   # the noise, not the data


def _student_with_a_live_s_embedder():
    torch.manual_seed(0)
    student = model.make_student(MMDiT(CONFIGS["tiny"]), lora_rank=4).eval()
    with torch.no_grad():                  # make_student zeroes its last layer: as trained, it is not zero
        for p in student.s_embedder.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return student


def test_the_student_sees_both_of_its_times():
    """u(z, t, s): with a non-zero s-embedder, changing s at fixed t and t at fixed s each change the
    output (the s-embedder fed sigma instead of sigma_s makes u blind to s)."""
    student = _student_with_a_live_s_embedder()
    u = mfsr.average_velocity(student)
    g = torch.Generator().manual_seed(1)
    z, z_lr = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 16, 8, 8, generator=g)
    c = mfsr.Cond(z_lr, torch.randn(2, 32, generator=g), torch.randn(2, 3, 64, generator=g))
    at = lambda t, s: u(z, torch.full((2,), t), torch.full((2,), s), c)      # noqa: E731
    with torch.no_grad():
        base = at(0.2, 0.6)
        scale = base.abs().mean()
        assert (at(0.2, 0.9) - base).abs().mean() > 1e-3 * scale               # s moves, t fixed
        assert (at(0.4, 0.6) - base).abs().mean() > 1e-3 * scale               # t moves, s fixed
        # and s enters as sigma_s = 1 - s through the s-embedder: the network called directly agrees
        direct = -student(z, torch.full((2,), 0.8), c.pooled, c.context, lr=z_lr, sigma_s=torch.full((2,), 0.1))
        torch.testing.assert_close(at(0.2, 0.9), direct)


def test_upscale_colour_fix_follows_the_bicubic_lr(tmp_path):
    """sample.upscale's colour fix takes the model's details and the LR's colours: the AdaIN result
    equals adain(unfixed output, bicubic x4 of the input) (the arguments swapped give the bicubic
    image with the model's colours instead)."""
    torch.manual_seed(0)
    student = model.make_student(MMDiT(CONFIGS["tiny"]), lora_rank=4)
    checkpoints.save_transformer(student, str(tmp_path / "student.safetensors"))
    import vae as V
    checkpoints.save_vae(V.VAE(V.CONFIGS["tiny"]), str(tmp_path / "vae.safetensors"))
    net, vae = sample.load_models(str(tmp_path / "student.safetensors"))
    cond = mfsr.Cond(None, torch.zeros(1, 32), torch.zeros(1, 1, 64))
    x = torch.rand(1, 3, 12, 16, generator=torch.Generator().manual_seed(2))
    raw = sample.upscale(x, net, vae, cond, color_fix="none")
    fixed = sample.upscale(x, net, vae, cond, color_fix="adain")
    lr_up = F.interpolate(x, scale_factor=4, mode="bicubic", align_corners=False).clamp(0, 1)
    torch.testing.assert_close(fixed, sample.adain_color_fix(raw, lr_up).clamp(0, 1), rtol=1e-5, atol=1e-5)
    assert (sample.adain_color_fix(lr_up, raw).clamp(0, 1) - fixed).abs().max() > 1e-2
    with pytest.raises(ValueError, match="color_fix"):
        sample.upscale(x, net, vae, cond, color_fix="hsv")
