"""tools/rehearse.py: the one-GPU rehearsal of the full-scale run, here on the CPU at full width."""

import os

import pytest
import torch

import rehearse
import vae as vae_lib
from plumbing import checkpoints


def test_verdict_fits_is_over_or_extrapolates_from_two_smaller_batches():
    assert rehearse.verdict(10, {10: 30 * 1024}, 80 * 1024).startswith("fits: batch 10 peaks at 30.0 GiB of 80.0")
    assert "2.0 GiB over" in rehearse.verdict(10, {10: 82 * 1024}, 80 * 1024)
    # batch 10 ran out of memory; 5 and 2 ran: 20 + 4 per row GiB -> 60 needed at 10, 40 available, 5 rows fit
    text = rehearse.verdict(10, {5: 40 * 1024, 2: 28 * 1024}, 40 * 1024)
    assert "need about 60.0 GiB" in text and "20.0 GiB over" in text and "batch 5 fits" in text
    assert "every smaller batch" in rehearse.verdict(10, {}, 40 * 1024)


def test_written_files_are_in_the_released_layouts(tmp_path):
    flags = dict(zip(*[iter(rehearse.write_inputs(str(tmp_path), depth=1, size=64, images=2))] * 2))
    teacher = checkpoints.SafetensorsFiles(flags["--teacher"], subfolder="transformer")
    assert any("transformer_blocks.0.attn.to_q_control" in k for k in teacher.keys())    # DiT4SR's names
    assert not any(k.startswith("joint_blocks.") for k in teacher.keys())
    cfg = checkpoints.transformer_config(flags["--teacher"])[0]
    assert cfg.hidden == 1536 and cfg.lr_stream and cfg.depth == 1
    vae = checkpoints.SafetensorsFiles(flags["--ckpt"])
    assert all(k.startswith("first_stage_model.") for k in vae.all_keys)
    assert checkpoints.vae_config(flags["--ckpt"])[0] == vae_lib.CONFIGS["sd3"]
    assert len(os.listdir(flags["--data"])) == 2


@pytest.mark.slow
def test_rehearsal_at_full_width_with_two_blocks_runs_saves_resumes_and_judges(tmp_path, capsys):
    """The README's rehearsal on the CPU: DiT4SR's width (1536, 24 heads) with 2 of its blocks,
    128^2, batch 2, one step, a grid, a save, a resume for one more, the table and the verdict."""
    torch.set_num_threads(2)
    md = tmp_path / "table.md"
    rc = rehearse.main(["--depth", "2", "--size", "128", "--batch", "2", "--steps", "1", "--workers", "0",
                        "--workdir", str(tmp_path / "work"), "--markdown", str(md)])
    text = md.read_text()
    assert rc == 0, text
    for want in ("| JVP |", "| backward |", "| optimizer |", "2 blocks, hidden 1536", "ckpt-0000001 -> step 2",
                 "student.safetensors written", "fits: batch 2"):
        assert want in text, want
