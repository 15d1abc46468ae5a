"""Tests of experiments/gpu_memory.py, the meta-device memory count behind `bench.py budget`: each
against a figure worked out by hand."""

import pytest
import torch
import torch.nn.functional as F

import gpu_memory
from gpu_memory import GPUAutocast, LiveBytes, MetaValues

MB = 2 ** 20


def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")


def test_live_bytes_of_a_matmul_chain_peak_as_counted_by_hand():
    x, w1, w2 = _meta(256, 512), _meta(512, 1024), _meta(1024, 128)     # 0.5, 2, 0.5 MB in fp32
    tracker = LiveBytes()
    tracker.adopt([x, w1, w2, w1.t()])                # a view of an adopted tensor adds nothing
    assert tracker.live == 3 * MB
    with tracker:
        h = x @ w1                                    # (256, 1024): 1 MB
        h.mul_(2)                                     # in place: its own storage
        ht = h.t()                                    # a view
        tracker.set_phase("second")
        y = ht.t() @ w2                               # (256, 128): 0.125 MB, h still alive
        del h, ht                                     # h freed here
        z = y.sum()                                   # 4 bytes
    assert tracker.phase_peaks["weights"] == 3 * MB + 1 * MB
    assert tracker.peak == 3 * MB + 1 * MB + MB // 8 + 0 and tracker.peak_phase == "second"
    assert tracker.live == 3 * MB + MB // 8 + 4
    del y, z
    assert tracker.live == 3 * MB


def test_attention_is_flash_attentions_with_its_backward_scratch():
    B, H, N, d = 2, 3, 1000, 64
    q, k, v = (_meta(B, H, N, d, dtype=torch.bfloat16).requires_grad_() for _ in range(3))
    tracker, autocast = LiveBytes(), GPUAutocast()
    autocast.enabled = True
    with autocast, tracker:
        o = F.scaled_dot_product_attention(q, k, v)
        # output (bf16) and its log-sum-exp (fp32), and 24 bytes of random-number state: no (N, N) scores
        assert tracker.live == B * H * N * d * 2 + B * H * N * 4 + 24
        tracker.set_phase("backward")
        gpu_memory.backward(o.float().sum())
    rows = 1024                                         # N padded to 128, d = 64 already a multiple of 32
    scratch = 4 * B * H * rows * (d + 1)
    assert gpu_memory.flash_backward_scratch(q) == scratch
    grads = 3 * B * H * N * d * 2
    # the peak of backward: o's fp32 copy's gradient, o's, lse, dq dk dv and the scratch
    assert tracker.phase_peaks["backward"] >= grads + scratch
    assert tracker.phase_peaks["backward"] < grads + scratch + 4 * B * H * N * d * 4


def test_autocast_rules_as_on_a_gpu_and_one_cached_copy_per_trained_weight():
    w = torch.nn.Parameter(_meta(512, 512))                # a trained fp32 weight: 1 MB
    x = _meta(4, 512)
    tracker, autocast = LiveBytes(), GPUAutocast()
    autocast.enabled = True
    with autocast, tracker:
        y = F.linear(x, w)
        y2 = F.linear(x, w)
        assert y.dtype == y2.dtype == torch.bfloat16
        assert F.layer_norm(y, (512,)).dtype == torch.float32            # autocast's fp32 list
        assert torch.softmax(y, -1).dtype == y.sum().dtype == torch.float32   # fp32 output
        assert torch.addcmul(y, y, x).dtype == torch.float32             # promoted to the widest
        assert (y + x).dtype == torch.float32                            # plain type promotion
        # w's bf16 copy made once (0.5 MB) and x's twice; the outputs 4 KB each
        assert tracker.live == MB // 2 + 2 * (4 * 512 * 2) + 2 * (4 * 512 * 2)
        autocast.end_region()                           # the cache goes; y and y2's graphs keep the copy
        del y, y2
        assert tracker.live == 0
    autocast.enabled = False
    with autocast:
        assert F.linear(x, w).dtype == torch.float32


def test_meta_values_give_the_row_count_of_a_cpu_draw():
    g = torch.Generator().manual_seed(0)
    t = torch.rand(10, generator=g)
    s = torch.where(torch.arange(10) < 4, t + 0.5, t)    # 4 rows with s != t
    z = _meta(10, 16)
    with MetaValues():
        tm, sm = t.to(z), s.to(z)
        neq = (sm != tm).nonzero().squeeze(1)
        assert neq.is_meta and neq.shape == (4,) and z[neq].shape == (4, 16)
        assert (sm - tm)[neq].sum().item() == pytest.approx(2.0)
        assert tm.device.type == "meta"
        assert float(z.sum()) == 0.0                      # a value no shape depends on: a stand-in


@pytest.mark.slow
def test_distill_step_of_the_tiny_model_counts_every_part():
    import model
    import vae
    argv = ["--data", "unused", "--preset", "tiny", "--batch", "4", "--grad-ckpt"]
    r = gpu_memory.distill_step(model.CONFIGS["tiny"], 4, latent=8, tokens=5, argv=argv, vae_cfg=vae.CONFIGS["tiny"],
                                lora_rank=4)
    held, trained = sum(r["resident"].values()), r["resident"]["trained weights (fp32)"]
    assert r["resident"]["Adam state (fp32 m, v)"] == 2 * trained
    assert r["resident"]["gradients (fp32), the earlier step's"] == trained
    assert r["phase_peaks"]["weights"] == held
    assert set(r["phase_peaks"]) >= {"VAE encode", "teacher CFG", "JVP", "student forward", "backward", "optimizer"}
    assert r["peak"] == max(r["phase_peaks"].values()) > held
    # Adam's step: what was held, with new gradients for the old ones (freed before the loss) and its
    # foreach temporaries (a list of fp32 tensors the size of the trained weights), but without the
    # images (encoded, then freed) and little else of the step
    images = 4 * 3 * 64 * 64 * 4 + 4 * 3 * 16 * 16 * 4
    assert held + trained - images <= r["phase_peaks"]["optimizer"] <= held + trained
