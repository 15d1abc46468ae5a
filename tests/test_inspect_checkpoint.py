"""Tests of tools/inspect_checkpoint.py: the config it reports is the file's, bad files are named."""

from dataclasses import replace

import model
import vae as vae_lib
from plumbing import checkpoints

import inspect_checkpoint as inspect_ckpt


def test_inspect_reports_the_files_config(tmp_path, capsys):
    cfg = replace(model.CONFIGS["tiny"], depth=2, prediction="x")
    checkpoints.save_transformer(model.MMDiT(cfg), tmp_path / "net.safetensors")
    assert inspect_ckpt.main([str(tmp_path / "net.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "depth=2" in out and "prediction='x'" in out
    assert f"{sum(p.numel() for p in model.MMDiT(cfg).parameters()):,}" in out

    checkpoints.save_vae(vae_lib.VAE(vae_lib.CONFIGS["tiny"]), tmp_path / "vae.safetensors")
    assert inspect_ckpt.main([str(tmp_path / "vae.safetensors"), "--vae"]) == 0
    assert f"x{vae_lib.CONFIGS['tiny'].factor}" in capsys.readouterr().out


def test_inspect_preset_runs_a_jvp_and_refuses_bad_input(tmp_path, capsys):
    assert inspect_ckpt.main([]) == 0
    assert "forward + JVP" in capsys.readouterr().out
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    assert inspect_ckpt.main([str(bad)]) == 2
    assert str(bad) in capsys.readouterr().err
