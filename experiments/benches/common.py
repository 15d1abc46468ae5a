"""What every bench shares: the command registry (@bench), the timing and peak-memory helpers
(median_times, peak_mb, whole_process) with their two-pass machinery, and the printed tables."""
import ctypes
import gc
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repository

BENCHES = {}


# Benches whose targets are time ratios are timed with glibc's default allocator, as users run.
# Exact memory peaks need the 64 KB mmap threshold (every freed buffer returned at once), which
# makes every tensor above it fault its pages in afresh and slows the timings. TIMES_FIRST measure
# peaks after a heap trim only; TWO_PASS run twice: a peak pass in a child process with the
# threshold (its median_times only warm up), then the time pass, whose peak_mb returns the
# child's figures in call order without running the call again.
TIMES_FIRST = {"sample", "vae_tiny"}
TWO_PASS = {"model", "mfsr"}
_PASS = {"name": os.environ.get("MFSR_BENCH_PASS"), "peaks": []}


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
    """Run fn() once; return (its result, peak resident memory it added in MB). In the time pass
    of a TWO_PASS bench: (None, the figure the peak pass measured), fn not run."""
    if _PASS["name"] == "times":
        return None, _PASS["peaks"].pop(0)
    gc.collect()
    _trim()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    base = _status_mb("VmRSS")
    out = fn()
    _PASS["peaks"].append(_status_mb("VmHWM") - base)
    return out, _PASS["peaks"][-1]


def _trim():
    """Give freed heap back to the OS so the next peak is measured from a clean base."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def median_times(fns, repeat=5, warmup=1):
    """Interleaved timing of several callables; returns {name: median seconds}."""
    for _ in range(max(warmup, 1) if _PASS["name"] == "peaks" else warmup):   # the peak pass: warm only
        for fn in fns.values():
            fn()
    if _PASS["name"] == "peaks":
        return {name: float("nan") for name in fns}
    times = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


# A child's ru_maxrss (os.wait4) is not its own peak when the parent is large: exec keeps the
# high-water mark of the memory it replaces, which after subprocess's vfork is the parent's (a
# `python -c pass` started by a 2 GB process reports 2 GB). So the program runs under this small
# launcher, whose own mark (about 10 MB) is all its child inherits; it prints seconds, KB, exit code.
_LAUNCHER = """import os, subprocess, sys, time
t0 = time.perf_counter()
p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
_, status, ru = os.wait4(p.pid, 0)
print(time.perf_counter() - t0, ru.ru_maxrss, os.waitstatus_to_exitcode(status))"""


def whole_process(cmd):
    """(seconds, peak MB) of one whole process running cmd: wall time from its start to its exit, its
    peak resident set (ru_maxrss, the largest the process ever held, shared libraries included). Run
    as users run it: glibc's default allocator (MALLOC_MMAP_THRESHOLD_ removed), default threads."""
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    out = subprocess.run([sys.executable, "-S", "-c", _LAUNCHER, *cmd], capture_output=True, text=True,
                         env=env, cwd=ROOT, check=True)
    secs, kb, code = out.stdout.split()
    if int(code):
        raise RuntimeError(f"{' '.join(cmd)} exited with {code}:\n{out.stderr[-2000:]}")
    return float(secs), int(kb) / 1024


def _fmt(v):
    return "-" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)


def print_table(title, rows):
    """rows: list of dicts, the first with every column; floats printed with 3 significant
    digits, a missing or None value as "-"."""
    cols = list(rows[0])
    cells = [[_fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print(f"\n{title}")
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def markdown_table(rows):
    """The same table as print_table, in Markdown (for the README and the model card)."""
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    return "\n".join(lines + ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]) + "\n"


# --------------------------------------------------------------------------------------------
# How the programs run the transformer (model, mfsr and train time it so)


def _as_programs_run(fn):
    """fn inside fastjvp.lean_memory(), as train.py runs the transformer."""
    import fastjvp

    def run():
        with fastjvp.lean_memory():
            return fn()
    return run
