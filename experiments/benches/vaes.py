"""vae: encode / decode time and peak memory of the full-size SD3 VAE, untiled vs tiled, fp32 and
bf16; vae_tiny: the miniature's patch VAE beside the SD3 structure at x4 it replaced."""
import os
import time

import torch

from benches.common import bench, median_times, peak_mb

# Encode / decode time and peak memory of the full-size SD3 VAE (random weights) in fp32 and bf16
# on CPU: untiled and tiled at 512^2 (tiles of 256 px / 32 latents, overlap 64 px / 8 latents), and
# tiled with the default tiles at 2048^2 (512 px / 64 latents, overlap 128 px / 16 latents). Each
# variant runs once: a 2048^2 decode is minutes on 2 cores. Tiled runs include the statistics pass
# (tile_norm="tiles"), which costs a second pass over every tile. Untiled 2048^2 (> 8 GiB in
# fp32 by the activation sizes, and minutes per run) runs only with VAE_BENCH_UNTILED_2048=1.


@bench
def bench_vae(args):
    """Time and peak memory of SD3 VAE encode / decode, untiled vs tiled, fp32 and bf16."""
    import vae as V
    from plumbing import tiling
    torch.manual_seed(0)
    base = V.VAE(V.CONFIGS["sd3"]).eval()
    # VAE_BENCH_SIZES=2048 VAE_BENCH_OPS=decode: only the rows of the 4 GiB target; VAE_BENCH_DTYPES=bf16
    # with VAE_BENCH_BF16_2048=1: only the bf16 ones
    sizes = {int(x) for x in os.environ.get("VAE_BENCH_SIZES", "512,2048").split(",")}
    ops = os.environ.get("VAE_BENCH_OPS", "encode,decode").split(",")
    dtypes = os.environ.get("VAE_BENCH_DTYPES", "fp32,bf16").split(",")
    cases = [(512, "untiled", 0, 0), (512, "tiled 256px", 256, 32)]
    if not args.quick:   # fp32 only at 2048^2 (its memory is the target's worst case; ~25 min on 2 cores)
        cases.append((2048, "tiled (default)", None, None))
        if os.environ.get("VAE_BENCH_UNTILED_2048") == "1":
            cases.append((2048, "untiled", 0, 0))
    rows, figures = [], {}
    for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        if dtype_name not in dtypes:
            continue
        vae = V.set_dtype(V.VAE(base.cfg).eval(), dtype)
        vae.load_state_dict(base.state_dict())
        for size, variant, enc_tile, dec_tile in cases:
            if size not in sizes:
                continue
            if size > 512 and dtype_name != "fp32" and os.environ.get("VAE_BENCH_BF16_2048") != "1":
                continue
            x = (torch.rand(1, 3, size, size) * 2 - 1).to(dtype)
            z = torch.randn(1, 16, size // 8, size // 8).to(dtype)
            for op, fn in (("encode", lambda: tiling.encode(vae, x, tile=enc_tile)),
                           ("decode", lambda: tiling.decode(vae, z, tile=dec_tile))):
                if op not in ops:
                    continue
                t0 = time.perf_counter()
                with torch.no_grad():
                    _, mb = peak_mb(fn)
                s = time.perf_counter() - t0
                rows.append({"image": f"{size}^2", "dtype": dtype_name, "variant": variant, "op": op,
                             "seconds": s, "peak MB": mb})
                figures[f"{size}/{dtype_name}/{variant}/{op}"] = {"s": s, "peak_mb": mb}
    return f"vae: SD3 VAE, random weights (threads {torch.get_num_threads()}; one run each)", rows, figures


@bench
def bench_vae_tiny(args, size=512, runs=3):
    """The miniature's patch VAE beside the SD3 structure at x4 it replaced (three levels of 32 / 64 /
    64 channels), random weights, fp32, untiled, medians of `runs` interleaved warm runs."""
    import vae as V
    x = torch.rand(1, 3, size, size) * 2 - 1
    z = torch.randn(1, 16, size // 4, size // 4)
    fns = {}
    for name, key in (("tiny (4x4 patches)", "tiny"), ("x4, three levels", "x4")):
        torch.manual_seed(0)
        vae = V.VAE(V.CONFIGS[key]).eval()
        fns[name, "encode"] = lambda vae=vae: vae.encode(x)
        fns[name, "decode"] = lambda vae=vae: vae.decode(z)
    rows, figures = [], {}
    with torch.no_grad():
        times = median_times(fns, repeat=runs)
        for (name, op), fn in fns.items():
            mb = peak_mb(fn)[1]
            rows.append({"image": f"{size}^2", "VAE": name, "op": op, "seconds": times[name, op], "peak MB": mb})
            figures[f"{name}/{op}"] = {"s": times[name, op], "peak_mb": mb}
    return f"vae_tiny: the miniature's VAE, fp32, random weights (threads {torch.get_num_threads()})", rows, figures
