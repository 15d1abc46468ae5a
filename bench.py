"""Benchmarks: every figure the issues ask for, measured side by side in one run.

    python bench.py model            # forward / JVP / JVP+backward of the transformer
    python bench.py model --json     # the same figures as one JSON object

Each bench prints a table. Time is the median of interleaved repeats (this is a shared
2-core VM: interleaving keeps slow phases from landing on one variant only). Peak memory
is the growth of the process's peak resident set (VmHWM, reset through
/proc/self/clear_refs before each measurement) over the resident set before the call,
so it counts what the call allocates, on CPU, including freed temporaries.
"""
import argparse
import gc
import json
import statistics
import sys
import time

import torch

BENCHES = {}


def bench(fn):
    """Register `fn(args) -> (title, rows, figures)` as the sub-command `fn.__name__`."""
    BENCHES[fn.__name__.removeprefix("bench_")] = fn
    return fn


def _status_mb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_mb(fn):
    """Run fn() once; return (its result, peak resident memory it added in MB)."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    base = _status_mb("VmRSS")
    out = fn()
    return out, _status_mb("VmHWM") - base


def median_times(fns, repeat=5, warmup=1):
    """Interleaved timing of several callables; returns {name: median seconds}."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def print_table(title, rows):
    """rows: list of dicts with the same keys; floats printed with 3 significant digits."""
    cols = list(rows[0])
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)
    cells = [[fmt(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print(f"\n{title}")
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("which", choices=sorted(BENCHES), help="which bench to run")
    p.add_argument("--json", action="store_true", help="print one JSON object of the figures")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--quick", action="store_true", help="small sizes only (smoke run)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    title, rows, figures = BENCHES[args.which](args)
    if args.json:
        print(json.dumps(figures, indent=1))
    else:
        print_table(title, rows)


if __name__ == "__main__":
    sys.exit(main())
