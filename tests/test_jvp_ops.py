"""The JVP's cost in ops against a forward's (bench.py jvp_ops), counted on the meta device at a size
that runs in seconds: full width (24 heads of 64), two blocks (one of them MMDiT-X), a 32^2 latent
(2 x 256 image tokens and 154 text tokens), 5 rows."""
from dataclasses import replace

import bench
import model


def test_jvp_dispatches_at_most_six_times_the_ops_of_a_forward():
    """Issue 49's bound. Score blocks of a fixed 2^20 elements (13 query rows here, 52 chunks per
    attention) dispatched 19.8x the forward's ops and launched 12x its kernels at this size; one
    budgeted chunk gives 4.3x and 2.8x."""
    cfg = replace(model.CONFIGS["dit4sr"], depth=2, dual_layers=(0,))
    fwd, jvp = bench.jvp_op_counts(cfg, 32)
    total = lambda counts: sum(counts.values())
    assert total(jvp.ops) <= 6 * total(fwd.ops)
    assert total(jvp.kernels) <= 4 * total(fwd.kernels)
