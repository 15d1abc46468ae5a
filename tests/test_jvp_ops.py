"""The JVP's cost in ops against a forward's (bench.py jvp_ops), counted on the meta device at a size
that runs in seconds: full width (24 heads of 64), two blocks (one of them MMDiT-X), a 32^2 latent
(2 x 256 image tokens and 154 text tokens), 5 rows."""
import argparse
from dataclasses import replace

import pytest

import model
from benches import jvp_ops


def test_jvp_dispatches_at_most_six_times_the_ops_of_a_forward():
    """Issue 49's bound. Score blocks of a fixed 2^20 elements (13 query rows here, 52 chunks per
    attention) dispatched 19.8x the forward's ops and launched 12x its kernels at this size; one
    budgeted chunk gives 4.3x and 2.8x."""
    cfg = replace(model.CONFIGS["dit4sr"], depth=2, dual_layers=(0,))
    fwd, jvp = jvp_ops.jvp_op_counts(cfg, 32)
    total = lambda counts: sum(counts.values())
    assert total(jvp.ops) <= 6 * total(fwd.ops)
    assert total(jvp.kernels) <= 4 * total(fwd.kernels)


@pytest.mark.slow
def test_bench_jvp_ops_at_512_is_within_six_forwards():
    """`bench.py jvp_ops --quick`: the full-size student at 512^2 (issue 49: at most 6x; 179x
    with the fixed chunks), with the kinds of layer adding up to the whole."""
    _, rows, _ = jvp_ops.bench_jvp_ops(argparse.Namespace(quick=True))
    whole, *kinds = rows
    assert whole["ops of"] == "all" and whole["tokens"] == 2202 and whole["x"] <= 6
    assert sum(r["JVP ops"] for r in kinds) == whole["JVP ops"]
