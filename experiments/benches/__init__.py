"""The benches of experiments/bench.py, one module per command or close group of commands; the
shared timing and memory helpers and the command registry in common.py."""
