"""The transformer's checkpoint files: its two key layouts, SD3.5's single-file names (the ones
model.py's modules use) and diffusers' (also DiT4SR's), how a key and its tensor map from one to
the other (ARCH §2.5, §3.5), and the loader and writer built on them.

    net = load_transformer("sd3.5_medium.safetensors")   # config read from the shapes and keys
    save_transformer(net, "out.safetensors")             # SD3.5 names, config in the metadata
    names, how = to_diffusers_name("joint_blocks.3.x_block.attn.qkv.weight", depth=24)
    # -> ["transformer_blocks.3.attn.to_q.weight", ...to_k..., ...to_v...], "qkv"

    python layouts.py CKPT                 # a checkpoint's model (shapes only, nothing loaded)
    python layouts.py --config dit4sr      # a preset's config and parameter count
"""
import json
import math
import re
from dataclasses import asdict, fields, replace

import torch

from checkpoint import CheckpointError, SafetensorsFiles, atomic_save, check_keys
from model import CONFIGS, MMDiT, MMDiTConfig, add_lora


PREFIX = "model.diffusion_model."
_QKV = lambda a, names: [f"{a}.{n}." for n in names]
_BLOCK_RULES = [  # (original suffix, diffusers suffix, or 3 suffixes that concatenate into qkv)
    ("x_block.adaLN_modulation.1.", "norm1.linear."),
    ("context_block.adaLN_modulation.1.", "norm1_context.linear."),
    ("x_block.attn.qkv.", _QKV("attn", ("to_q", "to_k", "to_v"))),
    ("context_block.attn.qkv.", _QKV("attn", ("add_q_proj", "add_k_proj", "add_v_proj"))),
    ("x_block.attn.ln_q.", "attn.norm_q."), ("x_block.attn.ln_k.", "attn.norm_k."),
    ("context_block.attn.ln_q.", "attn.norm_added_q."), ("context_block.attn.ln_k.", "attn.norm_added_k."),
    ("x_block.attn.proj.", "attn.to_out.0."), ("context_block.attn.proj.", "attn.to_add_out."),
    ("x_block.attn2.qkv.", _QKV("attn2", ("to_q", "to_k", "to_v"))),
    ("x_block.attn2.ln_q.", "attn2.norm_q."), ("x_block.attn2.ln_k.", "attn2.norm_k."),
    ("x_block.attn2.proj.", "attn2.to_out.0."),
    ("x_block.mlp.fc1.", "ff.net.0.proj."), ("x_block.mlp.fc2.", "ff.net.2."),
    ("context_block.mlp.fc1.", "ff_context.net.0.proj."), ("context_block.mlp.fc2.", "ff_context.net.2."),
    ("x_block.mlp.control_conv.", "ff.control_conv."),
] + [(f"x_block.{a}.{n}_control.", f"{a}.to_{n}_control.")
     for a in ("attn", "attn2") for n in ("q", "k", "v", "out")]
_GLOBAL_RULES = [
    ("pos_embed", "pos_embed.pos_embed"),
    ("x_embedder.proj.", "pos_embed.proj."),
    ("t_embedder.mlp.0.", "time_text_embed.timestep_embedder.linear_1."),
    ("t_embedder.mlp.2.", "time_text_embed.timestep_embedder.linear_2."),
    ("s_embedder.mlp.0.", "time_text_embed.s_embedder.linear_1."),   # MFSR student (ours)
    ("s_embedder.mlp.2.", "time_text_embed.s_embedder.linear_2."),
    ("y_embedder.mlp.0.", "time_text_embed.text_embedder.linear_1."),
    ("y_embedder.mlp.2.", "time_text_embed.text_embedder.linear_2."),
    ("context_embedder.", "context_embedder."),
    ("final_layer.adaLN_modulation.1.", "norm_out.linear."),
    ("final_layer.linear.", "proj_out."),
]
# DiT4SR's attn2 was built with text projections it never uses (ARCH §3.5): 130 tensors, dropped.
DIT4SR_UNUSED = re.compile(r"transformer_blocks\.\d+\.attn2\.(add_[qkv]_proj|to_add_out|norm_added_[qk])\.")


def to_diffusers_name(key, depth):
    """Original key -> (diffusers keys, how): how is 'copy', 'qkv' (3 row blocks) or 'swap'
    (halves (shift, scale) <-> (scale, shift): the last context adaLN and the final layer)."""
    m = re.match(r"joint_blocks\.(\d+)\.(.*)", key)
    rules, rest, head = (_BLOCK_RULES, m.group(2), f"transformer_blocks.{m.group(1)}.") if m \
        else (_GLOBAL_RULES, key, "")
    for orig, diff in rules:
        if rest.startswith(orig):
            tail = rest[len(orig):]
            if isinstance(diff, list):
                return [head + d + tail for d in diff], "qkv"
            swap = (key.startswith("final_layer.adaLN") or
                    (m and int(m.group(1)) == depth - 1 and orig.startswith("context_block.adaLN")))
            return [head + diff + tail], "swap" if swap else "copy"
    raise KeyError(f"no diffusers name for {key}")


def swap_halves(t):
    """(shift, scale) rows <-> (scale, shift): diffusers' order for the last adaLN layers."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def to_diffusers_state_dict(sd, depth):
    """An original-layout state dict (no prefix) -> the diffusers layout (qkv split in three)."""
    out = {}
    for key, t in sd.items():
        names, how = to_diffusers_name(key, depth)
        parts = t.chunk(3, dim=0) if how == "qkv" else [swap_halves(t) if how == "swap" else t]
        out.update({n: p.clone() if how == "qkv" else p for n, p in zip(names, parts)})
    return out


SHAPE_KEYS = {  # where each shape-determined setting is read, per layout (ARCH §2.1)
    "original": dict(patch="x_embedder.proj.weight", pos="pos_embed", y="y_embedder.mlp.0.weight",
                     block=r"joint_blocks\.(\d+)\.", dual=r"joint_blocks\.(\d+)\.x_block\.attn2\.",
                     qk="joint_blocks.0.x_block.attn.ln_q.weight", s="s_embedder."),
    "diffusers": dict(patch="pos_embed.proj.weight", pos="pos_embed.pos_embed",
                      y="time_text_embed.text_embedder.linear_1.weight",
                      block=r"transformer_blocks\.(\d+)\.", dual=r"transformer_blocks\.(\d+)\.attn2\.to_q",
                      qk="transformer_blocks.0.attn.norm_q.weight", s="time_text_embed.s_embedder."),
}


# --------------------------------------------------------------------------------------------
# Loading and saving


class _Source(SafetensorsFiles):
    """A transformer checkpoint: SD3.5 single file (its `model.diffusion_model.*` part), a
    diffusers folder (`transformer/`), a file; `layout` is "original" or "diffusers"."""

    def __init__(self, path):
        super().__init__(path, subfolder="transformer", prefix=PREFIX)
        if self.prefix or any(k.startswith("joint_blocks.") for k in self.where):
            self.layout = "original"
        elif any(k.startswith("transformer_blocks.") for k in self.where):
            self.layout = "diffusers"
        else:
            some = ", ".join(self.all_keys[:3])
            raise CheckpointError(f"{path}: no SD3/MMDiT transformer keys found "
                                  f"(neither 'joint_blocks.*' nor 'transformer_blocks.*'; "
                                  f"the file starts with: {some or 'nothing'})")


def _infer_config(src: _Source) -> MMDiTConfig:
    n, keys = SHAPE_KEYS[src.layout], list(src.where)
    try:
        hidden, in_ch, patch, _ = src.shape(n["patch"])
        pos_rows, ctx_dim, pooled = src.shape(n["pos"])[1], src.shape("context_embedder.weight")[1], \
            src.shape(n["y"])[1]
    except KeyError as e:
        raise CheckpointError(f"{src.path}: missing {e} needed to read the model size") from None
    blocks = lambda pat: sorted({int(m.group(1)) for k in keys if (m := re.match(pat, k))})
    qk = n["qk"] in src.where
    head_dim = src.shape(n["qk"])[0] if qk else 64
    return MMDiTConfig(
        depth=len(blocks(n["block"])), heads=hidden // head_dim, head_dim=head_dim, patch=patch,
        in_channels=in_ch, pos_grid=math.isqrt(pos_rows), context_dim=ctx_dim, pooled_dim=pooled,
        dual_layers=tuple(blocks(n["dual"])), qk_norm=qk, lr_stream=any("control" in k for k in keys),
        two_times=any(k.startswith(n["s"]) for k in keys))


# config fields a file's shapes cannot tell, read from its metadata when save_transformer wrote them
RECORDED = ("lr_key_mode", "ff_inject", "time_scale", "prediction")


def load_transformer(path, *, dtype=torch.float32, device="cpu", **overrides) -> MMDiT:
    """Load any supported transformer checkpoint; the config is read from its shapes and keys.

    path: an SD3.5 single file (`model.diffusion_model.*`; VAE and text encoders beside it are
    ignored), a diffusers transformer (.safetensors, or a folder, sharded or not, or its parent
    with `transformer/`), a DiT4SR transformer (diffusers layout with `*control*` keys), or a file
    written by `save_transformer`. overrides: config fields a file cannot tell, e.g.
    lr_key_mode="r1" or time_scale=1.0. Tensors are cast to `dtype` (files mix fp16 and fp32).
    """
    src = _Source(path)
    known = {f.name for f in fields(MMDiTConfig)}
    if set(overrides) - known:
        raise TypeError(f"unknown config overrides {sorted(set(overrides) - known)}; known: {sorted(known)}")
    saved = src.config("mfsr_config")
    told = {k: saved[k] for k in RECORDED if k in saved}
    cfg = replace(_infer_config(src), **{**told, **overrides})
    lora = json.loads(src.metadata.get("lora", "null"))
    sampling = json.loads(src.metadata.get("mfsr_sampling", "{}"))
    with torch.device("meta"):
        net = MMDiT(cfg)
        if lora:
            add_lora(net, lora["rank"], lora["alpha"], lora["targets"])
    expected = net.state_dict()
    if src.layout == "diffusers":
        if lora:
            raise CheckpointError(f"{path}: LoRA weights are only stored in the original layout")
        want = {k: v.shape for k, v in to_diffusers_state_dict(expected, cfg.depth).items()}
        found = {k: src.shape(k) for k in src.where if not DIT4SR_UNUSED.match(k)}
    else:
        want = {k: v.shape for k, v in expected.items()}
        found = {k: src.shape(k) for k in src.where}
    check_keys(path, want, found, f"the {src.layout}-layout model read from it ({cfg})")
    sd = {}
    for key in expected:
        if src.layout == "diffusers":
            names, how = to_diffusers_name(key, cfg.depth)
            parts = [src.get(k_).to(dtype) for k_ in names]
            t = torch.cat(parts) if how == "qkv" else (swap_halves(parts[0]) if how == "swap" else parts[0])
        else:
            t = src.get(key).to(dtype)
        sd[key] = t
    net.load_state_dict(sd, assign=True)
    net.sampling = sampling   # e.g. {"tile": 32, "tile_overlap": 12, "cfg": 1.25}: see sample.py
    return net.to(device)


def save_transformer(net: MMDiT, path, layout="original"):
    """Write a safetensors file: "original" = SD3.5 single-file names (`model.diffusion_model.*`,
    loadable by SD3.5 tools when the model has no added parts), "diffusers" = diffusers/DiT4SR
    names. The config, LoRA settings and `net.sampling` (if set) go into the metadata; the write
    is atomic."""
    sd = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    lora = getattr(net, "lora", None)
    if layout == "original":
        sd = {PREFIX + k: v for k, v in sd.items()}
    elif layout == "diffusers":
        if lora:
            raise ValueError("merge_lora(net) before a diffusers-layout export")
        sd = to_diffusers_state_dict(sd, net.cfg.depth)
    else:
        raise ValueError(f"layout must be 'original' or 'diffusers', got {layout!r}")
    meta = {"format": "mfsr-mmdit", "layout": layout, "mfsr_config": json.dumps(asdict(net.cfg)),
            "lora": json.dumps(lora)}
    if getattr(net, "sampling", None):   # the sampler settings it was trained for (sample.py defaults)
        meta["mfsr_sampling"] = json.dumps(net.sampling)
    atomic_save(sd, path, meta)


def describe(path=None, config="tiny"):
    """What `python layouts.py` prints: a checkpoint's inferred config (shapes only, nothing loaded)
    or a preset's, its parameter count, and for small models one forward and one JVP."""
    if path:
        src = _Source(path)
        saved = src.config("mfsr_config")
        cfg = replace(_infer_config(src), **{k: saved[k] for k in RECORDED
                                             if k in saved})
        print(f"{path}: {src.layout} layout, {len(src.where)} transformer tensors")
    else:
        cfg = CONFIGS[config]
    with torch.device("meta"):
        n = sum(p.numel() for p in MMDiT(cfg).parameters())
    print(f"{cfg}\nparameters (pos_embed buffer excluded): {n:,}")
    if path or n > 50_000_000:
        return
    torch.manual_seed(0)
    net = MMDiT(replace(cfg, two_times=True, time_scale=1.0)).eval()
    B, H, W = 1, 16, 24
    x = torch.randn(B, cfg.in_channels, H, W)
    kw = dict(pooled=torch.randn(B, cfg.pooled_dim), context=torch.randn(B, 8, cfg.context_dim),
              lr=torch.randn_like(x) if cfg.lr_stream else None, sigma_s=torch.ones(B))
    with torch.no_grad():
        out, dout = torch.func.jvp(lambda z, s: net(z, s, **kw), (x, torch.full((B,), 0.5)),
                                   (torch.randn_like(x), torch.ones(B)))
    print(f"forward + JVP on a {H}x{W} latent: output {tuple(out.shape)}, |u| {out.norm():.3f}, "
          f"|du| {dout.norm():.3f} (custom JVP attention)")


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description="Inspect a transformer checkpoint or a preset config.")
    ap.add_argument("ckpt", nargs="?", help="a .safetensors file or a diffusers folder")
    ap.add_argument("--config", default="tiny", choices=sorted(CONFIGS))
    a = ap.parse_args()
    try:
        describe(a.ckpt, a.config)
    except CheckpointError as e:
        raise SystemExit(f"error: {e}")
