"""degrade: pairs per second of degrade.py's Real-ESRGAN pipeline (and its stages' shares) beside
BasicSR's functions."""
import math
import random
import time

import numpy as np
import torch
import torch.nn.functional as F

from benches.common import bench, median_times

# degrade: degrade.py beside BasicSR's functions driven the way Real-ESRGAN's feed_data runs them
# (numpy kernels per sample as its dataset draws them, USMSharp, filter2D, F.interpolate, the *_pt
# noise functions, DiffJPEG(differentiable=False)); BasicSR's rows are left out if it is not installed.


def _degrade_image(b, size, seed=0):
    g = torch.Generator().manual_seed(seed)  # smooth random texture: JPEG of white noise is unrealistically slow
    x = torch.rand(b, 3, size // 16, size // 16, generator=g)
    return F.interpolate(x, size=(size, size), mode="bicubic").clamp(0, 1)


def _basicsr_runner(b, size):
    import degrade as D
    import basicsr_ref                           # BasicSR's source files, loaded by path
    bdeg, bipu, dj = basicsr_ref.load("data/degradations.py", "utils/img_process_util.py", "utils/diffjpeg.py")
    jpeger, usm, st1, st2 = dj.DiffJPEG(differentiable=False), bipu.USMSharp(), D.StageConfig(), D.STAGE2
    sizes = [7, 9, 11, 13, 15, 17, 19, 21]

    def kernel(st):  # the dataset's per-sample draw
        k = random.choice(sizes)
        if np.random.uniform() < st.sinc_prob:
            w = np.random.uniform(math.pi / 3 if k < 13 else math.pi / 5, math.pi)
            ker = bdeg.circular_lowpass_kernel(w, k, pad_to=False)
        else:
            ker = bdeg.random_mixed_kernels(list(D.KERNEL_TYPES), list(st.kernel_prob), k, st.blur_sigma,
                                            st.blur_sigma, [-math.pi, math.pi], st.betag_range, st.betap_range)
        p = (21 - k) // 2
        return torch.FloatTensor(np.pad(ker, ((p, p), (p, p))))

    def stage(out, st, size_of):
        u = random.choices(["up", "down", "keep"], st.resize_prob)[0]
        s = {"up": np.random.uniform(1, st.resize_range[1]), "down": np.random.uniform(st.resize_range[0], 1),
             "keep": 1}[u]
        out = size_of(out, s, random.choice(D.RESIZE_MODES))
        if np.random.uniform() < st.gaussian_noise_prob:
            return bdeg.random_add_gaussian_noise_pt(out, st.noise_range, st.gray_noise_prob, clip=True)
        return bdeg.random_add_poisson_noise_pt(out, st.poisson_scale_range, st.gray_noise_prob, clip=True)

    def filt(x, k):  # F.interpolate on CPU can return a non-contiguous tensor, which filter2D's view rejects
        return bipu.filter2D(x.contiguous(), k)

    def jpg(out):
        q = out.new_zeros(out.size(0)).uniform_(30, 95)
        return jpeger(out.clamp(0, 1), quality=q)

    def run():
        hr = _degrade_image(b, size)
        k1 = torch.stack([kernel(st1) for _ in range(b)])
        k2 = torch.stack([kernel(st2) for _ in range(b)])
        sinc = np.stack([bdeg.circular_lowpass_kernel(np.random.uniform(math.pi / 3, math.pi),
                                                         random.choice(sizes), pad_to=21) for _ in range(b)])
        sinc = torch.FloatTensor(sinc)
        out = filt(usm(hr), k1)
        out = jpg(stage(out, st1, lambda x, s, m: F.interpolate(x, scale_factor=s, mode=m)))
        if np.random.uniform() < st2.blur_prob:
            out = filt(out, k2)
        lr_hw = (size // 4, size // 4)
        out = stage(out, st2, lambda x, s, m: F.interpolate(x, size=(int(lr_hw[0] * s), int(lr_hw[1] * s)), mode=m))
        if np.random.uniform() < 0.5:
            out = jpg(filt(F.interpolate(out, size=lr_hw, mode=random.choice(D.RESIZE_MODES)), sinc))
        else:
            out = filt(F.interpolate(jpg(out), size=lr_hw, mode=random.choice(D.RESIZE_MODES)), sinc)
        return (out * 255).round().clamp(0, 255) / 255

    return run


def _stage_timer(D, timings):
    """degrade.py's stage functions wrapped so that each call adds its seconds to timings[stage] (the
    outermost call only: _filter_list calls filter2d). Returns a function that unwraps them."""
    stages = {"usm_sharpen": "usm", "kernel_from_params": "blur", "_filter_list": "blur", "filter2d": "blur",
              "_resize": "resize", "add_noise": "noise", "jpeg": "jpeg"}
    originals, depth = {n: getattr(D, n) for n in stages}, [0]

    def timed(fn, stage):
        def run(*a, **k):
            if depth[0]:
                return fn(*a, **k)
            depth[0], t0 = 1, time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                depth[0] = 0
                timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - t0
        return run
    for n, stage in stages.items():
        setattr(D, n, timed(originals[n], stage))
    return lambda: [setattr(D, n, f) for n, f in originals.items()]


@bench
def bench_degrade(args):
    import degrade as D
    size, batches = (128, (1, 4)) if args.quick else (512, (1, 16))
    rows, figures = [], {}
    for b in batches:
        hr, g, timings = _degrade_image(b, size), torch.Generator().manual_seed(0), {}
        def ours(hr=hr, g=g, timings=timings):
            unwrap = _stage_timer(D, timings)
            try:
                return D.degrade(hr, generator=g)
            finally:
                unwrap()
        fns = {"degrade.py": ours}
        try:
            fns["BasicSR (Real-ESRGAN way)"] = _basicsr_runner(b, size)
        except Exception as e:  # noqa: BLE001 - a missing optional reference is reported, not fatal
            print(f"BasicSR reference unavailable: {e}")
        t = median_times(fns, repeat=3, warmup=1)
        total = sum(timings.values())
        for name, sec in t.items():
            row = {"impl": name, "batch": b, "size": size, "pairs/s": b / sec, "s/pair": sec / b}
            if name == "degrade.py":
                row["stage shares"] = " ".join(f"{k} {v / total:.0%}" for k, v in timings.items())
            else:
                row["stage shares"] = "-"
            rows.append(row)
            figures[f"{name} b{b} pairs_per_s"] = b / sec
        if len(t) == 2:
            figures[f"speedup b{b}"] = t["BasicSR (Real-ESRGAN way)"] / t["degrade.py"]
    return f"degrade: Real-ESRGAN pipeline, {size}² GT, {torch.get_num_threads()} threads", rows, figures
