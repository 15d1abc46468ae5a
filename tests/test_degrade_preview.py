"""Tests of tools/degrade_preview.py: the grid it writes, a bad input, never over the input."""

import numpy as np
import pytest
import torch

import degrade_preview as preview


def test_deg_preview_cli(tmp_path):
    from PIL import Image
    torch.manual_seed(0)
    src = tmp_path / "in.png"
    Image.fromarray((np.random.rand(50, 70, 3) * 255).astype(np.uint8)).save(src)
    out = tmp_path / "grid.png"
    assert preview.main([str(src), "-n", "2", "-o", str(out), "--gt-size", "64"]) == 0
    assert Image.open(out).size == (3 * 64, 64 + 120)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    assert preview.main([str(bad), "-o", str(tmp_path / "x.png"), "--gt-size", "64"]) == 2
    with pytest.raises(SystemExit):
        preview.main([str(src), "-o", str(src)])                # never over the input
