"""Flows small enough to know exactly, shared by test_mfsr.py and the walkthrough (docs/walkthrough.py).

    linear_flow_u(z, t, s)         the average velocity of dz/dt = A z in closed form (2-D)
    identity_error(bug=None)       Eq. 8 on that flow through mfsr.meanflow_target, a bug planted or not
    gmm_velocity(z, t, c)          the exact velocity of a 2-D Gaussian mixture, per class c
    guided(z, t, c, w)             Eq. 11 on it: the other class as the negative prompt
    toy_student(kind, w, ...)      an MLP distilled from it by mfsr.mfd_loss (Alg. 1 at toy size)
    two_time_net(time_scale, ...)  a random tiny two-time MMDiT (the student's shape), for §4.4

Everything here calls mfsr.py for the method; what is defined here is only the toy world.
The convention is mfsr.py's: t = 0 noise, t = 1 data, s >= t.
"""
from contextlib import contextmanager
from dataclasses import replace

import torch

import mfsr
from model import CONFIGS, MMDiT

# --------------------------------------------------------------------------------------------
# A closed-form flow: dz/dt = A z, a damped rotation in the plane

A = torch.tensor([[-0.5, 1.0], [-1.2, -0.3]], dtype=torch.float64)


def linear_flow_v(z):
    """The instantaneous velocity v(z) = A z (the same at every t). z (B, 2)."""
    return z @ A.T


def linear_flow_u(z, t, s):
    """Average velocity of dz/dt = A z exactly: u = A phi((s - t) A) z, phi(X) = sum X^k/(k+1)!
    (smooth at s = t, where it equals v = A z). z (B, 2), t and s (B,)."""
    hA = (s - t)[:, None, None] * A                                              # (B, 2, 2)
    term = torch.eye(2, dtype=z.dtype).expand_as(hA)
    phi = term
    for k in range(1, 30):
        term = term @ hA / (k + 1)
        phi = phi + term
    return torch.einsum("ij,bjk,bk->bi", A, phi, z)


def linear_flow_map(z, t, s):
    """Where the path through z at time t is at time s: exp((s - t) A) z. z (B, 2), t and s (B,)."""
    return torch.einsum("bij,bj->bi", torch.linalg.matrix_exp((s - t)[:, None, None] * A), z)


PLANTED_BUGS = ("t tangent", "z tangent", "sign")


@contextmanager
def planted_bug(bug):
    """mfsr.jvp with one mistake while inside: "t tangent" drops dt/dt = 1 (tangents (v, 0, 0)),
    "z tangent" drops dz/dt = v (tangents (0, 1, 0)), "sign" flips du/dt. None: no bug."""
    if bug not in (None,) + PLANTED_BUGS:
        raise ValueError(f"bug must be None or one of {PLANTED_BUGS}, got {bug!r}")
    real = mfsr.jvp

    def buggy(f, primals, tangents):
        tz, tt, ts = tangents
        if bug == "t tangent":
            tangents = (tz, torch.zeros_like(tt), ts)
        if bug == "z tangent":
            tangents = (torch.zeros_like(tz), tt, ts)
        out, tan = real(f, primals, tangents)
        return out, -tan if bug == "sign" else tan
    mfsr.jvp = buggy if bug else real
    try:
        yield
    finally:
        mfsr.jvp = real


def identity_error(bug=None, u_fn=linear_flow_u):
    """max over 256 rows of |u_tgt - u| / |u|, where u_tgt = v + (s - t) du/dt is mfsr.meanflow_target's
    target and u the exact average velocity: 0 up to rounding when Eq. 8 is implemented right."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(256, 2, generator=g, dtype=torch.float64)
    t, s = mfsr.sample_times(256, ratio=0.75, generator=g)
    t, s = 0.9 * t.double(), s.double()                                        # 1 - t above the x clamp
    with planted_bug(bug):
        u, u_tgt = mfsr.meanflow_target(u_fn, z, t, s, linear_flow_v(z))
    assert torch.allclose(u, linear_flow_u(z, t, s), rtol=1e-12, atol=1e-12)
    return ((u_tgt - u).norm(dim=1) / u.norm(dim=1)).max().item()


def mlp_u(seed=0, width=32, dtype=torch.float64):
    """(net, u_fn): a random MLP u(z, t, s) on 2-D z, for derivative checks."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(4, width), torch.nn.SiLU(), torch.nn.Linear(width, width),
                              torch.nn.SiLU(), torch.nn.Linear(width, 2)).to(dtype)
    return net, lambda z, t, s: net(torch.cat([z, t[:, None], s[:, None]], 1))


# --------------------------------------------------------------------------------------------
# A 2-D Gaussian mixture with two classes, its exact velocity, and a guided teacher on it

MU = torch.tensor([[1.5, 1.5], [1.5, -1.5], [-1.5, 1.5], [-1.5, -1.5]], dtype=torch.float64)
SIG, CLASS = 0.25, torch.tensor([0, 0, 1, 1])   # class 0 = right modes, class 1 = left modes


def gmm_data(c, generator):
    """Samples x of class c (B,): a random mode of the class plus N(0, SIG^2 I)."""
    B = c.shape[0]
    return MU[2 * c + torch.randint(0, 2, (B,), generator=generator)] + SIG * torch.randn(
        B, 2, generator=generator, dtype=torch.float64)


def gmm_velocity(z, t, c):
    """Exact marginal velocity of z_t = t x + (1 - t) eps, eps ~ N(0, I), x ~ the modes of class
    c (B,): a posterior-weighted mix of per-mode Gaussian velocities."""
    t = t[:, None]
    st2 = t ** 2 * SIG ** 2 + (1 - t) ** 2                                    # (B, 1)
    diff = z[:, None, :] - t[:, :, None] * MU[None]                          # (B, K, 2)
    logp = (-(diff ** 2).sum(-1) / (2 * st2) - torch.log(st2)).masked_fill(CLASS[None] != c[:, None], -torch.inf)
    vk = MU[None] + ((t * SIG ** 2 - (1 - t)) / st2)[:, :, None] * diff     # (B, K, 2)
    return (torch.softmax(logp, 1)[:, :, None] * vk).sum(1)


def guided(z, t, c, w):
    """Eq. (11) with the other class as the negative prompt: v_c + w (v_c - v_neg)."""
    return mfsr.teacher_velocity("neg", z, t, teacher=lambda zz, tt, cc: gmm_velocity(zz, tt, cc.z_lr),
                                 cond=mfsr.Cond(c, None, None), cond_neg=mfsr.Cond(1 - c, None, None), w=w)


def guided_euler(z0, c, w, steps):
    """The guided teacher's Euler sampler on the uniform grid, from z0 (t = 0) to t = 1."""
    z = z0
    for i in range(steps):
        z = z + guided(z, torch.full((z.shape[0],), i / steps, dtype=z.dtype), c, w) / steps
    return z


def toy_student(kind, w, steps=1500, batch=256, on_step=None):
    """An MLP u(z, t, s, class) distilled by mfsr.mfd_loss from the guided teacher ("neg") or the
    data path ("gt"), Adam, fixed seeds, one thread. on_step(i, loss, u), if given, after each step.
    Returns u(z, t, s, cond) with the class as cond.z_lr."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # 256 x 128 matmuls: threads only add overhead
    try:
        return _toy_train(kind, w, steps, batch, on_step)
    finally:
        torch.set_num_threads(threads)


def _toy_train(kind, w, steps, batch, on_step):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 128), torch.nn.SiLU(), torch.nn.Linear(128, 128), torch.nn.SiLU(),
                              torch.nn.Linear(128, 128), torch.nn.SiLU(), torch.nn.Linear(128, 2)).double()
    u = lambda z, t, s, cond: net(torch.cat([z, t[:, None], s[:, None],                            # noqa: E731
                                             torch.nn.functional.one_hot(cond.z_lr, 2).double()], 1))  # the class as z_lr
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    for i in range(steps):
        c = torch.randint(0, 2, (batch,), generator=g)
        x = gmm_data(c, g)
        eps = torch.randn(batch, 2, generator=g, dtype=torch.float64)
        t, s = (a.double() for a in mfsr.sample_times(batch, 0.5, g))
        z = t[:, None] * x + (1 - t[:, None]) * eps
        v = mfsr.teacher_velocity("gt", z, t, z_hr=x, eps=eps) if kind == "gt" else guided(z, t, c, w)
        opt.zero_grad()
        loss = mfsr.mfd_loss(u, z, t, s, v, cond=mfsr.Cond(c, None, None))["loss"]
        loss.backward()
        opt.step()
        if on_step:
            on_step(i, loss.item(), u)
    return u


def sw2(a, b, n_proj=256):
    """Sliced 2-Wasserstein distance between two equal-size 2-D sample sets."""
    th = torch.linspace(0, torch.pi, n_proj + 1, dtype=torch.float64)[:-1]
    d = torch.stack([th.cos(), th.sin()], 1)
    return ((a @ d.T).sort(0).values - (b @ d.T).sort(0).values).pow(2).mean().sqrt().item()


def eval_noise(n=4000, seed=123):
    """(z0, c): the evaluation's fixed noise and classes (alternating)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, generator=g, dtype=torch.float64), torch.arange(n) % 2


def toy_eval(w, students, n=4000):
    """Sliced W2 to the guided teacher's 100-step samples from the same noise: the teacher's 1 and 4
    Euler steps, and each student's 1 and 2 steps (mfsr.sample). {"name steps": distance}."""
    z0, c = eval_noise(n)
    ref = guided_euler(z0, c, w, 100)
    out = {"teacher 1": sw2(guided_euler(z0, c, w, 1), ref), "teacher 4": sw2(guided_euler(z0, c, w, 4), ref)}
    with torch.no_grad():
        for name, u in students.items():
            for k in (1, 2):
                out[f"{name} {k}"] = sw2(mfsr.sample(lambda z, t, s: u(z, t, s, mfsr.Cond(c, None, None)), z0, k), ref)
    return out


# --------------------------------------------------------------------------------------------
# A random tiny student network (model.py's, two time inputs)


def randomize(net, std=0.05, seed=0):
    """Every parameter of net plus N(0, std^2) noise (seeded), in place: a random but generic network
    (zero-initialised layers, as the s-embedder's last, become non-zero). Returns net."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return net


def two_time_net(time_scale, time_cutoff=0.0):
    """A random tiny student in fp32 (the precision training runs in), LR stream, given time scale."""
    torch.manual_seed(0)
    net = MMDiT(replace(CONFIGS["tiny"], two_times=True, time_scale=time_scale, time_cutoff=time_cutoff))
    return randomize(net).eval()
