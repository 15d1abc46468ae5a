"""Command-line conveniences of sample.py and train.py (plumbing): flags, progress, device, peak memory."""
import contextlib
import math
import sys
import time
from dataclasses import field, fields

import torch


def flag(default, help):
    """A config field with its --help text (in the field's metadata)."""
    return field(default=default, metadata={"help": help})


def add_flags(parser, config_cls, groups, choices):
    """An argparse flag per field of `config_cls` named in `groups` ({section: names}); a bool: a switch."""
    defaults = {f.name: f for f in fields(config_cls)}
    for group, names in groups.items():
        g = parser.add_argument_group(group)
        for name in names:
            f = defaults[name]
            text, dash = f.metadata["help"].replace("%", "%%"), "--" + name.replace("_", "-")
            if isinstance(f.default, bool):
                g.add_argument(dash, action="store_true", help=text)
            else:
                shown = f" (choices: {', '.join(choices[name])})" if name in choices else ""
                g.add_argument(dash, type=type(f.default), default=f.default, metavar=name.upper(),
                               help=f"{text}{shown} [default: {f.default if f.default != '' else 'none'}]")


class Progress:
    """Network calls on tiles done / total, elapsed and ETA on `stream` (default stderr): a bar on a terminal,
    else a line every 10 %; nothing before `after` seconds nor with name=None. `seconds`: per phase."""

    def __init__(self, name, stream=None, after=2.0):
        self.name, self.after, self.stream = name, after, stream or sys.stderr
        self.tty = name is not None and self.stream.isatty()
        self.t0 = self.phase_t0 = time.perf_counter()
        self.seconds, self.current, self.done, self.total, self.next_line, self.drawn = {}, None, 0, 0, 0.1, False

    def phase(self, name, calls=0):
        now = time.perf_counter()
        if self.current is not None:
            self.seconds[self.current] = self.seconds.get(self.current, 0.0) + now - self.phase_t0
        self.current, self.phase_t0 = name, now
        if calls:
            self.done, self.total, self.network_t0 = 0, calls, now
        if name is None and self.drawn:
            print(file=self.stream, flush=True)                              # end the bar's line
            self.drawn = False

    def tile(self):
        self.done += 1
        now = time.perf_counter()
        if self.name is None or now - self.t0 < self.after or not self.total:
            return
        frac = self.done / self.total
        eta = (now - self.network_t0) / self.done * (self.total - self.done)
        text = (f"{self.name}: tiles {self.done}/{self.total}, {now - self.t0:.0f} s, "
                f"ETA {eta:.0f} s (network; then the VAE decode)")
        if self.tty:
            print(f"\r[{'#' * int(20 * frac):<20}] {text}", end="", file=self.stream, flush=True)
            self.drawn = True
        elif frac >= self.next_line or self.done == self.total:
            print(text, file=self.stream, flush=True)
            self.next_line = math.floor(frac * 10 + 1) / 10


def reset_peak(device):
    if device.type == "cuda":
        return torch.cuda.reset_peak_memory_stats(device)
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")                                   # Linux: VmHWM restarts from the current RSS


def peak_memory_mb(device):
    """Peak memory since reset_peak: CUDA's allocator peak, else Linux's VmHWM; NaN where not known."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    kib = proc_kib("/proc/self/status", "VmHWM")
    return math.nan if kib is None else kib / 1024


def proc_kib(path, key):
    """The `key:  N kB` figure of a Linux /proc file, in KiB; None where the system has none."""
    try:
        with open(path) as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key))
    except (OSError, StopIteration):
        return None


def pick_device(name):
    """torch.device for --device; ValueError naming it and what this torch has, if unusable."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    have = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    have += ["mps"] if torch.backends.mps.is_available() else []
    try:
        d = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {name}: not a device name; this machine has {', '.join(have)}") from None
    if d.type in have or f"{d.type}:{d.index or 0}" in have:          # cpu, mps, or a GPU this machine has
        return d
    raise ValueError(f"--device {name}: not available to this torch {torch.__version__}; it has {', '.join(have)}")

