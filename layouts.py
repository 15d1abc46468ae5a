"""The transformer's two checkpoint layouts: SD3.5's single-file names (the ones model.py's modules
use) and diffusers' (also DiT4SR's), and how a key and its tensor map from one to the other
(ARCH §2.5, §3.5). Pure name rules: nothing here builds a model.

    names, how = to_diffusers_name("joint_blocks.3.x_block.attn.qkv.weight", depth=24)
    # -> ["transformer_blocks.3.attn.to_q.weight", ...to_k..., ...to_v...], "qkv"
"""
import re

import torch


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
