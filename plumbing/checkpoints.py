"""Checkpoint files: what model.py and vae.py load from and save to (plumbing; the method does not need it).

    net = load_transformer("sd3.5_medium.safetensors")       # or a diffusers / DiT4SR folder, or our file
    vae = load_vae("sd3.5_medium.safetensors")               # its first_stage_model.* part
    save_transformer(net, "out.safetensors")                 # SD3.5 names, config in the metadata

Only safetensors are read (pickled files can run code), memory-mapped into a module built on the meta
device. The key names map as in reference/ARCHITECTURE.md §2.5, §3.5 and §4.3 (VAE).
"""
import contextlib
import json
import math
import os
import re
from dataclasses import asdict, fields, replace

import torch
from safetensors import safe_open

from mfsr import Cond
from model import MMDiT, MMDiTConfig, add_lora
from vae import VAE, VAEConfig

# --------------------------------------------------------------------------------------------
# Safetensors files


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: the message names the file and what is wrong."""


class SafetensorsFiles:
    """The tensors of a .safetensors file, a sharded index, or a folder (or its `subfolder`): names, shapes,
    reads. `prefix`: when some keys have it, only those, without it (SD3.5's `model.diffusion_model.*`)."""

    def __init__(self, path, subfolder=None, prefix=None):
        self.path = path
        where, self.metadata = {}, {}
        for f in self._resolve(path, subfolder):
            try:
                h = safe_open(f, framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own error types for corrupt files
                raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from None
            self.metadata.update(h.metadata() or {})
            where.update({k: h for k in h.keys()})
        self.prefix = prefix if prefix and any(k.startswith(prefix) for k in where) else ""
        # name -> (its file, its key there): the key without the prefix, or as a loader renames it
        self.where = {k[len(self.prefix):]: (h, k) for k, h in where.items() if k.startswith(self.prefix)}
        self.all_keys = list(where)

    @staticmethod
    def _resolve(path, subfolder):
        if not os.path.exists(path):
            raise CheckpointError(f"{path}: no such file or folder")
        if os.path.isdir(path):
            if subfolder and os.path.isdir(os.path.join(path, subfolder)):
                return SafetensorsFiles._resolve(os.path.join(path, subfolder), None)
            index = sorted(f for f in os.listdir(path) if f.endswith(".safetensors.index.json"))
            st = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
            if not index and len(st) != 1:
                raise CheckpointError(f"{path}: expected one .safetensors file or an index json, found {st or 'none'}")
            return SafetensorsFiles._resolve(os.path.join(path, (index or st)[0]), None)
        if path.endswith(".index.json"):
            try:
                with open(path) as f:
                    shards = sorted(set(json.load(f)["weight_map"].values()))
            except (ValueError, KeyError) as e:
                raise CheckpointError(f"{path}: not a safetensors index ({e})") from None
            return [os.path.join(os.path.dirname(path), s) for s in shards]
        if not path.endswith(".safetensors"):
            raise CheckpointError(f"{path}: only .safetensors checkpoints are read (pickled .pt/.ckpt/"
                                  f".bin files can run code when loaded); convert it first")
        return [path]

    def __contains__(self, key):
        return key in self.where

    def keys(self):
        return list(self.where)

    def shape(self, key):
        h, k = self.where[key]
        return tuple(h.get_slice(k).get_shape())

    def get(self, key):
        h, k = self.where[key]
        return h.get_tensor(k)

    def config(self, name):
        """A JSON config stored in the metadata by this project's `save_*` functions, or {}."""
        return json.loads(self.metadata.get(name, "{}"))


def check_keys(path, expected, found, what):
    """expected/found: {key: shape}. Raise a CheckpointError that lists what differs."""
    wrong = {"missing": [k for k in expected if k not in found],
             "unexpected": [k for k in found if k not in expected],
             "misshapen": [f"{k}: file {tuple(found[k])} vs model {tuple(expected[k])}"
                           for k in expected if k in found and tuple(found[k]) != tuple(expected[k])]}
    if any(wrong.values()):
        lines = [f"{path}: checkpoint does not match {what}"]
        for label, items in wrong.items():
            more = f" ... and {len(items) - 8} more" if len(items) > 8 else ""
            lines += [f"  {label} ({len(items)}): " + ", ".join(items[:8]) + more] if items else []
        raise CheckpointError("\n".join(lines))


_DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                torch.bool: "BOOL"}


class Later:
    """A tensor atomic_save makes only as it writes it: a merged export needs no second copy of the model."""

    def __init__(self, shape, dtype, make):
        self.shape, self.dtype, self.make = tuple(shape), dtype, make


@contextlib.contextmanager
def atomic_open(path, mode="wb"):
    """A file written at a temporary name beside `path`, renamed to it when whole: never half-written."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            yield f
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_save(tensors, path, metadata):
    """`tensors` (name -> tensor or Later) as a safetensors file, atomically: the header's size (8 bytes,
    little-endian), the JSON header, then the tensors' bytes in its order, each made and written in turn."""
    header, offset = {"__metadata__": dict(metadata)} if metadata else {}, 0
    for name, t in tensors.items():
        size = math.prod(t.shape) * t.dtype.itemsize
        header[name] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)                         # the tensors start 8-byte aligned
    with atomic_open(path) as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for name, t in tensors.items():
            t = t.make() if isinstance(t, Later) else t
            if tuple(t.shape) != tuple(header[name]["shape"]) or _DTYPE_NAMES[t.dtype] != header[name]["dtype"]:
                raise ValueError(f"{path}: {name} was announced as {header[name]['dtype']} "
                                 f"{header[name]['shape']}, made as {t.dtype} {list(t.shape)}")
            f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)


# --------------------------------------------------------------------------------------------
# The transformer's key layouts, its loader and writer


PREFIX = "model.diffusion_model."
_QKV = lambda a, names: [f"{a}.{n}." for n in names]
_BLOCK_RULES = [  # (original suffix, diffusers suffix, or 3 suffixes that concatenate into qkv)
    ("x_block.adaLN_modulation.1.", "norm1.linear."), ("context_block.adaLN_modulation.1.", "norm1_context.linear."),
    ("x_block.attn.qkv.", _QKV("attn", ("to_q", "to_k", "to_v"))),
    ("context_block.attn.qkv.", _QKV("attn", ("add_q_proj", "add_k_proj", "add_v_proj"))),
    ("x_block.attn.ln_q.", "attn.norm_q."), ("x_block.attn.ln_k.", "attn.norm_k."),
    ("context_block.attn.ln_q.", "attn.norm_added_q."), ("context_block.attn.ln_k.", "attn.norm_added_k."),
    ("x_block.attn.proj.", "attn.to_out.0."), ("context_block.attn.proj.", "attn.to_add_out."),
    ("x_block.attn2.qkv.", _QKV("attn2", ("to_q", "to_k", "to_v"))), ("x_block.attn2.proj.", "attn2.to_out.0."),
    ("x_block.attn2.ln_q.", "attn2.norm_q."), ("x_block.attn2.ln_k.", "attn2.norm_k."),
    ("x_block.mlp.fc1.", "ff.net.0.proj."), ("x_block.mlp.fc2.", "ff.net.2."),
    ("context_block.mlp.fc1.", "ff_context.net.0.proj."), ("context_block.mlp.fc2.", "ff_context.net.2."),
    ("x_block.mlp.control_conv.", "ff.control_conv."),
] + [(f"x_block.{a}.{n}_control.", f"{a}.to_{n}_control.")
     for a in ("attn", "attn2") for n in ("q", "k", "v", "out")]
_GLOBAL_RULES = [
    ("pos_embed", "pos_embed.pos_embed"), ("x_embedder.proj.", "pos_embed.proj."),
    ("context_embedder.", "context_embedder."),
    ("final_layer.adaLN_modulation.1.", "norm_out.linear."), ("final_layer.linear.", "proj_out."),
] + [(f"{a}_embedder.mlp.{i}.", f"time_text_embed.{b}_embedder.linear_{i // 2 + 1}.")   # s: MFSR's student (ours)
     for a, b in (("t", "timestep"), ("s", "s"), ("y", "text")) for i in (0, 2)]
# DiT4SR's attn2 was built with text projections it never uses (ARCH §3.5): 130 tensors, dropped.
DIT4SR_UNUSED = re.compile(r"transformer_blocks\.\d+\.attn2\.(add_[qkv]_proj|to_add_out|norm_added_[qk])\.")
swap_halves = lambda t: torch.cat(t.chunk(2)[::-1])   # noqa: E731 (shift, scale) rows <-> (scale, shift)


def to_diffusers_name(key, depth):
    """Original key -> (diffusers keys, how): how is 'copy', 'qkv' (3 row blocks) or 'swap' (halves
    (shift, scale) <-> (scale, shift), diffusers' order for the last context adaLN and the final layer)."""
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


def to_diffusers_state_dict(sd, depth):
    """An original-layout state dict (no prefix) -> the diffusers layout (qkv split in three)."""
    out = {}
    for key, t in sd.items():
        names, how = to_diffusers_name(key, depth)
        parts = t.chunk(3, dim=0) if how == "qkv" else [swap_halves(t) if how == "swap" else t]
        out.update({n: p.clone() if how == "qkv" else p for n, p in zip(names, parts)})
    return out


def _infer_config(src) -> MMDiTConfig:
    """The config a file's shapes and keys tell (ARCH §2.1); keys are asked for by original-layout names."""
    name = (lambda k: k) if src.layout == "original" else (lambda k: to_diffusers_name(k, 0)[0][0])
    shape = lambda k: src.shape(name(k))
    try:
        hidden, in_ch, patch, _ = shape("x_embedder.proj.weight")
        pos_rows, ctx_dim = shape("pos_embed")[1], shape("context_embedder.weight")[1]
        pooled = shape("y_embedder.mlp.0.weight")[1]
    except KeyError as e:
        raise CheckpointError(f"{src.path}: missing {e} needed to read the model size") from None
    block = r"joint_blocks\.(\d+)\." if src.layout == "original" else r"transformer_blocks\.(\d+)\."
    blocks = sorted({int(m.group(1)) for k in src.where if (m := re.match(block, k))})
    has = lambda k: name(k) in src.where
    qk = has("joint_blocks.0.x_block.attn.ln_q.weight")
    head_dim = shape("joint_blocks.0.x_block.attn.ln_q.weight")[0] if qk else 64
    return MMDiTConfig(
        depth=len(blocks), heads=hidden // head_dim, head_dim=head_dim, patch=patch, in_channels=in_ch,
        pos_grid=math.isqrt(pos_rows), context_dim=ctx_dim, pooled_dim=pooled, qk_norm=qk,
        dual_layers=tuple(i for i in blocks if has(f"joint_blocks.{i}.x_block.attn2.qkv.weight")),
        lr_stream=any("control" in k for k in src.where), two_times=has("s_embedder.mlp.0.weight"))


def transformer_config(path, **overrides):
    """(config, source) of a transformer file without reading a weight; source.layout: original / diffusers."""
    src = SafetensorsFiles(path, subfolder="transformer", prefix=PREFIX)
    if src.prefix or any(k.startswith("joint_blocks.") for k in src.where):
        src.layout = "original"
    elif any(k.startswith("transformer_blocks.") for k in src.where):
        src.layout = "diffusers"
    else:
        some = ", ".join(src.all_keys[:3]) or "nothing"
        raise CheckpointError(f"{path}: no SD3/MMDiT transformer keys found (neither 'joint_blocks.*' nor "
                              f"'transformer_blocks.*'; the file starts with: {some})")
    known = {f.name for f in fields(MMDiTConfig)}
    if set(overrides) - known:
        raise TypeError(f"unknown config overrides {sorted(set(overrides) - known)}; known: {sorted(known)}")
    saved = src.config("mfsr_config")
    told = {k: saved[k] for k in ("lr_key_mode", "ff_inject", "time_scale", "time_cutoff", "prediction") if k in saved}
    return replace(_infer_config(src), **{**told, **overrides}), src


def load_transformer(path, *, dtype=torch.float32, device="cpu", **overrides) -> MMDiT:
    """An SD3.5 single file, a diffusers transformer (file, folder, sharded, or its parent), DiT4SR's, or our
    file, the config read from its shapes and keys. overrides: what a file cannot tell, e.g. lr_key_mode."""
    cfg, src = transformer_config(path, **overrides)
    lora = src.config("lora")       # None or {} without LoRA
    with torch.device("meta"):
        net = MMDiT(cfg)
        if lora:
            add_lora(net, lora["rank"], lora["alpha"], lora["targets"])
    expected = net.state_dict()
    want = {k: v.shape for k, v in expected.items()}
    found = {k: src.shape(k) for k in src.where}
    if src.layout == "diffusers":
        if lora:
            raise CheckpointError(f"{path}: LoRA weights are only stored in the original layout")
        want = {k: v.shape for k, v in to_diffusers_state_dict(expected, cfg.depth).items()}
        found = {k: shape for k, shape in found.items() if not DIT4SR_UNUSED.match(k)}
    check_keys(path, want, found, f"the {src.layout}-layout model read from it ({cfg})")
    sd = {}
    for key in expected:
        names, how = to_diffusers_name(key, cfg.depth) if src.layout == "diffusers" else ([key], "copy")
        parts = [src.get(k).to(dtype) for k in names]
        sd[key] = torch.cat(parts) if how == "qkv" else (swap_halves(parts[0]) if how == "swap" else parts[0])
    net.load_state_dict(sd, assign=True)
    net.sampling = src.config("mfsr_sampling")   # e.g. {"tile": 32, "tile_overlap": 12, "cfg": 1.25}: see sample.py
    return net.to(device)


def save_transformer(net: MMDiT, path, layout="original", sd=None):
    """In the "original" (SD3.5's) or "diffusers" layout, config in the metadata; sd: tensors instead of net's."""
    sd = sd if sd is not None else {k: v.detach() for k, v in net.state_dict().items()}
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

# --------------------------------------------------------------------------------------------
# The VAE: diffusers AutoencoderKL names -> original (Stability single file) (ARCH §4.3), loader, writer

_ATTN_NAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
               "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}   # the last four: older files
_LEVEL_PARTS = {"resnets": "block", "downsamplers.0": "downsample", "upsamplers.0": "upsample"}


def from_diffusers_name(key, levels):
    """diffusers key -> original key; diffusers numbers the decoder levels from the deepest."""
    attn = "|".join(map(re.escape, _ATTN_NAMES))
    key = re.sub(rf"\.mid_block\.attentions\.0\.({attn})\.", lambda m: f".mid.attn_1.{_ATTN_NAMES[m[1]]}.", key)
    key = re.sub(r"\.mid_block\.resnets\.([01])\.", lambda m: f".mid.block_{int(m[1]) + 1}.", key)
    key = re.sub(r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out.", key)
    key = re.sub(r"^encoder\.down_blocks\.(\d+)\.(resnets|downsamplers\.0)\.",
                 lambda m: f"encoder.down.{m[1]}.{_LEVEL_PARTS[m[2]]}.", key)
    key = re.sub(r"^decoder\.up_blocks\.(\d+)\.(resnets|upsamplers\.0)\.",
                 lambda m: f"decoder.up.{levels - 1 - int(m[1])}.{_LEVEL_PARTS[m[2]]}.", key)
    return key.replace(".conv_shortcut.", ".nin_shortcut.")


def _vae_files(path):
    """The VAE tensors of a checkpoint (a SafetensorsFiles) under their original-layout names."""
    src = SafetensorsFiles(path, subfolder="vae", prefix="first_stage_model.")
    names = src.keys()
    quant = [k for k in names if k.split(".")[0] in ("quant_conv", "post_quant_conv")]
    if quant:
        raise CheckpointError(f"{path}: has {', '.join(quant[:4])}: a VAE with quant convs (SD1/SDXL "
                              f"style, 4 latent channels), not the SD3 VAE (ARCH §4.3)")
    if not any(k.startswith(("encoder.", "decoder.")) for k in names):
        every = src.all_keys
        hint = " (it looks like a transformer checkpoint)" if any(
            re.search(r"joint_blocks\.|transformer_blocks\.", k) for k in every) else ""
        raise CheckpointError(f"{path}: no VAE keys (encoder.* / decoder.*, optionally under first_stage_model.)"
                              f"{hint}; the file starts with: {', '.join(every[:3]) or 'nothing'}")
    src.layout = "diffusers" if any(".down_blocks." in k or ".up_blocks." in k for k in names) else "original"
    src.levels = len({m[1] for k in names if (m := re.match(r"encoder\.down(?:_blocks)?\.(\d+)\.", k))})
    if src.layout == "diffusers":
        src.where = {from_diffusers_name(k, src.levels): v for k, v in src.where.items()}
    return src


def _vae_told(src):
    """Settings the shapes cannot give: from this project's metadata or a diffusers config.json."""
    told = {k: v for k, v in src.config("vae_config").items() if k in ("groups", "scale", "shift", "patch")}
    folder = src.path if os.path.isdir(src.path) else os.path.dirname(src.path)
    folder = os.path.join(folder, "vae") if os.path.isdir(os.path.join(folder, "vae")) else folder
    if src.layout == "diffusers" and os.path.exists(os.path.join(folder, "config.json")):
        with open(os.path.join(folder, "config.json")) as f:
            d = json.load(f)
        told.update({k: d[n] for k, n in (("groups", "norm_num_groups"), ("scale", "scaling_factor"),
                                          ("shift", "shift_factor")) if d.get(n) is not None})
    return told


def vae_config(path, groups=None):
    """(config, source) of a VAE file without reading a weight; groups: as in load_vae."""
    src = _vae_files(path)
    keys = list(src.where)
    told = _vae_told(src) | ({"groups": groups} if groups else {})
    patch = told.get("patch", 1)   # a bare file with the linear code: RGB patches assumed
    if "patch" not in told and "encoder.linear.weight" in keys:
        patch = math.isqrt(src.shape("encoder.linear.weight")[1] // 3)
    count = lambda pat: len({m[1] for k in keys if (m := re.match(pat, k))})
    try:
        shape = dict(channels=tuple(src.shape(f"encoder.down.{l}.block.0.conv1.weight")[0] for l in range(src.levels)),
                     enc_blocks=count(r"encoder\.down\.0\.block\.(\d+)\."),
                     dec_blocks=count(r"decoder\.up\.0\.block\.(\d+)\."),
                     latent_channels=src.shape("decoder.conv_in.weight")[1],
                     image_channels=src.shape("encoder.conv_in.weight")[1] // patch ** 2,
                     mid_attn=any(k.startswith("encoder.mid.attn_1.") for k in keys), patch=patch)
    except KeyError as e:
        raise CheckpointError(f"{path}: missing {e} needed to read the VAE size") from None
    try:
        return VAEConfig(**{**shape, **told}), src
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}; pass groups= to load_vae") from None


def load_vae(path, *, dtype=torch.float32, device="cpu", groups=None) -> VAE:
    """The SD3 VAE of an SD3.5 single file, a diffusers pipeline or its `vae/`, a file with bare keys, or
    save_vae's. groups: GroupNorm groups when the file cannot tell (default 32, the SD3 value)."""
    cfg, src = vae_config(path, groups)
    with torch.device("meta"):
        vae = VAE(cfg)
    expected = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    renamed = "" if src.layout == "original" else ", its keys renamed to the original layout (ARCH §4.3)"
    found = {k: src.shape(k) for k in src.where}
    attn = re.compile(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$")   # 1x1 convs, (C, C) linears in diffusers
    found |= {k: s + (1, 1) for k, s in found.items() if len(s) == 2 and attn.search(k)}
    check_keys(path, expected, found, f"the {src.layout}-layout VAE read from it ({cfg}){renamed}")
    vae.load_state_dict({k: src.get(k).to(dtype).view(expected[k]) for k in expected}, assign=True)
    return vae.to(device).eval()


def save_vae(vae: VAE, path):
    """The VAE under bare Stability names (`encoder.*`, `decoder.*`), its config in the metadata."""
    sd = {k: v.detach().contiguous() for k, v in vae.state_dict().items()}
    atomic_save(sd, path, {"format": "mfsr-vae", "layout": "original", "vae_config": json.dumps(asdict(vae.cfg))})


# --------------------------------------------------------------------------------------------
# Prompt embeddings


def zero_prompt(net_cfg):
    """The null prompt of a network without an embedding file: zeros, one context token."""
    return Cond(None, torch.zeros(net_cfg.pooled_dim), torch.zeros(1, net_cfg.context_dim))


def prompt_rows(prompt, n=1):
    """A prompt of load_embedding (pooled (P,), context (L, D)) as n rows: (n, P), (n, L, D)."""
    return Cond(None, prompt.pooled.reshape(1, -1).expand(n, -1), prompt.context.reshape(1, *prompt.context.shape[-2:]).expand(n, -1, -1))


def load_embedding(path, null):
    """An embedding file's prompt as a Cond without z_lr (pooled (P,), context (L, D)); `null` if none."""
    if not os.path.exists(path):
        return null
    f = SafetensorsFiles(path)
    try:
        context, pooled = f.get("context"), f.get("pooled")
    except KeyError:
        raise CheckpointError(f"{path}: an embedding file needs 'context' and 'pooled' tensors") from None
    if context.shape[-1] != null.context.shape[-1] or pooled.shape != null.pooled.shape:
        raise CheckpointError(f"{path}: context {tuple(context.shape)} / pooled {tuple(pooled.shape)} do not "
                              f"fit the model ({null.context.shape[-1]} / {tuple(null.pooled.shape)})")
    return Cond(None, pooled.float(), context.float())
