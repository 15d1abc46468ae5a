"""docs/walkthrough.py: run into a temporary folder, every claim its prose makes must hold, and the
committed docs/walkthrough.json must be what a fresh run prints."""

import json
import re
import subprocess
import sys

import pytest

from builders import ROOT

SCRIPT = ROOT / "docs" / "walkthrough.py"


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """(exit code, output, the fresh run's JSON and page) of `python docs/walkthrough.py --out tmp`."""
    pytest.importorskip("matplotlib", reason="the walkthrough draws with matplotlib: pip install matplotlib")
    out = tmp_path_factory.mktemp("walkthrough")
    run = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], capture_output=True, text=True,
                         cwd=ROOT, timeout=600)
    data = json.loads((out / "walkthrough.json").read_text()) if (out / "walkthrough.json").exists() else None
    page = (out / "walkthrough.md").read_text() if (out / "walkthrough.md").exists() else ""
    return run.returncode, run.stdout + run.stderr, data, page, out


@pytest.mark.slow
def test_every_claim_of_the_walkthrough_holds(fresh):
    code, log, data, _, _ = fresh
    assert data is not None, f"the walkthrough wrote no JSON:\n{log[-3000:]}"
    failed = [f"{c['key']}: {c['statement']}" for c in data["claims"] if not c["holds"]]
    assert not failed, "claims that no longer hold:\n" + "\n".join(failed)
    assert code == 0, log[-3000:]
    keys = {c["key"] for c in data["claims"]}
    for must in ("identity_residual", "caught_t_tangent", "caught_z_tangent", "caught_sign", "jvp_matches_fd",
                 "ratio_t", "ratio_1000t", "ratio_cut", "student_beats_teacher_one_step"):
        assert must in keys, f"the walkthrough no longer checks {must}"


@pytest.mark.slow
def test_the_page_is_complete(fresh):
    _, log, data, page, out = fresh
    assert page, log[-3000:]
    assert not re.search(r"\{[a-z][a-z0-9_]*\}", page), "a placeholder left unfilled"
    figures = re.findall(r"\]\((walkthrough/[^)]+\.png)\)", page)
    assert len(figures) >= 8 and all((out / f).exists() for f in figures)
    committed = (ROOT / "docs" / "walkthrough.md").read_text()
    assert re.findall(r"\]\((walkthrough/[^)]+\.png)\)", committed) == figures
    assert all((ROOT / "docs" / f).exists() for f in figures), "a committed figure is missing"


@pytest.mark.slow
def test_the_committed_numbers_are_a_fresh_runs(fresh):
    _, log, data, _, _ = fresh
    assert data is not None, log[-3000:]
    committed = json.loads((ROOT / "docs" / "walkthrough.json").read_text())
    diff = {k: (committed["numbers"].get(k), v) for k, v in data["numbers"].items() if committed["numbers"].get(k) != v}
    diff.update({k: (v, None) for k, v in committed["numbers"].items() if k not in data["numbers"]})
    assert not diff, ("docs/walkthrough.json differs from a fresh run (committed, fresh); regenerate with "
                      f"`python docs/walkthrough.py`: {diff}")
