"""rehearse: tools/rehearse.py at DiT4SR's full dimensions on the CPU, seconds per phase."""
import os
import sys
import tempfile

from benches.common import ROOT, bench


@bench
def bench_rehearse(args):
    """tools/rehearse.py at DiT4SR's full dimensions on this CPU: 128^2, batch 2, one step, a grid, a
    save, a resume, with bf16 autocast (the GPU's dtype path); --quick: 2 of its 24 blocks."""
    sys.path.insert(1, os.path.join(ROOT, "tools"))
    import rehearse
    with tempfile.TemporaryDirectory() as work:
        md = os.path.join(work, "table.md")
        rc = rehearse.main(["--size", "128", "--batch", "2", "--steps", "1", "--dtype", "bf16", "--workers", "0",
                            "--workdir", os.path.join(work, "files"), "--markdown", md]
                           + (["--depth", "2"] if args.quick else []))
        lines = [line.strip("|\n").split("|") for line in open(md) if line.startswith("|")][2:]
    rows = [dict(zip(("phase", "first step, s", "later steps, s", "share"), (c.strip() for c in cells)))
            for cells in lines]
    return (f"rehearse: tools/rehearse.py on the CPU, {'2 blocks' if args.quick else 'full size'} "
            f"(exit {rc})"), rows, {r["phase"]: r["first step, s"] for r in rows}
