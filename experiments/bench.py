"""Benchmarks: every figure the issues ask for, measured side by side in one run.

    python experiments/bench.py model            # forward / JVP / JVP+backward of the transformer
    python experiments/bench.py model --json     # the same figures as one JSON object
    python experiments/bench.py sample           # also `python sample.py photo.png` whole, beside SPAN x4
    python experiments/bench.py jvp_ops          # aten ops of the full-size JVP vs a forward (meta device)
    python experiments/bench.py rehearse         # tools/rehearse.py at full size on the CPU (~11 min)

Each bench prints a table. Time is the median of interleaved repeats (this is a shared
2-core VM: interleaving keeps slow phases from landing on one variant only). Peak memory
is the growth of the process's peak resident set (VmHWM, reset through
/proc/self/clear_refs before each measurement) over the resident set before the call,
so it counts what the call allocates, on CPU, including freed temporaries; exact when glibc
returns big freed blocks to the OS at once (MALLOC_MMAP_THRESHOLD_=65536). That setting slows
allocation-heavy code, unevenly, so the benches whose targets are time ratios keep glibc's
default allocator for their times: `model` and `mfsr` take their peaks in a first pass of their
own with the setting (TWO_PASS), `sample` and `vae_tiny` after a heap trim (TIMES_FIRST). Whole
processes (`sample`'s first rows) are measured apart: wall time and the child's own peak (whole_process).

The commands live in experiments/benches/, one module each or per close group, registered by @bench:

    transformer.py  model, mfsr           sampling.py  sample             budget.py     budget
    vaes.py         vae, vae_tiny         jvp_ops.py   jvp_ops            rehearsal.py  rehearse
    degradation.py  degrade               quality.py   quality, metrics
    training.py     train

and the timing and memory helpers above (median_times, peak_mb, whole_process, TWO_PASS, TIMES_FIRST)
with the printed tables in benches/common.py.
"""
import argparse
import json
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, ROOT)   # the core files at the root

# Each module registers its commands in BENCHES on import (this file's child process, TWO_PASS's peak
# pass, imports them the same way).
from benches import (budget, degradation, jvp_ops, quality, rehearsal, sampling,  # noqa: E402,F401
                     training, transformer, vaes)
from benches.common import _PASS, BENCHES, TIMES_FIRST, TWO_PASS, print_table  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("which", choices=sorted(BENCHES), help="which bench to run")
    p.add_argument("--json", action="store_true", help="print one JSON object of the figures")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--quick", action="store_true", help="small sizes only (smoke run)")
    p.add_argument("--previous", default=None, help="quality: also an earlier release's teacher and student, from "
                   "its folder or a git revision (e.g. the tag miniature-v1)")
    args = p.parse_args(argv)
    if args.which in TWO_PASS and _PASS["name"] is None:
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MFSR_BENCH_PASS="peaks")
        cmd = [sys.executable, os.path.abspath(__file__), args.which, "--threads", str(args.threads)]
        out = subprocess.run(cmd + ["--quick"] * args.quick, env=env, stdout=subprocess.PIPE, text=True, check=True)
        _PASS.update(name="times", peaks=json.loads(out.stdout.splitlines()[-1]))
    elif os.environ.get("MALLOC_MMAP_THRESHOLD_") is None and argv is None and args.which not in TIMES_FIRST:
        # glibc serves big blocks with mmap from this size on, so freed tensors leave the resident
        # set at once and each peak is measured from the same base. Needs a fresh process.
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
        os.execv(sys.executable, [sys.executable] + sys.argv)
    torch.set_num_threads(args.threads)
    title, rows, figures = BENCHES[args.which](args)
    if _PASS["name"] == "peaks":                 # for the time pass (main, above)
        print(json.dumps(_PASS["peaks"]))
    elif args.json:
        print(json.dumps(figures, indent=1))
    elif rows and ({"setting", "table"} & set(rows[0])):     # one table per setting (or part)
        key = "setting" if "setting" in rows[0] else "table"
        for part in dict.fromkeys(r[key] for r in rows):
            print_table(f"{title}; {part}", [{k: v for k, v in r.items() if k != key} for r in rows if r[key] == part])
    else:
        print_table(title, rows)


if __name__ == "__main__":
    sys.exit(main())
