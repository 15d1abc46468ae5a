"""Tests of experiments/tiny_vae.py: the PCA start of the patch VAE, and a short training run that
learns, calibrates its latents and exports its EMA weights."""

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tiny_vae
import vae as V
from plumbing import checkpoints, images
from builders import _images


def _patch_subspace_images(n=4, size=32, rank=16, seed=0):
    """Images whose 4 x 4 patches lie in a `rank`-dimensional affine subspace, plus that basis."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(48, rank, generator=g, dtype=torch.float64))[0]
    coef = torch.randn(n, size // 4, size // 4, rank, generator=g, dtype=torch.float64) * torch.linspace(0.3, 0.02, rank)
    rows = coef @ basis.T + 0.1                                             # (n, h, w, 48)
    return F.pixel_shuffle(rows.permute(0, 3, 1, 2), 4).float()


def test_vae_linear_code_starts_as_pca():
    """init_linear_code: on images whose patches span 16 dimensions the untrained patch VAE
    reconstructs them exactly (the nonlinear path is zeroed), with uncorrelated latents of variance
    sqrt(lam_i / mean(lam)) (lam: the patches' covariance eigenvalues, from numpy); the images are
    not reconstructed by a random VAE, and a 12-channel code loses some."""
    x = _patch_subspace_images()
    torch.manual_seed(0)
    vae = tiny_vae.init_linear_code(V.VAE(V.CONFIGS["tiny"]).eval(), x)
    with torch.no_grad():
        mean, logvar = vae.moments(x)
        rec = vae.decode((mean - vae.cfg.shift) * vae.cfg.scale, clamp=False)
        rand = V.VAE(V.CONFIGS["tiny"]).eval()
        rand_rec = rand.decode(rand.encode(x), clamp=False)
    assert (rec - x).abs().max() < 1e-4 and (rand_rec - x).abs().max() > 0.1
    flat = mean.permute(0, 2, 3, 1).reshape(-1, 16).double()
    patches = F.pixel_unshuffle(x.double(), 4).permute(0, 2, 3, 1).reshape(-1, 48).numpy()
    lam = np.sort(np.linalg.eigvalsh(np.cov(patches.T)))[::-1][:16]
    want = torch.from_numpy(np.sqrt(lam / lam.mean()).copy())
    assert (torch.cov(flat.T) - torch.diag(want)).abs().max() < 1e-3 * want.max()
    assert (logvar == -8.0).all()
    small = tiny_vae.init_linear_code(V.VAE(replace(V.CONFIGS["tiny"], latent_channels=12)).eval(), x)
    with torch.no_grad():
        m12 = small.moments(x)[0]
        err12 = (small.decoder(m12) - x).pow(2).mean()
    assert err12 > 1e-4
    with pytest.raises(ValueError, match="patch > 1"):
        tiny_vae.init_linear_code(V.VAE(V.CONFIGS["x4"]), x)


@pytest.mark.slow
def test_tiny_vae_learns_and_exports_a_calibrated_vae(tmp_path):
    data = _images(tmp_path / "data", size=64)
    out = tmp_path / "vae"
    trained = tiny_vae.train_vae(data, str(out), steps=30, batch=4, size=32, lr=2e-3, ema=0.0)
    assert torch.equal(checkpoints.load_vae(str(out / "vae.safetensors")).state_dict()["decoder.linear.weight"],
                       trained.state_dict()["decoder.linear.weight"])
    torch.manual_seed(0)
    init = V.VAE(V.CONFIGS["tiny"]).eval()                   # random (train_vae starts from PCA, then trains)
    x = torch.stack([images.load_image(p).rgb for p in images.find_images(data)])[..., :32, :32] * 2 - 1
    with torch.no_grad():
        err = {k: (v.decode(v.encode(x), clamp=False) - x).abs().mean().item() for k, v in
               (("init", init), ("trained", trained))}
        z = trained.encode(x)
    assert err["trained"] < 0.7 * err["init"], err
    # shift / scale from the running latent statistics: model-space latents near mean 0, std 1
    assert abs(z.mean().item()) < 0.3 and 0.6 < z.std().item() < 1.6, (z.mean().item(), z.std().item())
    assert (trained.cfg.scale, trained.cfg.shift) != (V.CONFIGS["tiny"].scale, V.CONFIGS["tiny"].shift)
    assert (out / "grid.png").exists() and (out / "steps.txt").read_text() == "30\n"


def test_tiny_vae_exports_the_ema_weights(tmp_path):
    """ema = 1 keeps the average at the start: the export is the PCA start (its conv_out layers
    zero), while the live weights moved; ema = 0 exports the live weights, which did move."""
    data = _images(tmp_path / "data", size=64)
    kw = dict(steps=3, batch=2, size=32, lr=1e-2)
    frozen = tiny_vae.train_vae(data, str(tmp_path / "a"), ema=1.0, **kw)
    live = tiny_vae.train_vae(data, str(tmp_path / "b"), ema=0.0, **kw)
    for conv in ("encoder.conv_out", "decoder.conv_out"):
        assert not frozen.get_submodule(conv).weight.any()
        assert live.get_submodule(conv).weight.abs().max() > 1e-4


def test_tiny_vae_resumes_an_interrupted_run_exactly(tmp_path, monkeypatch):
    """Interrupted after its step-2 state was saved, a rerun into the same folder does steps 3 and 4
    only and exports what an uninterrupted run exports, bit for bit; the state file is then gone."""
    data = _images(tmp_path / "data", size=64)
    kw = dict(steps=4, batch=2, size=32, lr=1e-2, ema=0.5, save_every=2)
    whole = tiny_vae.train_vae(data, str(tmp_path / "a"), **kw)
    loss, calls = tiny_vae.vae_loss, []

    def interrupted(*a):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return loss(*a)
    monkeypatch.setattr(tiny_vae, "vae_loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tiny_vae.train_vae(data, str(tmp_path / "b"), **kw)
    assert (tmp_path / "b" / "state.safetensors").exists()
    calls.clear()
    resumed = tiny_vae.train_vae(data, str(tmp_path / "b"), **kw)
    assert len(calls) == 2 and not (tmp_path / "b" / "state.safetensors").exists()
    a, b = whole.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a) and (whole.cfg.shift, whole.cfg.scale) == (resumed.cfg.shift, resumed.cfg.scale)
