"""MFSR: MeanFlow distillation for one-step real-world super-resolution, the method only.

    from mfsr import sample_times, meanflow_target, pseudo_huber, sample
    t, s = sample_times(B, ratio=0.5, generator=g)
    u, u_tgt = meanflow_target(u_fn, z_t, t, s, v)      # Eq. (8), (12)
    loss, per_sample = pseudo_huber(u, u_tgt)

Pure functions of (networks, tensors, generator): no I/O, no argparse, no distributed code.
Equation numbers are the MFSR paper's unless marked "MeanFlow Eq.".

Convention (the MFSR paper's, used everywhere in this file):
    z_t = t * z_HR + (1 - t) * eps,   t = 0 is noise, t = 1 is data,   s >= t,
    v(z_t, t)    = dz_t/dt             the instantaneous velocity (for straight paths z_HR - eps),
    u(z_t, t, s) = (z_s - z_t)/(s - t) the average velocity over [t, s]; sampling runs 0 -> 1.
The transformers of model.py use SD3's sigma = 1 - t and predict eps - x0 = -v (cfg.prediction
"v", every full-scale path). The adapters `velocity`, `average_velocity` and `denoised` are the only
place that converts; they compute 1 - t and 1 - s inside the function that is differentiated, so
the JVP's chain rule stays exact.

The miniature's networks predict data instead (cfg.prediction "x", JiT: Li & He 2025): they output
x - z_LR, so an untrained network already predicts the LR latent. A network of a few million weights
cannot reproduce the noise it was given, as predicting eps - x0 at high noise asks, and every error
it makes there stays in the sample as noise; predicting x, its errors are blur. Then
    v(z_t, t) = (x - z_t) / (1 - t),   u(z_t, t, s) = (x(z_t, t, s) - z_t) / (1 - t),
so one student step from t = 0 lands on z_1 = x exactly; 1 - t is clamped at X_PRED_MIN_SIGMA.

Time embedding (§4.4). A network sees c_noise = time_scale * (1 - t) through sinusoids, so the JVP's
time term is dc_noise/dt * demb/dc_noise * du/demb. With SD3's c_noise = 1000 t the features ripple at
up to 1000 rad per unit t: du/dt then measures the embedding's ripple, not the flow, and Eq. 12's
target points nowhere useful (`dudt_terms` measures it; docs/time_embedding.md). Hence the paper's
student c_noise = t; the miniature's teacher is trained with c_noise = t too, so its student starts
as its teacher. For a teacher that cannot be retrained (SD3.5 / DiT4SR, 1000 t), beyond the paper,
MMDiTConfig.time_cutoff drops the student's time features above a cutoff (e.g. 20 rad per unit t).
"""
import math
from typing import NamedTuple, Optional

import torch
import torch.autograd.forward_ad as fwAD


class Cond(NamedTuple):
    """What a network sees besides (z, t, s), batched like z: the LR latent z_lr (B, C, h, w), the
    prompt's pooled embedding (B, P) and tokens (B, L, D). A prompt alone has z_lr None."""
    z_lr: Optional[torch.Tensor]
    pooled: torch.Tensor
    context: torch.Tensor

    def rows(self, idx):
        return Cond(*(None if x is None else x[idx] for x in self))

    def cat(self, other):
        """Rows [self ; other]: two conditions in one batched call."""
        return Cond(*(None if a is None else torch.cat([a, b]) for a, b in zip(self, other)))

    def to(self, *args, **kwargs):
        return Cond(*(None if x is None else x.to(*args, **kwargs) for x in self))


# --------------------------------------------------------------------------------------------
# Adapters from the SD3-convention networks of model.py to the paper's v and u


X_PRED_MIN_SIGMA = 0.05   # JiT's clamp: near the data end (x - z_t) / (1 - t) divides noise-free error by ~0


def _predicts_x(net):   # cfg.prediction == "x"; a plain function (the tests' stand-ins) predicts v
    return getattr(getattr(net, "cfg", None), "prediction", "v") == "x"


def error_scale(net, t):
    """mfd_loss's scale for `net`: 1 - t (clamped as the adapters clamp it) for an x-predicting
    network, whose errors are then measured in x; None (u itself) for a velocity network."""
    return (1 - t).clamp_min(X_PRED_MIN_SIGMA) if _predicts_x(net) else None


def _bc(t, z):   # (B,) -> (B, 1, ..., 1), to broadcast over z
    return t.view(-1, *[1] * (z.dim() - 1))


def denoised(net):
    """x(z, t, c): the network's estimate of z_HR; c a Cond batched like z.
    "v": z + (1 - t) v; "x": z_lr + the network's output."""
    def x(z, t, c):
        out = net(z, 1 - t, c.pooled, c.context, lr=c.z_lr)
        return c.z_lr + out if _predicts_x(net) else z - _bc(1 - t, z) * out
    return x


def _as_velocity(net, out, z, t, z_lr):
    """A network output as the paper's velocity: -out ("v"), or (x - z) / (1 - t) with x = z_lr + out."""
    if _predicts_x(net):
        return (z_lr + out - z) / _bc(1 - t, z).clamp_min(X_PRED_MIN_SIGMA)
    return -out


def velocity(net):
    """v(z, t, c) of a one-time network (the teacher): v = -net(z, sigma = 1 - t), or from its x
    (see the top of this file). c: a Cond, the LR latent and the prompt."""
    def v(z, t, c):
        return _as_velocity(net, net(z, 1 - t, c.pooled, c.context, lr=c.z_lr), z, t, c.z_lr)
    return v


def average_velocity(net):
    """u(z, t, s, c) of a two-time network (the student): u = -net(z, 1 - t, sigma_s = 1 - s), or
    (x(z, t, s) - z) / (1 - t) for an x-predicting one (see the top of this file)."""
    def u(z, t, s, c):
        return _as_velocity(net, net(z, 1 - t, c.pooled, c.context, lr=c.z_lr, sigma_s=1 - s), z, t, c.z_lr)
    return u


# --------------------------------------------------------------------------------------------
# §4.4: time sampling


TIME_PAIRS = ("uniform", "to-data", "logit-normal")


def sample_times(batch, ratio=0.5, generator=None, device=None, pairs="uniform", max_gap=1.0):
    """t ~ U[0, 1], s | t ~ U[t, 1]; a share `ratio` of the rows has s != t (App. F, Table 4),
    the rest s = t. The count is ratio * batch rounded stochastically (exact on average, and
    fixed when ratio * batch is whole, which keeps shapes static for compile); those rows come
    first. Returns (t, s), each (B,).

    Beyond the paper, other draws of the s != t rows (docs/miniature.md has their scans):
      pairs "to-data": every other one jumps to the data, s = 1: the one-step sampler's jump (0, 1)
        is such a pair, and its target uses u(., t', 1) near t, which the paper's draw rarely visits;
      pairs "logit-normal": py-meanflow's: two noise levels sigmoid(N(-0.4, 1)), sorted;
      max_gap < 1: s - t at most max_gap (t raised), a short-to-long curriculum (AlphaFlow, Kim et
        al. 2025) raises it to 1 over the training (train.py --gap-ramp)."""
    if pairs not in TIME_PAIRS:
        raise ValueError(f"pairs must be one of {', '.join(TIME_PAIRS)}, got {pairs!r}")
    draw_on = device if generator is None else generator.device    # as noise_like: then moved to `device`
    r = torch.rand(2 * batch + 1, generator=generator, device=draw_on)
    t, u01 = r[:batch], r[batch:2 * batch]
    n_neq = min(batch, math.floor(ratio * batch + r[-1].item()))
    s = t + (1 - t) * u01
    if pairs == "to-data":
        s = torch.where(torch.arange(batch, device=s.device) % 2 == 0, torch.ones_like(s), s)
    elif pairs == "logit-normal":
        noise = torch.sigmoid(torch.randn(2, batch, generator=generator, device=draw_on) - 0.4)
        t_ln, s_ln = 1 - noise.max(0).values, 1 - noise.min(0).values       # t = 0 is noise
        t = torch.cat([t_ln[:n_neq], t[n_neq:]])
        s = s_ln
    if max_gap < 1:
        t = torch.cat([torch.maximum(t[:n_neq], s[:n_neq] - max_gap), t[n_neq:]])
    s = torch.cat([s[:n_neq], t[n_neq:]])
    return t.to(device), s.to(device)


# --------------------------------------------------------------------------------------------
# Table 3: the instantaneous velocity the average velocity is distilled from


def teacher_velocity(kind, z_t, t, *, z_hr=None, eps=None, teacher=None, student_u=None,
                     cond=None, cond_neg=None, cond_null=None, w=6.0, kappa=0.0):
    """v_inst for the MeanFlow target, by name (Table 3). No gradients.

    gt:        z_HR - eps (the data path itself)
    meanflow:  MeanFlow's CFG with the student at s = t (Eq. 9):
               w (z_HR - eps) + kappa u(z, t, t | c) + (1 - w - kappa) u(z, t, t | null)
    null:      teacher CFG against the null prompt (Eq. 10):  v_c + w (v_c - v_null)
    neg:       teacher CFG against the negative prompt (Eq. 11): v_c + w (v_c - v_neg)  [default]
    teacher:   v(z, t, c), e.g. `velocity(net)`; student_u: u(z, t, s, c), e.g. `average_velocity(net)`;
               cond, cond_neg, cond_null: Conds (two at a time run in one call).
    """
    with torch.no_grad():
        if kind == "gt":
            return z_hr - eps
        if kind == "meanflow":
            u_c, u_null = _two_conditions(lambda zz, tt, cc: student_u(zz, tt, tt, cc), z_t, t, cond, cond_null)
            return w * (z_hr - eps) + kappa * u_c + (1 - w - kappa) * u_null
        if kind in ("null", "neg"):
            other = cond_null if kind == "null" else cond_neg
            v_c, v_o = _two_conditions(teacher, z_t, t, cond, other)
            return v_c + w * (v_c - v_o)                                          # Eq. (10) / (11)
    raise ValueError(f"unknown teacher velocity {kind!r}: gt, meanflow, null or neg")


def eq11_w(cfg_scale):
    """Eq. 11's w for a sampler's standard CFG scale: v_neg + scale (v_c - v_neg) is
    v_c + (scale - 1) (v_c - v_neg), so w = scale - 1 (DiT4SR's scale 8 is w = 7)."""
    return cfg_scale - 1.0


def _two_conditions(fn, z, t, c1, c2):
    """fn on two conditions in one batched call: rows [c1 ; c2], outputs split back."""
    return fn(torch.cat([z, z]), torch.cat([t, t]), c1.cat(c2)).chunk(2)


# --------------------------------------------------------------------------------------------
# Eq. (8), (12): the MeanFlow target by one forward-mode JVP


def jvp(f, primals, tangents):
    """(f(*primals), the derivative of f along tangents): one forward-mode pass with dual tensors
    (torch.autograd.forward_ad), like torch.func.jvp but letting a network's layers apply their own
    cheaper tangent rules (fastjvp.py); autograd still records the primal for backward."""
    with fwAD.dual_level():
        out = f(*(fwAD.make_dual(p, t) for p, t in zip(primals, tangents)))
        return tuple(fwAD.unpack_dual(out))


def meanflow_target(u_fn, z_t, t, s, v, cond=None, mode="split", u_fn_jvp=None, jvp_fn=None):
    """(u, u_tgt): u = u_theta(z_t, t, s) to train, u_tgt = v + (s - t) du/dt, stopped.

    u_fn(z, t, s) is any average velocity in the paper's convention, or u_fn(z, t, s, c) when
    `cond` (a Cond, batched like z_t) is given.

    du/dt = d/dt u(z_t, t, s) along the flow = J_z u . v + d_t u: one JVP with tangents
    (v, 1, 0) for (z_t, t, s) (MeanFlow Eq. 8). Rows with s = t need no JVP, their target is v.
    mode "split": the JVP without gradients gives the target, an ordinary forward with
      gradients (fused attention and checkpointing both fine) gives u. Memory of a plain step.
    mode "fused": one grad-enabled JVP whose primal output is trained; fewer FLOPs but eager
      autograd records the tangent's ops too (train.py runs it inside fastjvp.detached_tangents,
      which skips recording them). The tangent is detached: without that a second-order term
      silently enters the gradient.
    The target is fp32 (fp64 for fp64 inputs) whatever the network's precision.
    u_fn_jvp: another u for the JVP pass only, the same function of the same weights (e.g. the
    uncompiled network when u_fn is compiled); default u_fn.
    jvp_fn(f, primals, tangents): how the JVP is taken: `jvp` above (None, eager), or the compiled
    torch.func.jvp of train.py --compile (fastjvp.func_jvp).
    """
    jvp_fn = jvp_fn or jvp
    B = z_t.shape[0]
    assert t.shape == (B,) and s.shape == (B,) and v.shape == z_t.shape, "t, s (B,); v like z_t"
    if mode not in ("split", "fused"):
        raise ValueError(f"mode must be 'split' or 'fused', got {mode!r}")
    neq = (s != t).nonzero().squeeze(1)          # rows whose target needs du/dt
    same = (s == t).nonzero().squeeze(1)         # rows whose target is v itself

    def u_on(rows):                              # u_theta on some rows, with their conditions
        if cond is None:
            return u_fn(z_t[rows], t[rows], s[rows])
        return u_fn(z_t[rows], t[rows], s[rows], cond.rows(rows))

    def u_of(z, t_, s_):                         # what the JVP differentiates: u on the rows `neq`
        f = u_fn_jvp or u_fn
        return f(z, t_, s_) if cond is None else f(z, t_, s_, cond.rows(neq))

    primals = (z_t[neq], t[neq], s[neq])
    tangents = (v[neq], torch.ones_like(t[neq]), torch.zeros_like(s[neq]))     # dz/dt = v, dt/dt = 1, ds/dt = 0
    acc = torch.promote_types(v.dtype, torch.float32)       # fp32 target, fp64 stays fp64
    gap = (s - t)[neq].view(-1, *[1] * (z_t.dim() - 1)).to(acc)                # (s - t) per row
    u_tgt = v.detach().to(acc).clone()
    if mode == "split":
        if len(neq):
            with torch.no_grad():
                _, dudt = jvp_fn(u_of, primals, tangents)
            u_tgt[neq] += gap * dudt.to(acc)                                     # Eq. (12)
        return u_on(slice(None)), u_tgt.detach()                                 # stopgrad of Eq. (12)
    u = torch.zeros_like(z_t, dtype=acc)                    # fused: the JVP's primal output is trained
    if len(neq):
        u_neq, dudt = jvp_fn(u_of, primals, tangents)       # dudt is detached below
        u = u.index_put((neq,), u_neq.to(u.dtype))
        u_tgt[neq] += gap * dudt.detach().to(acc)                                # Eq. (12)
    if len(same):
        u = u.index_put((same,), u_on(same).to(u.dtype))
    return u, u_tgt.detach()


def dudt_terms(u_fn, z_t, t, s, v, cond=None, h=0.1):
    """Where Eq. 8's du/dt = J_z u . v + d_t u comes from, on the rows with s != t: the JVP's noise
    term (tangents (v, 0, 0)) and time term ((0, 1, 0)), and secants over h of the time term
    (u(z, t + h, s) - u(z, t, s)) / h and of du/dt (u(z + h v, t + h, s) - u(z, t, s)) / h (h < 0
    where t + h > 1). Each an RMS per row, averaged ({} without such rows). With c_noise = 1000 t
    the time term measures the embedding's ripple, far above its secant (§4.4)."""
    rows = (s != t).nonzero().squeeze(1)
    if not len(rows):
        return {}
    z, t, s, v = z_t[rows], t[rows], s[rows], v[rows].to(z_t)
    c = None if cond is None else cond.rows(rows)
    f = (lambda z_, t_, s_: u_fn(z_, t_, s_)) if c is None else (lambda z_, t_, s_: u_fn(z_, t_, s_, c))
    rms = lambda x: float(x.float().flatten(1).pow(2).mean(1).sqrt().mean())      # noqa: E731
    with torch.no_grad():
        u0, d_noise = jvp(f, (z, t, s), (v, torch.zeros_like(t), torch.zeros_like(s)))
        _, d_time = jvp(f, (z, t, s), (torch.zeros_like(z), torch.ones_like(t), torch.zeros_like(s)))
        hh = torch.where(t + h <= 1, h, -h).to(t)
        sec_time = (f(z, t + hh, s) - u0) / _bc(hh, z)
        sec_flow = (f(z + _bc(hh, z) * v, t + hh, s) - u0) / _bc(hh, z)
    return {"dudt_time": rms(d_time), "dudt_noise": rms(d_noise), "dudt_jvp": rms(d_time + d_noise),
            "dudt_secant_time": rms(sec_time), "dudt_secant": rms(sec_flow)}


# --------------------------------------------------------------------------------------------
# §4.4: the loss


def _sq_dist(a, b):
    """Per-sample squared L2 distance, in fp32 at least (fp64 stays fp64)."""
    d = (a - b).flatten(1)
    return d.to(torch.promote_types(d.dtype, torch.float32)).pow(2).sum(1)


def pseudo_huber(a, b, c=None):
    """d(a, b) = sqrt(||a - b||^2 + c^2) - c per sample (Song & Dhariwal 2023, with their
    c = 0.00054 sqrt(dim)). Returns (mean, per-sample)."""
    c = 0.00054 * math.sqrt(a[0].numel()) if c is None else c
    per = torch.sqrt(_sq_dist(a, b) + c * c) - c
    return per.mean(), per


def squared_l2(a, b):
    per = _sq_dist(a, b) / a[0].numel()
    return per.mean(), per


def adaptive_l2(a, b, p=1.0, c=1e-3):
    """MeanFlow's adaptive loss: sg(1 / (||a - b||^2 + c)^p) ||a - b||^2 (MeanFlow §4.3)."""
    d2 = _sq_dist(a, b)
    per = d2 / (d2.detach() + c) ** p
    return per.mean(), per


LOSSES = {"pseudo_huber": pseudo_huber, "l2": squared_l2, "adaptive": adaptive_l2}


def mfd_loss(u_fn, z_t, t, s, v, cond=None, mode="split", loss="pseudo_huber", u_fn_jvp=None, scale=None,
             jvp_fn=None):
    """One MeanFlow-distillation loss (Alg. 1): target by JVP, NaN guard, the chosen distance.

    scale: an optional (B,) factor the distance measures (u - u_tgt) in. An x-predicting network
    passes error_scale(t) = 1 - t: (1 - t)(u - u_tgt) is the error of its own output x, while
    u-space would weight the rows near the data end by up to 1 / X_PRED_MIN_SIGMA^2.

    Returns a dict: loss (None: a non-finite target, the whole step skipped, not masked), per_sample,
    n_nonfinite, and jvp_term = max over rows of ||u_tgt - v|| / ||v||, the size of the (s - t) du/dt
    correction (Sana-Sprint and rCM normalise it when it grows large; train.py logs it).
    """
    u, u_tgt = meanflow_target(u_fn, z_t, t, s, v, cond=cond, mode=mode, u_fn_jvp=u_fn_jvp, jvp_fn=jvp_fn)
    bad = int((~torch.isfinite(u_tgt.flatten(1)).all(1)).sum())
    if bad:
        return {"loss": None, "per_sample": None, "n_nonfinite": bad, "jvp_term": float("nan")}
    k = 1 if scale is None else _bc(scale.to(u_tgt), u_tgt)
    mean, per = LOSSES[loss](u * k, u_tgt * k)
    v = v.to(u_tgt)
    term = (u_tgt - v).flatten(1).norm(dim=1) / v.flatten(1).norm(dim=1).clamp_min(1e-12)
    return {"loss": mean, "per_sample": per.detach(), "n_nonfinite": 0, "jvp_term": float(term.max())}


# --------------------------------------------------------------------------------------------
# Samplers


@torch.no_grad()
def sample(u_fn, z_start, steps=1, start=0.0):
    """Alg. 2: uniform tau_i = i / N, z <- z + (tau_{i+1} - tau_i) u(z, tau_i, tau_{i+1}). One network
    call per step; 1 step is z_1 = z_0 + u(z_0, 0, 1). From a later start t0 (z_start is then z_t0)
    the same grid spans [t0, 1]: tau_i = t0 + (1 - t0) i / N, and t0 = 0 is Alg. 2 itself."""
    _check_start(start)
    z, B = z_start, z_start.shape[0]
    tau = [start + (1 - start) * i / steps for i in range(steps + 1)]
    for t, s in zip(tau[:-1], tau[1:]):
        t_, s_ = (torch.full((B,), x, device=z.device, dtype=z.dtype) for x in (t, s))
        z = z + (s_ - t_).view(-1, *[1] * (z.dim() - 1)) * u_fn(z, t_, s_)
    return z


def _check_start(start):
    if not 0 <= start < 1:
        raise ValueError(f"the start time must be in [0, 1) (0: pure noise, Alg. 2), got {start}")


def start_latent(z_lr, eps, start):
    """z_t0 = t0 z_LR + (1 - t0) eps: the path at t0, the LR latent standing in for the HR one. t0 = 0 is
    pure noise (Alg. 2, the most invented detail); a later start keeps more of the LR image."""
    return start * z_lr + (1 - start) * eps


def noise_like(z, generator=None):
    """Gaussian noise like z, drawn on the generator's device (else z's) and moved to z's: CUDA refuses
    a CPU generator for a GPU draw, and a seed gives the same noise on every device."""
    device = z.device if generator is None else generator.device
    return torch.randn(z.shape, generator=generator, device=device, dtype=z.dtype).to(z.device)


def sample_student(net, cond, steps=1, generator=None, start=0.0):
    """The student's N-step super-resolution of cond.z_lr (Alg. 2), from noise or from z_t0 (t0 = start)."""
    z0 = start_latent(cond.z_lr, noise_like(cond.z_lr, generator), start)
    u = average_velocity(net)
    return sample(lambda z, t, s: u(z, t, s, cond), z0, steps, start)


SD35_SHIFT = 3.0   # SD3.5's sigma shift, in training (logit-normal sigma) and sampling (reference/ARCHITECTURE.md §1)
DIT4SR_CFG = 8.0   # DiT4SR's sampler: standard CFG scale 8 (Eq. 11's w = 7), 40 Euler steps


def sd3_sigmas(steps=40, shift=SD35_SHIFT, device=None):
    """SD3.5's inference grid (reference/ARCHITECTURE.md §1): shifted endpoints, linear, shifted again, then 0."""
    sh = lambda x: shift * x / (1 + (shift - 1) * x)
    grid = torch.linspace(sh(1.0), sh(0.001), steps, dtype=torch.float64)
    return torch.cat([sh(grid), torch.zeros(1, dtype=torch.float64)]).to(device)


def uniform_sigmas(steps, device=None):
    """Alg. 2's uniform grid tau_i = i / N as SD3 sigmas 1 - tau_i: the teacher's Euler on the
    student's grid, the fair comparison for the student's 2 and 4 steps."""
    return torch.linspace(1, 0, steps + 1, dtype=torch.float64, device=device)


@torch.no_grad()
def sample_teacher(net, cond, cond_neg, steps=40, cfg=DIT4SR_CFG, shift=SD35_SHIFT, generator=None,
                   grid="shifted", noise=None, start=0.0):
    """The teacher's Euler sampler with CFG on the SD3.5 shifted schedule (DiT4SR's recipe: 40 steps,
    CFG 8, batch order [negative, positive]): v = v_neg + cfg (v_c - v_neg). cond: the image's Cond
    (its z_lr is used); cond_neg: the negative prompt's. grid "uniform": uniform_sigmas. noise: the
    starting eps (default: from `generator`). start t0 > 0: from z_t0, the sigmas scaled into [0, 1 - t0]."""
    _check_start(start)
    z = start_latent(cond.z_lr, noise_like(cond.z_lr, generator) if noise is None else noise, start)
    B = z.shape[0]
    c = cond_neg._replace(z_lr=cond.z_lr).cat(cond)                        # rows [negative ; positive]
    v_fn = velocity(net)
    if grid not in ("shifted", "uniform"):
        raise ValueError(f"grid must be 'shifted' or 'uniform', got {grid!r}")
    sig = (sd3_sigmas(steps, shift, z.device) if grid == "shifted" else uniform_sigmas(steps, z.device)) * (1 - start)
    for i in range(steps):
        t = torch.full((2 * B,), 1 - sig[i].item(), device=z.device, dtype=z.dtype)
        if cfg == 1:        # v_neg + 1 (v_c - v_neg) = v_c: the negative branch is not needed
            v = v_fn(z, t[:B], cond)
        else:
            v_neg, v_c = v_fn(torch.cat([z, z]), t, c).chunk(2)
            v = v_neg + cfg * (v_c - v_neg)
        z = z + (sig[i] - sig[i + 1]).item() * v                                # dt = -(dsigma)
    return z
