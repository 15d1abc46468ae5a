# %% [markdown]
# # MFSR in pictures: from a 2-D flow to the one-step jump
#
# This page is written by `python docs/walkthrough.py` (the same file opens as a notebook in
# Jupyter or VS Code: its cells are marked `# %%`). Every figure and every number on it comes from
# the run that wrote it, through the project's own functions (`mfsr.py`, `model.py`,
# `sample.py`, `experiments/toy_flows.py`); the numbers are also in `docs/walkthrough.json`,
# and each claim the prose makes is checked by the run (`claim(...)`) and by
# `tests/test_walkthrough.py`. In the notebook the numbers show as names in braces; the page has them filled in.
#
# Convention throughout (the paper's): **t = 0 is noise, t = 1 is data**, and a path is
# z_t = t x + (1 - t) eps. You know diffusion; the new object is the *average velocity*
# u(z_t, t, s), the straight jump from time t to a later time s.

# %%
import argparse
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

START, LOAD = time.perf_counter(), os.getloadavg()[0]                          # for the footer
NOTEBOOK = "ipykernel" in sys.modules
if "__file__" in globals():
    HERE = Path(__file__).resolve().parent                                      # docs/
else:                                                       # a notebook, opened in docs/ or at the top
    HERE = next(p for p in (Path.cwd(), Path.cwd() / "docs") if (p / "walkthrough.py").exists())
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(ROOT / "experiments")]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

try:
    import matplotlib  # noqa: E402
except ImportError:
    sys.exit("the walkthrough draws with matplotlib: pip install matplotlib (or pip install -r requirements-test.txt)")
if not NOTEBOOK:
    matplotlib.use("Agg")                                                       # files only
import matplotlib.pyplot as plt  # noqa: E402

import metrics  # noqa: E402
import mfsr  # noqa: E402
import miniature  # noqa: E402
import model  # noqa: E402
import sample  # noqa: E402
import toy_flows as toy  # noqa: E402
from plumbing import checkpoints, images, tiling  # noqa: E402

parser = argparse.ArgumentParser(description="Write docs/walkthrough.md, its figures and docs/walkthrough.json")
parser.add_argument("--out", default=str(HERE), help="output folder (default: docs/)")
args, _ = parser.parse_known_args()        # a notebook kernel passes its own arguments: ignored
OUT = Path(args.out)
FIGS = OUT / "walkthrough"
FIGS.mkdir(parents=True, exist_ok=True)
torch.set_num_threads(1)   # tiny matmuls: one thread is faster, and steady when the cores are shared

NUMBERS, CLAIMS, RUN = {}, [], {}


def num(key, value, fmt="{:.3g}", below=None):
    """Record a number the prose quotes as {key}, at the precision it is printed with; return it.
    below: a rounding-level number is quoted as that bound ("< 1e-12"), whose digits would differ
    from one CPU to the next."""
    NUMBERS[key] = fmt.format(value) if below is None or value >= below else f"< {below:.0e}".replace("e-0", "e-")
    return value


def claim(key, holds, statement):
    """Record a claim the prose makes and whether this run upholds it."""
    CLAIMS.append({"key": key, "holds": bool(holds), "statement": statement})
    print(("ok   " if holds else "FAIL ") + f"{key}: {statement}")


def save(fig, name):
    """A figure as FIGS/name.png; returns the page's relative link."""
    fig.savefig(FIGS / f"{name}.png", dpi=100, bbox_inches="tight")
    if NOTEBOOK:
        plt.show()                                                              # inline, below the cell
    plt.close(fig)
    return f"walkthrough/{name}.png"


def show(ax, img, title):
    """An image (1, 3, H, W) in [0, 1] on an axis, without ticks."""
    ax.imshow(img[0].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.axis("off")


# %% [markdown]
# ## 1. The task
#
# A low-resolution photograph in, four times the side out. MFSR works in the latent space of a VAE:
# the LR image is upsampled by bicubic interpolation and encoded to z_LR, a network turns noise into
# the HR latent while looking at z_LR, and the VAE decodes it. The teacher (DiT4SR at full scale) needs
# 40 steps for that; the MFSR student takes **one**: z_1 = z_0 + u(z_0, 0, 1) (Alg. 2).
#
# Below, the shipped miniature (`weights/mfsr-tiny/`: a {params_shipped} teacher and its student, trained on
# two CPU cores) on the example `examples/chelsea_lr.png`, through `sample.upscale` as `python sample.py`
# runs it. PSNR is to the HR crop. The student's file records a start time t0 = {t0_default}: it starts its jump from
# z_t0 = t0 z_LR + (1 - t0) eps instead of pure noise (`sample.py --start-time`), because at this size a
# jump from pure noise paints grain into flat areas. The paper's t0 = 0 is shown beside it: the same
# network, the same noise. Speckle (`metrics.speckle`) measures that grain: the output's fine
# energy in the HR's flattest areas over the HR's own (1: as much as the truth).
#
# ![LR, bicubic, VAE(bicubic), student one step from t0 = 0.965 and from t0 = 0, HR]({fig_task})
#
# | | bicubic | VAE(bicubic) | student, 1 step, t0 = {t0_default} | student, 1 step, t0 = 0 |
# |---|---|---|---|---|
# | PSNR to HR (dB) | {psnr_bicubic} | {psnr_vae} | {psnr_student_default} | {psnr_student_t0} |
# | speckle | {speckle_bicubic} | {speckle_vae} | {speckle_student_default} | {speckle_student_t0} |
#
# VAE(bicubic) is what the latent path costs before any network runs: the tiny VAE's round trip.

# %%
nets, vae, embs = miniature.load_shipped()
prompt = checkpoints.prompt_rows(embs["prompt"])
neg = checkpoints.prompt_rows(embs["neg"])
lr = images.load_image(ROOT / "examples" / "chelsea_lr.png").rgb[None]             # (1, 3, 64, 64)
hr = images.load_image(ROOT / "examples" / "chelsea_hr.png").rgb[None]             # (1, 3, 256, 256)
bicubic = miniature.bicubic_up(lr, hr.shape[-2:])
with torch.no_grad():
    vae_bicubic = (vae.decode(vae.encode(bicubic * 2 - 1)) + 1).div(2).clamp(0, 1)
t0_default = sample.sampling_settings(nets["student"])["start"]
num("t0_default", t0_default, "{:g}")
student_default = miniature.upscale_crops(lr, nets["student"], vae, prompt, 1, seed=0)
student_t0 = miniature.upscale_crops(lr, nets["student"], vae, prompt, 1, seed=0, start=0.0)
psnr = lambda x, ref=hr: metrics.psnr(x, ref).item()                                  # noqa: E731
for key, x in (("bicubic", bicubic), ("vae", vae_bicubic), ("student_default", student_default),
               ("student_t0", student_t0)):
    num(f"psnr_{key}", psnr(x), "{:.2f}")
    num(f"speckle_{key}", metrics.speckle(x, hr).item(), "{:.2g}")
claim("late_start_less_grain", metrics.speckle(student_default, hr).item() < metrics.speckle(student_t0, hr).item(),
      "the student's jump from its recorded t0 leaves less speckle than the jump from t0 = 0")
num("params_shipped", sum(p.numel() for p in nets["teacher"].parameters()) / 1e6, "{:.1f}M")

fig, axes = plt.subplots(1, 6, figsize=(18, 3.4))
show(axes[0], F.interpolate(lr, scale_factor=4, mode="nearest"), "LR (64 x 64)")
show(axes[1], bicubic, f"bicubic, {NUMBERS['psnr_bicubic']} dB")
show(axes[2], vae_bicubic, f"VAE(bicubic), {NUMBERS['psnr_vae']} dB")
show(axes[3], student_default, f"student 1 step, t0 = {t0_default:g}, {NUMBERS['psnr_student_default']} dB")
show(axes[4], student_t0, f"student 1 step, t0 = 0, {NUMBERS['psnr_student_t0']} dB")
show(axes[5], hr, "HR (256 x 256)")
RUN["fig_task"] = save(fig, "01_task")

# %% [markdown]
# ## 2. Flow and velocity on a 2-D toy
#
# Forget images for a moment. Data x: a mixture of four Gaussians in the plane, two per class (class 0
# on the right, class 1 on the left). Noise eps ~ N(0, I). Every pair (eps, x) is joined by the
# straight line z_t = t x + (1 - t) eps, and the velocity field a flow-matching teacher learns is the
# average of x - eps over all pairs passing through z at time t:
# v(z, t) = E[x - eps | z_t = z]. For a Gaussian mixture it is known in closed form
# (`toy_flows.gmm_velocity`), so here the "teacher" is exact.
#
# Following v from noise (`mfsr.sample` with v in place of u is Euler's method) gives curved paths,
# even though every training pair was a straight line: the field averages over the modes a point could
# still reach. So one Euler step, z_0 + v(z_0, 0), lands at the average of the class, between the modes,
# where there is no data. The sliced Wasserstein distance (`toy_flows.sw2`) to the {euler_ref_steps}-step
# endpoints is {sw2_euler1} for one step, {sw2_euler4} for four, and {sw2_data} between those endpoints and
# fresh data samples (what sampling noise alone gives).
#
# ![exact paths of the Gaussian mixture; one Euler step against many]({fig_flow})

# %%
z0, c = toy.eval_noise(2000)
EULER_REF = 200
num("euler_ref_steps", EULER_REF, "{:d}")
paths = []


def v_as_u(z, t, s):            # Alg. 2's step with the instantaneous velocity: Euler
    paths.append(z)
    return toy.gmm_velocity(z, t, c)


ref = mfsr.sample(v_as_u, z0, EULER_REF)
path = torch.stack(paths + [ref])                                                  # (steps + 1, n, 2)
one = mfsr.sample(lambda z, t, s: toy.gmm_velocity(z, t, c), z0, 1)
four = mfsr.sample(lambda z, t, s: toy.gmm_velocity(z, t, c), z0, 4)
data = toy.gmm_data(c, torch.Generator().manual_seed(7))
num("sw2_euler1", toy.sw2(one, ref))
num("sw2_euler4", toy.sw2(four, ref))
num("sw2_data", toy.sw2(data, ref))
claim("one_euler_step_misses", toy.sw2(one, ref) > 10 * toy.sw2(data, ref),
      "one Euler step is more than 10x farther from the exact endpoints than fresh data samples are")

colors = ["tab:red", "tab:blue"]
fig, axes = plt.subplots(1, 2, figsize=(11, 5))
ax = axes[0]
for i in range(60):
    ax.plot(path[:, i, 0], path[:, i, 1], color=colors[int(c[i])], lw=0.7, alpha=0.7)
    ax.plot([z0[i, 0], ref[i, 0]], [z0[i, 1], ref[i, 1]], color="gray", lw=0.5, ls=":")
ax.scatter(z0[:60, 0], z0[:60, 1], s=10, c="black", label="noise eps (t = 0)", zorder=3)
ax.scatter(ref[:60, 0], ref[:60, 1], s=10, c=[colors[int(k)] for k in c[:60]], label="endpoint (t = 1)", zorder=3)
ax.set(title="paths of dz/dt = v(z, t) (dotted: straight chords)", xlabel="z[0]", ylabel="z[1]")
ax.legend(fontsize=8, loc="lower center")
ax = axes[1]
ax.scatter(data[:, 0], data[:, 1], s=2, c="lightgray", label="data")
ax.scatter(ref[:, 0], ref[:, 1], s=2, c="tab:green", label=f"{EULER_REF} Euler steps")
ax.scatter(four[:, 0], four[:, 1], s=2, c="tab:orange", label="4 Euler steps")
ax.scatter(one[:, 0], one[:, 1], s=40, c="black", marker="x", label="1 Euler step (all land on two points)")
ax.set(title="where the samplers land", xlabel="z[0]", ylabel="z[1]")
legend = ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)
for handle in legend.legend_handles:
    handle.set_sizes([25])
for a in axes:
    a.set_aspect("equal")
    a.grid(alpha=0.3)
RUN["fig_flow"] = save(fig, "02_flow")

# %% [markdown]
# ## 3. The average velocity
#
# The exact one-step sampler needs not the tangent v but the secant:
#
#     u(z_t, t, s) = (z_s - z_t) / (s - t),   so   z_s = z_t + (s - t) u(z_t, t, s),
#
# where z_s is where the path through z_t is at time s. That is MeanFlow's average velocity, and
# what the MFSR student predicts. On a flow whose paths are known in closed form, the damped rotation
# dz/dt = A z (`toy_flows.linear_flow_u`, u = A phi((s - t) A) z), the jump with u lands on the path
# (error {secant_error}), the jump with v does not (it misses by {tangent_miss}, over a path of length
# {path_length}). At s = t the secant is the tangent: u(z, t, t) = v(z, t).
#
# ![the path, the tangent jump and the secant jump]({fig_secant})

# %%
zt = torch.tensor([[1.6, 0.4]], dtype=torch.float64)
t_, s_ = torch.tensor([0.1], dtype=torch.float64), torch.tensor([0.9], dtype=torch.float64)
taus = torch.linspace(0.1, 0.9, 81, dtype=torch.float64)
curve = torch.cat([toy.linear_flow_map(zt, t_, tau[None]) for tau in taus])          # (81, 2)
v_lin = toy.linear_flow_v(zt)
u_lin = toy.linear_flow_u(zt, t_, s_)
z_s = toy.linear_flow_map(zt, t_, s_)
gap = (s_ - t_).item()
num("secant_error", (zt + gap * u_lin - z_s).norm().item(), "{:.1e}", below=1e-12)
num("tangent_miss", (zt + gap * v_lin - z_s).norm().item(), "{:.2f}")
num("path_length", (curve[1:] - curve[:-1]).norm(dim=1).sum().item(), "{:.2f}")
claim("secant_lands_on_path", (zt + gap * u_lin - z_s).norm().item() < 1e-12,
      "z_t + (s - t) u(z_t, t, s) is the path's point at s, to 1e-12")
claim("u_at_s_eq_t_is_v", torch.allclose(toy.linear_flow_u(zt, t_, t_), v_lin, rtol=1e-14, atol=0),
      "u(z, t, t) = v(z, t)")

fig, ax = plt.subplots(figsize=(6, 6))
ax.plot(curve[:, 0], curve[:, 1], "k-", lw=1.5, label="the path from t = 0.1 to s = 0.9")
for (p, q), col, lab in (((zt, zt + gap * v_lin), "tab:orange", "(s - t) v: the tangent jump"),
                         ((zt, zt + gap * u_lin), "tab:green", "(s - t) u: the secant jump")):
    ax.annotate("", xy=tuple(q[0].tolist()), xytext=tuple(p[0].tolist()),
                arrowprops=dict(arrowstyle="->", color=col, lw=2))
    ax.plot([], [], color=col, lw=2, label=lab)
ax.plot(*zt[0].tolist(), "ko")
ax.annotate("z_t", tuple(zt[0].tolist()), xytext=(6, 4), textcoords="offset points")
ax.plot(*z_s[0].tolist(), "ks", mfc="none")
ax.annotate("z_s", tuple(z_s[0].tolist()), xytext=(6, -12), textcoords="offset points")
every = torch.cat([curve, zt + gap * v_lin, zt + gap * u_lin])
lo, hi = every.min(0).values - 0.25, every.max(0).values + 0.25
ax.set(title="dz/dt = A z: tangent against secant", xlabel="z[0]", ylabel="z[1]",
       xlim=(lo[0].item(), hi[0].item()), ylim=(lo[1].item(), hi[1].item()))
ax.set_aspect("equal")
ax.grid(alpha=0.3)
ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1))
RUN["fig_secant"] = save(fig, "03_secant")

# %% [markdown]
# ## 4. The MeanFlow identity
#
# u is what we want, but nobody can sample z_s for training. MeanFlow's trick: differentiate
# (s - t) u(z_t, t, s) = z_s - z_t in t, with s fixed. The right side gives -v(z_t, t), so
#
#     u(z_t, t, s) = v(z_t, t) + (s - t) du/dt,     du/dt = ∂u/∂z · v + ∂u/∂t     (Eq. 8)
#
# where du/dt is the derivative *along the path*: one forward-mode JVP of the network with tangents
# (v, 1, 0) for its inputs (z_t, t, s). The student is trained toward the right side, with the gradient
# stopped (Eq. 12): `mfsr.meanflow_target` computes it, `mfsr.mfd_loss` puts a distance on it.
#
# On the closed-form flow the right side must equal the left exactly: the largest relative residual of
# `meanflow_target` over 256 random (z, t, s) is **{identity_residual}** (claimed: at most 1e-9). The
# same check catches each mistake one could plant in the JVP (`toy_flows.planted_bug`):
#
# | planted bug | tangents | residual |
# |---|---|---|
# | none | (v, 1, 0) | {identity_residual} |
# | dropped time tangent | (v, 0, 0) | {bug_t_tangent} |
# | dropped z tangent | (0, 1, 0) | {bug_z_tangent} |
# | flipped sign | -(v, 1, 0) | {bug_sign} |
#
# And du/dt itself: the JVP against central differences (u(z + h v, t + h, s) - u(z - h v, t - h, s)) / 2h
# in float64, on a random MLP u(z, t, s) (`toy_flows.mlp_u`) and on the tiny two-time transformer of
# `model.py` (`toy_flows.two_time_net`, c_noise = t). The difference falls as h^2 (the
# difference's own error) until rounding takes over at small h; at best it is {fd_best_mlp} (MLP) and
# {fd_best_net} (transformer) relative: the JVP is the exact derivative, the finite difference an
# approximation of it.
#
# ![residuals with and without planted bugs; JVP against finite differences over h]({fig_identity})

# %%
residual = num("identity_residual", toy.identity_error(), "{:.1e}", below=1e-12)
claim("identity_residual", residual <= 1e-9, "the identity's residual on the closed-form flow is at most 1e-9")
bug_err = {}
for bug in toy.PLANTED_BUGS:
    bug_err[bug] = num("bug_" + bug.replace(" ", "_"), toy.identity_error(bug), "{:.2f}")
    claim("caught_" + bug.replace(" ", "_"), bug_err[bug] > 1e-2,
          f"the planted bug '{bug}' gives a residual above 1e-2")


def fd_curve(u_fn, z, t, s, v, hs):
    """Relative |JVP du/dt - central difference| over h; the JVP's du/dt from meanflow_target."""
    with torch.no_grad():
        _, u_tgt = mfsr.meanflow_target(u_fn, z, t, s, v)
        dudt = (u_tgt - v) / (s - t).view(-1, *[1] * (z.dim() - 1))
        out = []
        for h in hs:
            fd = (u_fn(z + h * v, t + h, s) - u_fn(z - h * v, t - h, s)) / (2 * h)
            out.append(((dudt - fd).norm() / dudt.norm()).item())
    return out


hs = [10.0 ** e for e in torch.arange(-9, -0.4, 0.5).tolist()]
g = torch.Generator().manual_seed(1)
_, mlp = toy.mlp_u()
z, v = (torch.randn(64, 2, generator=g, dtype=torch.float64) for _ in range(2))
t, s = (x.double() * 0.8 + 0.1 for x in mfsr.sample_times(64, ratio=1.0, generator=g))
s = torch.maximum(s, t + 0.05)
err_mlp = fd_curve(mlp, z, t, s, v, hs)
net64 = toy.two_time_net(1.0).double()
cond64 = mfsr.Cond(*(torch.randn(*shape, generator=g, dtype=torch.float64)
                     for shape in ((2, 16, 8, 8), (2, 32), (2, 4, 64))))                # z_lr, pooled, context
u64 = mfsr.average_velocity(net64)
zn, vn = (torch.randn(2, 16, 8, 8, generator=g, dtype=torch.float64) for _ in range(2))
tn, sn = torch.tensor([0.2, 0.5], dtype=torch.float64), torch.tensor([0.7, 0.9], dtype=torch.float64)
err_net = fd_curve(lambda a, b, c_: u64(a, b, c_, cond64), zn, tn, sn, vn, hs)
num("fd_best_mlp", min(err_mlp), "{:.0e}", below=1e-9)
num("fd_best_net", min(err_net), "{:.0e}", below=1e-9)
i2, i1 = hs.index(1e-2), hs.index(1e-1)
slope = (torch.tensor(err_mlp[i1]).log10() - torch.tensor(err_mlp[i2]).log10()).item()
num("fd_slope", slope, "{:.2f}")
claim("jvp_matches_fd", max(min(err_mlp), min(err_net)) < 1e-8,
      "the JVP's du/dt is within 1e-8 (relative) of the best central difference, on both networks")
claim("fd_error_is_h_squared", 1.8 < slope < 2.2,
      "between h = 0.01 and 0.1 the difference falls as h^2 (slope 1.8 to 2.2)")

fig, axes = plt.subplots(1, 2, figsize=(12, 4.3))
ax = axes[0]
names = ["none"] + list(toy.PLANTED_BUGS)
vals = [max(residual, 1e-17)] + [bug_err[b] for b in toy.PLANTED_BUGS]
ax.bar(names, vals, color=["tab:green"] + ["tab:red"] * 3)
ax.set_yscale("log")
ax.axhline(1e-9, color="tab:green", ls="--", lw=1, label="pass: residual <= 1e-9")
ax.axhline(1e-2, color="tab:red", ls="--", lw=1, label="caught: residual > 1e-2")
ax.set(title="max |u_tgt - u| / |u| on dz/dt = A z", ylabel="relative residual", xlabel="planted bug")
ax.legend(fontsize=8)
ax = axes[1]
ax.loglog(hs, err_mlp, "o-", ms=4, label="MLP u(z, t, s)")
ax.loglog(hs, err_net, "s-", ms=4, label="tiny two-time MMDiT, c_noise = t")
ax.loglog(hs, [err_mlp[i1] * (h / 1e-1) ** 2 for h in hs], "k:", lw=1, label="slope 2 (h^2)")
ax.set(title="JVP du/dt against central differences (float64)", xlabel="h", ylabel="relative difference",
       ylim=(1e-13, 1))
ax.grid(alpha=0.3, which="both")
ax.legend(fontsize=8)
RUN["fig_identity"] = save(fig, "04_identity")

# %% [markdown]
# ## 5. The time embedding decides what du/dt measures
#
# A diffusion transformer sees its time through sinusoids of c_noise. SD3 uses c_noise = 1000 t, so its
# fastest features turn at up to 1000 radians per unit t. Harmless for a sampler, which only ever
# evaluates the network; fatal for Eq. 8, which *differentiates* it in t. The JVP then returns the
# slope of the fastest ripple, not the trend of the flow (§4.4). Hence the student's c_noise = t
# (`MMDiTConfig.time_scale = 1`), or, for a teacher that cannot be retrained, the features above a
# cutoff dropped (`time_cutoff`, 20 rad per unit t here; not in the paper).
#
# Below, one output element of a random tiny two-time network (`toy_flows.two_time_net`) along a fine
# grid of t (s = {ripple_s}, z fixed), with the JVP's tangent line at t = {ripple_t}. `mfsr.dudt_terms`
# puts a number on it: the RMS of the JVP's time term d_t u over that of its secant over h = 0.1,
# 1 when the derivative describes the function at the scale of a step.
#
# | c_noise | time term / secant |
# |---|---|
# | t | {ratio_t} |
# | 1000 t | {ratio_1000t} |
# | 1000 t, low-passed at 20 rad | {ratio_cut} |
#
# ![u along t for three time embeddings, with the JVP's tangent lines]({fig_time})

# %%
variants = {"t": (1.0, 0.0), "1000t": (1000.0, 0.0), "cut": (1000.0, 20.0)}
labels = {"t": "c_noise = t", "1000t": "c_noise = 1000 t", "cut": "c_noise = 1000 t, low-passed at 20 rad"}
g = torch.Generator().manual_seed(2)
zr, vr, lr_r = (torch.randn(4, 16, 8, 8, generator=g) for _ in range(3))
cond_r = mfsr.Cond(lr_r, torch.randn(4, 32, generator=g), torch.randn(4, 4, 64, generator=g))
tr = torch.tensor([0.1, 0.3, 0.5, 0.95])
sr = torch.tensor([0.6, 0.7, 0.9, 1.0])
T_AT, S_AT = 0.4, 0.8
num("ripple_t", T_AT, "{:g}")
num("ripple_s", S_AT, "{:g}")
grid = torch.linspace(0.36, 0.44, 321)
n = len(grid)
fig, axes = plt.subplots(1, 3, figsize=(15, 4))
ratios = {}
for ax, (key, (scale, cutoff)) in zip(axes, variants.items()):
    u_r = mfsr.average_velocity(toy.two_time_net(scale, cutoff))
    ratios[key] = mfsr.dudt_terms(u_r, zr, tr, sr, vr, cond=cond_r)
    one_cond = cond_r.rows(torch.zeros(n, dtype=torch.long))
    with torch.no_grad():
        along = u_r(zr[:1].expand(n, -1, -1, -1), grid, torch.full((n,), S_AT), one_cond)[:, 0, 4, 4]
        u_at, d_t = mfsr.jvp(lambda t_: u_r(zr[:1], t_, torch.full((1,), S_AT), cond_r.rows([0])),
                             (torch.full((1,), T_AT),), (torch.ones(1),))
    ax.plot(grid, along, "k-", lw=1, label="u(z, t, s) (one element)")
    ax.plot(grid, u_at[0, 0, 4, 4] + (grid - T_AT) * d_t[0, 0, 4, 4], "r--", lw=1.2, label="JVP tangent at t = 0.4")
    lo, hi = along.min().item(), along.max().item()
    pad = 0.6 * (hi - lo) + 1e-4
    ax.set(title=labels[key], xlabel="t", ylim=(lo - pad, hi + pad))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
axes[0].set_ylabel("u[0, 4, 4]")
RUN["fig_time"] = save(fig, "05_time_embedding")
for key in variants:
    ratios[key] = ratios[key]["dudt_time"] / ratios[key]["dudt_secant_time"]
num("ratio_t", ratios["t"], "{:.2f}")
num("ratio_1000t", ratios["1000t"], "{:.1f}")
num("ratio_cut", ratios["cut"], "{:.2f}")
claim("ratio_t", 0.5 < ratios["t"] < 2, "with c_noise = t the time term is within 2x of its secant")
claim("ratio_1000t", ratios["1000t"] > 5, "with c_noise = 1000 t the time term is more than 5x its secant")
claim("ratio_cut", 0.5 < ratios["cut"] < 2, "with 1000 t low-passed at 20 rad the time term is within 2x of its secant")

# %% [markdown]
# ## 6. The teacher's velocity with a negative prompt (Eq. 11)
#
# The student does not learn from data pairs but from a teacher's velocity, and MFSR guides the teacher
# against a *negative* prompt ("blurry, low-res, ..."):
#
#     v = v_c + w (v_c - v_neg)                                   (Eq. 11, mfsr.teacher_velocity("neg"))
#
# w = 0 is the teacher as trained; w > 0 extrapolates away from what the negative prompt describes. On
# the toy the condition is the class and the negative prompt the other class (`toy_flows.guided`).
# Below, the teacher's 100-step samples at w = 0 and w = {w_big}. Guidance pushes each class away from the
# other: the samples' mean |z[0]| moves from {absx_w0} to {absx_w1} (the modes sit at 1.5). The toy makes
# the reason plain: its two classes are mirror images, so v_c - v_neg is one vector for every z at a
# given t (it differs across z by {guide_spread}, right panel), pointing along z[0], away from the
# other class: guidance translates the samples, by {guide_shift} at w = 1. It is an extrapolation, not a
# better fit: the sliced W2 distance to the data grows from {data_w0} to {data_w1}. On images the term
# varies with z; here it cannot.
# Which w helps is an empirical question; the miniature's teacher answered it by a scan of its 40-step
# PSNR (`miniature.py`, stage "cfg") and chose CFG scale {teacher_cfg}, i.e. Eq. 11's
# w = {teacher_w}, so its student was distilled from the plain conditional velocity.
#
# ![the guided teacher's samples at w = 0 and w = 1; the guidance term over t]({fig_cfg})

# %%
W_BIG = 1.0
num("w_big", W_BIG, "{:g}")
z0, c = toy.eval_noise(2000)
data = toy.gmm_data(c, torch.Generator().manual_seed(7))
fig, axes = plt.subplots(1, 3, figsize=(17, 4.6))
side = {}
for ax, w in zip(axes[:2], (0.0, W_BIG)):
    out = toy.guided_euler(z0, c, w, 100)
    side[w] = (out[:, 0].abs().mean().item(), toy.sw2(out, data))
    ax.scatter(data[:, 0], data[:, 1], s=2, c="lightgray", label="data")
    for k in (0, 1):
        ax.scatter(out[c == k, 0], out[c == k, 1], s=2, c=colors[k], label=f"class {k} (negative: class {1 - k})")
    ax.set(title=f"100 Euler steps of v_c + w (v_c - v_neg), w = {w:g}", xlabel="z[0]", ylabel="z[1]",
           xlim=(-5.5, 5.5), ylim=(-3, 3))
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, markerscale=4, loc="center")
ax = axes[2]
xs = torch.linspace(-3, 3, 9, dtype=torch.float64)
pts = torch.cartesian_prod(xs, xs)                                                 # 81 points z
cls0 = torch.zeros(len(pts), dtype=torch.long)
ts = torch.linspace(0, 0.99, 100, dtype=torch.float64)
term, spread = [], 0.0
for tv in ts:
    tt_ = torch.full((len(pts),), tv.item(), dtype=torch.float64)
    d = toy.gmm_velocity(pts, tt_, cls0) - toy.gmm_velocity(pts, tt_, 1 - cls0)    # v_c - v_neg at every z
    spread = max(spread, (d - d.mean(0)).abs().max().item())
    term.append(d.mean(0))
term = torch.stack(term)
ax.plot(ts, term[:, 0], "k-", label="v_c - v_neg, first coordinate")
ax.plot(ts, term[:, 1], "k--", label="v_c - v_neg, second coordinate")
ax.set(title="the guidance term of class 0, the same at all 81 z", xlabel="t", ylabel="v_c - v_neg")
ax.grid(alpha=0.3)
ax.legend(fontsize=8)
num("guide_spread", spread, "{:.0e}", below=1e-12)
claim("guidance_is_a_translation", spread < 1e-9, "on the mirror-image toy v_c - v_neg does not depend on z (to 1e-9)")
RUN["fig_cfg"] = save(fig, "06_negative_prompt")
num("absx_w0", side[0.0][0], "{:.2f}")
num("absx_w1", side[W_BIG][0], "{:.2f}")
num("data_w0", side[0.0][1], "{:.2f}")
num("data_w1", side[W_BIG][1], "{:.2f}")
num("guide_shift", side[W_BIG][0] - side[0.0][0], "{:.2f}")
claim("guidance_pushes_away", side[W_BIG][0] > side[0.0][0] + 0.5,
      "w = 1 moves the samples more than 0.5 further from the other class (mean |z[0]|)")
claim("guidance_extrapolates", side[W_BIG][1] > 5 * side[0.0][1],
      "w = 1's samples are more than 5x farther from the data than w = 0's")
teacher_cfg = sample.sampling_settings(nets["teacher"])["cfg"]
num("teacher_cfg", teacher_cfg, "{:g}")
num("teacher_w", mfsr.eq11_w(teacher_cfg), "{:g}")

# %% [markdown]
# ## 7. Algorithm 1: training the student
#
# One training step: draw (t, s) with `mfsr.sample_times`; t ~ U[0, 1], and for a share of the rows
# (the paper's 50 %) s ~ U[t, 1], for the rest s = t, where the target is the teacher's v itself and the
# student learns to be its teacher. Build z_t from data and noise, ask the teacher for v (Eq. 11), take
# the target v + (s - t) du/dt by the JVP (Eq. 12), and step on the pseudo-Huber distance
# (`mfsr.mfd_loss`). Left: {pairs_n} pairs drawn, {pairs_neq} of them off the diagonal.
#
# Middle and right: two toy students (an MLP u(z, t, s, class), `toy_flows.toy_student`, {toy_steps}
# steps each), one distilled from the teacher's velocity (w = 0, as the miniature), one from the data
# path's x - eps instead (Table 3's first row), with their losses and the quality of their one step: the
# sliced W2 distance to the teacher's 100-step samples from the same noise (the teacher's own one Euler
# step: {sw2_teacher1}, four: {sw2_teacher4}).
#
# The loss is not a quality meter. The data-path student's loss is flat from step {toy_early} on (it
# changes by a factor {gt_loss_factor} to the end) and ends {loss_gap}x above the teacher-target
# student's, yet its one step ({sw2_gt1}) is within {quality_gap}x of the other's ({sw2_neg1}), and both
# are far below the teacher's one step. A flat loss is the floor the target sets (x - eps given z_t is
# random; the teacher's v is a function of z_t, and its student's loss keeps falling), not a failed run:
# watch the samples. The teacher's velocity is still the better target here; its student's two steps
# reach {sw2_neg2}.
#
# ![the (t, s) pairs; the two students' losses and one-step quality over training]({fig_train})

# %%
PAIRS_N = 1000
tp, sp = mfsr.sample_times(PAIRS_N, ratio=0.5, generator=torch.Generator().manual_seed(0))
num("pairs_n", PAIRS_N, "{:d}")
num("pairs_neq", int((sp != tp).sum()), "{:d}")
TOY_STEPS, EVERY, TOY_W, EARLY = 1500, 50, 0.0, 200
num("toy_steps", TOY_STEPS, "{:d}")
num("toy_early", EARLY, "{:d}")
ez0, ec = toy.eval_noise()
eref = toy.guided_euler(ez0, ec, TOY_W, 100)
history, students = {}, {}
for kind in ("neg", "gt"):
    losses, quality = [], []

    def log_step(i, loss, u, losses=losses, quality=quality):
        losses.append(loss)
        if (i + 1) % EVERY == 0 or i == 0:
            with torch.no_grad():
                x1 = mfsr.sample(lambda z, t, s: u(z, t, s, mfsr.Cond(ec, None, None)), ez0, 1)
            quality.append((i + 1, toy.sw2(x1, eref)))
    students[kind] = toy.toy_student(kind, TOY_W, steps=TOY_STEPS, on_step=log_step)
    history[kind] = (losses, quality)
toy_scores = toy.toy_eval(TOY_W, students)
window = lambda losses, a, b: sum(losses[a:b]) / (b - a)                               # noqa: E731
gt_losses, neg_losses = history["gt"][0], history["neg"][0]
gt_factor = window(gt_losses, EARLY, EARLY + 2 * EVERY) / window(gt_losses, TOY_STEPS - 2 * EVERY, TOY_STEPS)
loss_gap = window(gt_losses, TOY_STEPS - 2 * EVERY, TOY_STEPS) / window(neg_losses, TOY_STEPS - 2 * EVERY, TOY_STEPS)
num("gt_loss_factor", gt_factor, "{:.2f}")
num("loss_gap", loss_gap, "{:.0f}")
num("sw2_teacher1", toy_scores["teacher 1"])
num("sw2_teacher4", toy_scores["teacher 4"])
num("sw2_gt1", toy_scores["gt 1"])
num("sw2_neg1", toy_scores["neg 1"])
num("sw2_neg2", toy_scores["neg 2"])
num("quality_gap", toy_scores["gt 1"] / toy_scores["neg 1"], "{:.1f}")
claim("gt_loss_flat", 1 / 1.1 < gt_factor < 1.1,
      "the data-path student's loss changes by less than 10 % after the early steps")
claim("loss_is_not_quality", loss_gap > 5 and toy_scores["gt 1"] < 2 * toy_scores["neg 1"],
      "the data-path student's loss is more than 5x the other's, its one-step distance less than 2x")
claim("toy_one_step", max(toy_scores["gt 1"], toy_scores["neg 1"]) < 0.3 * toy_scores["teacher 1"],
      "both toy students' one step is within 0.3x the teacher's one-step distance")
claim("teacher_target_wins", toy_scores["neg 1"] < toy_scores["gt 1"],
      "the teacher-velocity target gives the better one-step student")

fig, axes = plt.subplots(1, 3, figsize=(17, 4.6))
ax = axes[0]
neq = sp != tp
ax.scatter(tp[neq], sp[neq], s=3, c="tab:blue", label=f"s > t ({int(neq.sum())}): target v + (s - t) du/dt")
ax.scatter(tp[~neq], sp[~neq], s=3, c="tab:orange", label=f"s = t ({int((~neq).sum())}): target v")
ax.set(title="mfsr.sample_times(1000, ratio=0.5)", xlabel="t", ylabel="s", xlim=(0, 1), ylim=(0, 1))
ax.set_aspect("equal")
ax.legend(fontsize=8, markerscale=3, loc="lower right")
names = {"neg": "teacher's v (Eq. 11, w = 0)", "gt": "data path x - eps"}
steps_axis = torch.arange(1, TOY_STEPS + 1)
for kind, col in (("neg", "tab:blue"), ("gt", "tab:purple")):
    losses, quality = history[kind]
    smooth = torch.tensor(losses).unfold(0, EVERY, 1).mean(1)
    axes[1].plot(steps_axis, losses, color=col, alpha=0.15, lw=0.5)
    axes[1].plot(steps_axis[EVERY - 1:], smooth, color=col, label=f"target: {names[kind]}")
    qs, qv = zip(*quality)
    axes[2].plot(qs, qv, "o-", ms=3, color=col, label=f"target: {names[kind]}")
axes[1].set(title=f"MeanFlow loss (mean of {EVERY} steps)", xlabel="training step", ylabel="pseudo-Huber loss",
            yscale="log")
axes[2].axhline(toy_scores["teacher 1"], color="gray", ls=":", lw=1, label="teacher, 1 Euler step")
axes[2].axhline(toy_scores["teacher 4"], color="gray", ls="--", lw=1, label="teacher, 4 Euler steps")
axes[2].set(title="one step: sliced W2 to the teacher's 100 steps", xlabel="training step",
            ylabel="sliced W2 (lower is better)", yscale="log")
for ax in axes[1:]:
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
RUN["fig_train"] = save(fig, "07_training")

# %% [markdown]
# ## 8. Super-resolution from one noise
#
# Back to the photograph. From one noise eps (seed 0), the teacher's 40 Euler steps (SD3.5's shifted
# grid, `mfsr.sample_teacher`) trace a path from noise to image; below, the path at a few points
# decoded by the VAE, and beside it where the student's jumps (`mfsr.sample_student`) land from the
# same noise. PSNR is to the teacher's 40-step result: how near a cheap sampler comes to the expensive
# one. One network call covers the whole {latent_side} x {latent_side} latent (in {tiles} tiles, as
# `sample.py` runs it); the teacher samples at its recorded CFG scale {teacher_cfg}, which needs no
# negative branch, so one call per step.
#
# | sampler (from t0 = 0 unless said) | network calls | PSNR to the 40-step teacher (dB) | PSNR to HR (dB) |
# |---|---|---|---|
# | teacher, 40 steps | {calls_teacher40} | — | {hr_teacher40} |
# | teacher, 1 step | {calls_teacher1} | {to40_teacher1} | {hr_teacher1} |
# | **student, 1 step** | {calls_student1} | **{to40_student1}** | {hr_student1} |
# | student, 2 steps | {calls_student2} | {to40_student2} | {hr_student2} |
# | student, 1 step from t0 = {t0_default} | {calls_student1} | {to40_student_default} | {hr_student_default} |
#
# The student's one step lands {gain_db} dB nearer the 40-step result than the teacher's one step: it
# learned the jump the teacher can only make in many steps, and its two steps come nearer still.
# Against the HR the order turns round: PSNR rewards the blurriest answer (the teacher's one step,
# {hr_teacher1} dB) and charges for invented detail (40 steps, {hr_teacher40} dB). That trade is what the
# start time sets: from t0 = {t0_default}, z_t0 is nearly the LR latent, the jump invents little, and
# the result is nearer bicubic ({hr_student_default} dB against bicubic's {psnr_bicubic}) and further from
# the teacher's samples ({to40_student_default} dB).
# These pieces are `sample.upscale`'s: the one-step result from t0 = {t0_default} matches section 1's
# image (largest pixel difference: {pieces_match}).
#
# ![the teacher's 40-step path decoded at a few points; the student's jumps from the same noise]({fig_sr})

# %%
teacher, student = nets["teacher"], nets["student"]
st_t, st_s = sample.sampling_settings(teacher), sample.sampling_settings(student)
with torch.no_grad():
    z_lr = tiling.encode(vae, bicubic * 2 - 1, tile=0)                          # as sample.upscale (vae_tile=0)
cond = prompt._replace(z_lr=z_lr)


class Recorded:
    """A network wrapper that counts its calls and keeps (t, z) of each: the sampler's path."""

    def __init__(self, net):
        self.net, self.cfg, self.calls, self.path = net, net.cfg, 0, []

    def __call__(self, x, sigma, *a, **k):
        self.calls += 1
        self.path.append((1 - sigma[0].item(), x[:1].clone()))
        return self.net(x, sigma, *a, **k)


def tiled(net, st):
    return Recorded(tiling.TiledNet(net, st["tile"], st["tile_overlap"]))


def decoded(z):
    """The latent as sample.upscale finishes it: VAE decode, then the colour fix against bicubic."""
    with torch.no_grad():
        y = (tiling.decode(vae, z, tile=0) + 1) / 2
    return sample.COLOR_FIXES["adain"](y, bicubic).clamp(0, 1)


num("latent_side", z_lr.shape[-1], "{:d}")
num("tiles", len(tiling.TiledNet(student, st_s["tile"], st_s["tile_overlap"]).tiles(*z_lr.shape[-2:])), "{:d}")
runs = {}
for name, steps in (("teacher40", 40), ("teacher1", 1)):
    rec = tiled(teacher, st_t)
    z = mfsr.sample_teacher(rec, cond, neg, steps=steps, cfg=st_t["cfg"], shift=st_t["shift"],
                            generator=torch.Generator().manual_seed(0))
    runs[name] = (decoded(z), rec)
for name, steps, t0 in (("student1", 1, 0.0), ("student2", 2, 0.0), ("student_default", 1, t0_default)):
    rec = tiled(student, st_s)
    with torch.no_grad():
        z = mfsr.sample_student(rec, cond, steps=steps, generator=torch.Generator().manual_seed(0), start=t0)
    runs[name] = (decoded(z), rec)
ref40 = runs["teacher40"][0]
for name, (img, rec) in runs.items():
    num(f"calls_{name}", rec.calls, "{:d}")
    num(f"hr_{name}", psnr(img), "{:.2f}")
    if name != "teacher40":
        num(f"to40_{name}", psnr(img, ref40), "{:.2f}")
gain = psnr(runs["student1"][0], ref40) - psnr(runs["teacher1"][0], ref40)
num("gain_db", gain, "{:.1f}")
claim("student_beats_teacher_one_step", gain > 0,
      "the student's one step is nearer the 40-step result than the teacher's one step")
claim("two_steps_nearer", psnr(runs["student2"][0], ref40) > psnr(runs["student1"][0], ref40),
      "the student's two steps are nearer the 40-step result than its one step")
match = (runs["student_default"][0] - student_default).abs().max().item()
num("pieces_match", match, "{:.1g}")
claim("pieces_are_upscale", match < 1e-4,
      "the samplers called directly give sample.upscale's image (max |diff| < 1e-4)")

path40 = runs["teacher40"][1].path
picks = [0, 20, 30, 36, 39]
fig, axes = plt.subplots(2, 5, figsize=(16, 7))
for ax, i in zip(axes[0], picks):
    t_i, z_i = path40[i]
    show(ax, decoded(z_i), f"teacher path, step {i}, t = {t_i:.2f}")
for ax, name, title in zip(axes[1], ("teacher40", "teacher1", "student1", "student2", "student_default"),
                           ("teacher, 40 steps (the reference)", "teacher, 1 step", "student, 1 step",
                            "student, 2 steps", f"student, 1 step, t0 = {t0_default:g}")):
    img, rec = runs[name]
    extra = "" if name == "teacher40" else f", {NUMBERS['to40_' + name]} dB to ref"
    show(ax, img, f"{title}\n{rec.calls} call{'s' * (rec.calls > 1)}{extra}")
RUN["fig_sr"] = save(fig, "08_one_noise")

# %% [markdown]
# ## 9. Full scale: the same calls, counted on the meta device
#
# The miniature runs the real code at a toy width. At full scale the teacher is DiT4SR (SD3.5-medium's
# MMDiT-X plus the LR stream) and the student the same network plus LoRA and an s-embedder
# (`model.make_student`). On PyTorch's meta device the networks have shapes but no memory, so their
# sizes and arithmetic can be counted here (`torch.utils.flop_counter.FlopCounterMode`, the way
# `experiments/benches/sampling.py` counts `sample.py`):
#
# | | miniature | full scale |
# |---|---|---|
# | teacher parameters | {params_tiny_teacher} | {params_teacher} |
# | student parameters (trained) | {params_tiny_student} ({train_tiny_student}) | {params_student} ({train_student}) |
# | tokens per call at 512^2 output: image + LR + text | — | {tok_img} + {tok_lr} + {tok_txt} |
# | one forward at 512^2 (GFLOP) | — | {gflop_forward} |
# | the teacher's 40 steps with CFG (forwards, GFLOP) | | {teacher_forwards}, {gflop_teacher} |
# | the student's one step (forwards, GFLOP) | | 1, {gflop_student} |
#
# The one-step student does {speedup}x less arithmetic than its teacher for the same image.

# %%
def count(net, trained=False):
    """Parameters of net (trained=True: only those that train)."""
    return sum(p.numel() for p in net.parameters() if p.requires_grad or not trained)


with torch.device("meta"):
    big_teacher = model.MMDiT(model.CONFIGS["dit4sr"])
    big_student = model.make_student(big_teacher, time_scale=1.0, lora_rank=64)
tiny_student = model.make_student(model.MMDiT(model.CONFIGS["tiny"]), time_scale=1.0, lora_rank=64)
num("params_teacher", count(big_teacher) / 1e9, "{:.2f}B")
num("params_student", count(big_student) / 1e9, "{:.2f}B")
num("train_student", count(big_student, True) / 1e6, "{:.0f}M")
num("params_tiny_teacher", count(teacher) / 1e6, "{:.2f}M")
num("params_tiny_student", count(tiny_student) / 1e6, "{:.2f}M")
num("train_tiny_student", count(tiny_student, True) / 1e6, "{:.2f}M")
cfgb = big_student.cfg
lat = 512 // 8                                                  # the SD3 VAE: 8x, 16 channels
CLIP_TOKENS, T5_TOKENS = 77, 256                                # SD3.5's prompt: CLIP-L/G 77 tokens, T5 256
zb = torch.empty(1, cfgb.in_channels, lat, lat, device="meta")
pooled_b = torch.empty(1, cfgb.pooled_dim, device="meta")
ctx_b = torch.empty(1, CLIP_TOKENS + T5_TOKENS, cfgb.context_dim, device="meta")
with torch.no_grad(), FlopCounterMode(display=False) as fc:
    big_student(zb, torch.ones(1, device="meta"), pooled_b, ctx_b, lr=zb, sigma_s=torch.zeros(1, device="meta"))
gflop_student = fc.get_total_flops() / 1e9
with torch.no_grad(), FlopCounterMode(display=False) as fc:
    big_teacher(zb, torch.ones(1, device="meta"), pooled_b, ctx_b, lr=zb)
gflop_forward = fc.get_total_flops() / 1e9
num("tok_img", (lat // cfgb.patch) ** 2, "{:d}")
num("tok_lr", (lat // cfgb.patch) ** 2, "{:d}")
num("tok_txt", CLIP_TOKENS + T5_TOKENS, "{:d}")
num("gflop_forward", gflop_forward, "{:,.0f}")
num("teacher_forwards", 40 * 2, "{:d}")
num("gflop_teacher", 80 * gflop_forward, "{:,.0f}")
num("gflop_student", gflop_student, "{:,.0f}")
num("speedup", 80 * gflop_forward / gflop_student, "{:.0f}")

# %% [markdown]
# ---
#
# Written by `python docs/walkthrough.py` on {run_date} in **{run_seconds} s** (torch {run_torch}, one
# thread, {run_cpus} CPU cores, load average {run_load} when it started). {run_claims}

# %%
RUN.update(run_date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), run_torch=torch.__version__.split("+")[0],
           run_cpus=os.cpu_count(), run_load=f"{LOAD:.1f}")
failed = [c_["key"] for c_ in CLAIMS if not c_["holds"]]
RUN["run_claims"] = (f"All {len(CLAIMS)} claims held." if not failed else
                     f"**{len(failed)} of {len(CLAIMS)} claims did not hold: {', '.join(failed)}.**")


def markdown_cells(source):
    """The markdown cells of this file (percent format), their '# ' prefixes taken off."""
    cells, cur = [], None
    for line in source.splitlines():
        if line.startswith("# %%"):
            cur = [] if line.strip() == "# %% [markdown]" else None
            if cur is not None:
                cells.append(cur)
        elif cur is not None:
            cur.append(line[2:] if line.startswith("# ") else line.lstrip("#"))
    return ["\n".join(c).strip() for c in cells]


def fill(text, values):
    """{name} -> its value; an unknown name is an error, not a hole in the page."""
    return re.sub(r"\{([a-z][a-z0-9_]*)\}", lambda m: str(values[m.group(1)]), text)


RUN["run_seconds"] = f"{time.perf_counter() - START:.0f}"
page = "\n\n".join(fill(cell, {**NUMBERS, **RUN}) for cell in markdown_cells((HERE / "walkthrough.py").read_text()))
(OUT / "walkthrough.md").write_text(page + "\n")
(OUT / "walkthrough.json").write_text(json.dumps(
    {"numbers": NUMBERS, "claims": CLAIMS,
     "run": {k: v for k, v in RUN.items() if not k.startswith("fig_")} | {"machine": platform.machine()}},
    indent=1) + "\n")
print(f"wrote {OUT / 'walkthrough.md'}, {len(list(FIGS.glob('*.png')))} figures, {len(NUMBERS)} numbers, "
      f"{len(CLAIMS)} claims in {RUN['run_seconds']} s")
if failed and not NOTEBOOK:
    sys.exit(f"claims that do not hold: {', '.join(failed)}")
