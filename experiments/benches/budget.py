"""budget: the GPU memory of one full-scale distillation step per GPU, counted on the meta device."""
import time

from benches.common import bench

# budget: GPU memory of the full-scale distillation per GPU, measured without a GPU: train.py's step
# run on the meta device, the bytes of live tensor storages tracked op by op (gpu_memory.py: CUDA
# autocast's rules, flash attention, the values shapes depend on).

BUDGET_GIB = 32          # issue 49's target per GPU: 512^2 crops, batch 10, --grad-ckpt
BUDGET_WORLD = 8         # the paper's 8 GPUs (80 / 8 = batch 10 each): the gradients' all-reduce runs


def _budget_step(B, grad_ckpt):
    import gpu_memory
    import model
    import vae
    argv = ["--data", "unused", "--batch", str(B)] + ["--grad-ckpt"] * grad_ckpt
    return gpu_memory.distill_step(model.CONFIGS["dit4sr"], B, latent=64, tokens=154, argv=argv,
                                   vae_cfg=vae.CONFIGS["sd3"], world=BUDGET_WORLD)


@bench
def bench_budget(args):
    """Per-GPU memory of one steady-state step of `train.py --stage distill` at full size (DiT4SR:
    SD3.5-medium + LR stream; 512^2 crops = 64^2 latents; prompts of 154 tokens; 8 GPUs), measured
    on the meta device (gpu_memory.distill_step): what the GPU holds before the step, the peak of
    each phase at batch 1, 2 and 10 with --grad-ckpt (--quick: 1 and 2) and each phase's line
    through the two largest (fixed + per row), and the step's peak, 10 without --grad-ckpt too."""
    GiB = 2 ** 30
    cases = [(1, True), (2, True)] + ([] if args.quick else [(10, True), (10, False)])
    steps = {}
    for B, ckpt in cases:
        t0 = time.perf_counter()
        steps[B, ckpt] = _budget_step(B, ckpt)
        print(f"batch {B}{', --grad-ckpt' if ckpt else ''}: peak {steps[B, ckpt]['peak'] / GiB:.2f} GiB "
              f"({time.perf_counter() - t0:.0f} s to count)", flush=True)
    main_case = (10, True) if (10, True) in steps else (2, True)
    ref = steps[main_case]
    rows, figures = [], {}
    table = f"held before the step (batch {main_case[0]})"
    for part, n in ref["resident"].items():
        rows.append({"table": table, "part": part, "GiB": n / GiB})
    rows.append({"table": table, "part": "total", "GiB": sum(ref["resident"].values()) / GiB})
    # Each phase's peak grows with the batch along a line (its activations), down to a floor where
    # something fixed is larger (backward's: all the gradients at its end); the step's peak is the
    # largest of them, so its own line bends where another phase takes over. The lines go through the
    # two largest batches: at batch 1 and 2 the JVP has one row (half the rows, rounded up) and
    # backward sits on its floor.
    batches = [B for B, ckpt in steps if ckpt]
    lo, hi = batches[-2:]
    lines = {}
    for phase in ref["phase_peaks"]:
        a, b = (steps[B, True]["phase_peaks"][phase] for B in (lo, hi))
        lines[phase] = (a - lo * (b - a) / (hi - lo), (b - a) / (hi - lo))     # (fixed, per row)
        row = {"table": f"peak of each phase, GiB (--grad-ckpt); lines through batch {lo} and {hi}", "phase": phase}
        row.update({f"batch {B}": steps[B, True]["phase_peaks"][phase] / GiB for B in batches})
        fixed, per_row = lines[phase]
        at_budget = (BUDGET_GIB * GiB - fixed) / per_row if per_row > GiB / 100 else None   # where the line meets it
        row.update({"fixed": fixed / GiB, "per row": per_row / GiB, f"batch at {BUDGET_GIB} GiB": at_budget})
        rows.append(row)
    for (B, ckpt), r in steps.items():
        line = max(f + per * B for f, per in lines.values())
        rows.append({"table": "the step's peak", "batch": B, "--grad-ckpt": "yes" if ckpt else "no",
                     "peak GiB": r["peak"] / GiB, "in phase": r["peak_phase"],
                     f"largest line (batch {lo}, {hi})": line / GiB if ckpt else None,
                     f"within {BUDGET_GIB} GiB": "yes" if r["peak"] <= BUDGET_GIB * GiB
                     else f"no, by {(r['peak'] - BUDGET_GIB * GiB) / GiB:.2f} GiB"})
        figures[f"batch{B}/{'ckpt' if ckpt else 'no_ckpt'}"] = {
            "peak_gib": r["peak"] / GiB, "peak_phase": r["peak_phase"],
            "phase_peaks_gib": {k: v / GiB for k, v in r["phase_peaks"].items()},
            "resident_gib": {k: v / GiB for k, v in r["resident"].items()}}
    figures["lines_gib"] = {k: {"fixed": f / GiB, "per_row": per / GiB} for k, (f, per) in lines.items()}
    peak = ref["peak"]
    verdict = (f"fits: {peak / GiB:.2f} GiB <= {BUDGET_GIB} GiB" if peak <= BUDGET_GIB * GiB else
               f"does not fit: {peak / GiB:.2f} GiB, {(peak - BUDGET_GIB * GiB) / GiB:.2f} GiB over {BUDGET_GIB} GiB")
    figures["verdict"] = verdict
    return (f"budget: one distillation step per GPU at 512^2 (64^2 latents, 154 prompt tokens), {BUDGET_WORLD} "
            f"GPUs, counted on the meta device; batch {main_case[0]}, --grad-ckpt: {verdict}"), rows, figures
