"""The SD3.5 prompt encoders from scratch: CLIP-L, OpenCLIP bigG and T5-XXL (their tokenizers are in
text_tokenizers.py), and `encode_prompts`, which builds a prompt's context and pooled embeddings as the
diffusers StableDiffusion3Pipeline does.

    from text import load_text_encoders, encode_prompts
    enc = load_text_encoders("stable-diffusion-3.5-medium")   # diffusers folder or SD3.5 repo root
    prompt = encode_prompts(["a cat"], enc)   # mfsr.Cond: pooled (1, 2048), context (1, 77 + 77, 4096)
    python tools/text.py --data DIR --encoders PATH            # embeddings beside each image, for train.py
    python tools/text.py --prompt TEXT --out p.safetensors --encoders PATH   # one prompt, for sample.py --emb

MFSR (and DiT4SR, whose teacher it distils) condition the transformer on a prompt c; the teacher's
CFG uses a negative prompt c_neg (Eq. 11). The embeddings follow reference/ARCHITECTURE.md
§5 ("ARCH §5"): the penultimate hidden states of CLIP-L (768) and CLIP-G (1280), concatenated to 2048
channels and zero-padded to 4096, then the T5 tokens appended along the sequence, so
context = (B, 77 + T, 4096) with T = 77 in training and 256 at inference (ARCH §3.6, §3.7); pooled =
[CLIP-L text_embeds ; CLIP-G text_embeds] (the *projected* pooled outputs) = (B, 2048).

Module names equal the Hugging Face transformers key names, so `state_dict()` keys equal the keys of
SD3.5's `text_encoders/{clip_l,clip_g,t5xxl_fp16}.safetensors` and of diffusers' `text_encoder{,_2,_3}`
folders without translation; bundled single files hold them under `text_encoders.<name>.transformer.`.

Tokenizers (text_tokenizers.py) read the diffusers layout's `tokenizer{,_2}/` and `tokenizer_3/`
files. CLIP-L pads with its eos token, CLIP-G with "!" (id 0), as the SD3.5 tokenizer configs say;
both are read from the folders.

Precision: T5-XXL is known to overflow in fp16; as transformers does, fp16 hidden states are clamped
to the finite range after each sub-layer. bf16 or fp32 are the safe choices.
"""
import argparse
import glob
import math
import os
import sys
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the core files at the root

from mfsr import Cond
from plumbing.checkpoints import CheckpointError, SafetensorsFiles, atomic_save, check_keys
from plumbing.images import EXTS as IMAGE_EXTS
from text_tokenizers import CLIP_LEN, CLIPTokenizer, T5Tokenizer, read_json

# DiT4SR's inference prompt suffix (ARCH §3.7).
POSITIVE_SUFFIX = ("Cinematic, hyper sharpness, highly detailed, perfect without deformations, camera, hyper "
                   "detailed photo - realistic maximum detail, 32k, Color Grading, ultra HD, extreme meticulous "
                   "detailing, skin pore detailing. ")
# The negative prompt of the teacher's CFG (Eq. 11's c_neg), by name: MFSR's own (its footnote 1,
# the default) and DiT4SR's inference one (ARCH §3.7), which MFSR does not use.
NEGATIVE_PROMPTS = {
    "mfsr": "oil painting, cartoon, blur, dirty, messy, low quality, deformation, low resolution, oversmooth",
    "dit4sr": ("motion blur, noisy, dotted, bokeh, pointed, CG Style, 3D render, unreal engine, blurring, "
               "dirty, messy, worst quality, low quality, frames, watermark, signature, jpeg artifacts, "
               "deformed, lowres, chaotic"),
}
NEGATIVE_PROMPT = NEGATIVE_PROMPTS["mfsr"]


def negative_prompt(name_or_text):
    """A NEGATIVE_PROMPTS name ("mfsr", "dit4sr") -> its text; any other string is the text itself."""
    return NEGATIVE_PROMPTS.get(name_or_text, name_or_text)



# --------------------------------------------------------------------------------------------
# Configs


@dataclass(frozen=True)
class CLIPConfig:
    vocab: int = 49408
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp: int = 3072
    max_len: int = 77
    act: str = "quick_gelu"      # OpenAI CLIP-L: x * sigmoid(1.702 x); OpenCLIP bigG: exact GELU
    eps: float = 1e-5
    proj: int = 768              # text_projection out features (no bias)
    eos_id: int = -1             # pool at the first eos; -1: at the argmax id (HF configs with eos 2)


@dataclass(frozen=True)
class T5Config:
    vocab: int = 32128
    d_model: int = 4096
    layers: int = 24
    heads: int = 64
    d_kv: int = 64
    d_ff: int = 10240
    buckets: int = 32            # relative position buckets (bidirectional: 16 per direction)
    max_distance: int = 128
    eps: float = 1e-6


CLIP_CONFIGS = {
    "clip_l": CLIPConfig(),
    "clip_g": CLIPConfig(width=1280, layers=32, heads=20, mlp=5120, act="gelu", proj=1280),
    "tiny_l": CLIPConfig(vocab=1000, width=32, layers=3, heads=4, mlp=64, proj=24),
    "tiny_g": CLIPConfig(vocab=1000, width=48, layers=3, heads=4, mlp=96, act="gelu", proj=40),
}
T5_CONFIGS = {
    "t5xxl": T5Config(),
    "tiny": T5Config(vocab=1000, d_model=32, layers=3, heads=4, d_kv=8, d_ff=64, buckets=32, max_distance=128),
}

# --------------------------------------------------------------------------------------------
# CLIP text transformer (pre-LayerNorm, causal; HF CLIPTextModelWithProjection names)


class CLIPAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.heads = cfg.heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(cfg.width, cfg.width) for _ in range(4))

    def forward(self, x):
        B, L, D = x.shape
        q, k, v = (p(x).view(B, L, self.heads, D // self.heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))          # (B, H, L, D/H)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)            # causal mask, 1/sqrt(d) scale
        return self.out_proj(o.transpose(1, 2).reshape(B, L, D))               # (B, L, D)


class CLIPMLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.act = cfg.act
        self.fc1, self.fc2 = nn.Linear(cfg.width, cfg.mlp), nn.Linear(cfg.mlp, cfg.width)

    def forward(self, x):
        h = self.fc1(x)
        h = h * torch.sigmoid(1.702 * h) if self.act == "quick_gelu" else F.gelu(h)
        return self.fc2(h)


class CLIPLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layer_norm1, self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.eps), nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.self_attn, self.mlp = CLIPAttention(cfg), CLIPMLP(cfg)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab, cfg.width)
        self.position_embedding = nn.Embedding(cfg.max_len, cfg.width)

    def forward(self, ids):
        return self.token_embedding(ids) + self.position_embedding.weight[: ids.shape[1]]   # (B, L, D)


class CLIPEncoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.ModuleList(CLIPLayer(cfg) for _ in range(cfg.layers))


class CLIPTextTransformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.embeddings, self.encoder = CLIPEmbeddings(cfg), CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=cfg.eps)


class CLIPText(nn.Module):
    """CLIP's text tower with its projection. forward(ids) -> (penultimate (B, L, D), pooled (B, proj)).

    SD3 takes hidden_states[-2], the input of the last layer, without the final LayerNorm (ARCH §5);
    the pooled vector is the final-LayerNorm state at the eos position, projected (`text_embeds`).
    """

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.text_model = CLIPTextTransformer(cfg)
        self.text_projection = nn.Linear(cfg.width, cfg.proj, bias=False)

    def forward(self, ids):
        assert ids.ndim == 2 and ids.shape[1] <= self.cfg.max_len, ids.shape
        x = self.text_model.embeddings(ids)                                   # (B, L, D)
        layers = self.text_model.encoder.layers
        for layer in layers[:-1]:
            x = layer(x)
        penultimate = x
        x = self.text_model.final_layer_norm(layers[-1](x))
        # transformers pools at argmax(ids) when the config says eos = 2 (the SD3 files), else at the
        # first eos; for CLIP's vocabulary (eos 49407 is the largest id) both pick the first eos.
        at = ids.argmax(-1) if self.cfg.eos_id < 0 else (ids == self.cfg.eos_id).int().argmax(-1)
        pooled = x[torch.arange(ids.shape[0], device=ids.device), at]         # (B, D)
        return penultimate, self.text_projection(pooled)


# --------------------------------------------------------------------------------------------
# T5 v1.1 encoder (pre-RMSNorm, relative position bias, gated-GELU; HF T5EncoderModel names)


class T5LayerNorm(nn.Module):
    """RMS norm without mean subtraction or bias, computed in fp32 (T5)."""

    def __init__(self, dim, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        var = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x.float() * torch.rsqrt(var + self.eps)).to(self.weight.dtype)


def relative_position_bucket(rel, buckets, max_distance):
    """T5's bidirectional buckets of rel = key position - query position: half the buckets per sign,
    of which half are exact distances and half grow logarithmically up to max_distance."""
    half = buckets // 2
    out = (rel > 0).long() * half
    n = rel.abs()
    exact = half // 2
    log_bucket = exact + (torch.log(n.float().clamp(min=1) / exact) / math.log(max_distance / exact)
                          * (half - exact)).long()
    return out + torch.where(n < exact, n, log_bucket.clamp(max=half - 1))


class T5Attention(nn.Module):
    def __init__(self, cfg, relative_bias):
        super().__init__()
        self.cfg = cfg
        inner = cfg.heads * cfg.d_kv
        self.q, self.k, self.v = (nn.Linear(cfg.d_model, inner, bias=False) for _ in range(3))
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        if relative_bias:   # only block 0 holds the table; every block adds the same bias
            self.relative_attention_bias = nn.Embedding(cfg.buckets, cfg.heads)

    def position_bias(self, L):
        pos = torch.arange(L, device=self.q.weight.device)
        bucket = relative_position_bucket(pos[None, :] - pos[:, None], self.cfg.buckets, self.cfg.max_distance)
        return self.relative_attention_bias(bucket).permute(2, 0, 1)[None]   # (1, H, L, L)

    def forward(self, x, bias):
        B, L, _ = x.shape
        q, k, v = (p(x).view(B, L, self.cfg.heads, self.cfg.d_kv).transpose(1, 2)
                   for p in (self.q, self.k, self.v))                          # (B, H, L, d_kv)
        # T5 does not scale the scores by 1/sqrt(d_kv) (the scale is folded into the initialisation)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0)
        return self.o(o.transpose(1, 2).reshape(B, L, -1))                    # (B, L, d_model)


class T5LayerSelfAttention(nn.Module):
    def __init__(self, cfg, relative_bias):
        super().__init__()
        self.SelfAttention = T5Attention(cfg, relative_bias)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.eps)

    def forward(self, x, bias):
        return _clamp_fp16(x + self.SelfAttention(self.layer_norm(x), bias))


class T5DenseGatedActDense(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.wi_0, self.wi_1 = (nn.Linear(cfg.d_model, cfg.d_ff, bias=False) for _ in range(2))
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x):   # T5 v1.1 "gated-gelu": gelu_new (tanh approximation) gates a linear branch
        return self.wo(F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x))


class T5LayerFF(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.DenseReluDense = T5DenseGatedActDense(cfg)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.eps)

    def forward(self, x):
        return _clamp_fp16(x + self.DenseReluDense(self.layer_norm(x)))


def _clamp_fp16(x):
    """As transformers' T5: keep fp16 activations finite (T5-XXL overflows fp16 otherwise)."""
    if x.dtype != torch.float16:
        return x
    big = torch.finfo(torch.float16).max - 1000
    return x.clamp(-big, big)


class T5Block(nn.Module):
    def __init__(self, cfg, relative_bias):
        super().__init__()
        self.layer = nn.ModuleList([T5LayerSelfAttention(cfg, relative_bias), T5LayerFF(cfg)])

    def forward(self, x, bias):
        return self.layer[1](self.layer[0](x, bias))


class T5Stack(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.block = nn.ModuleList(T5Block(cfg, relative_bias=(i == 0)) for i in range(cfg.layers))
        self.final_layer_norm = T5LayerNorm(cfg.d_model, cfg.eps)


class T5Encoder(nn.Module):
    """T5 v1.1 encoder. forward(ids (B, T)) -> last hidden state (B, T, d_model). No attention mask:
    SD3 feeds the padded sequence as it is. `shared` is the token table (tied to encoder.embed_tokens
    in transformers, which stores it once as `shared.weight`)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.shared = nn.Embedding(cfg.vocab, cfg.d_model)
        self.encoder = T5Stack(cfg)

    def forward(self, ids):
        assert ids.ndim == 2, ids.shape
        x = self.shared(ids)                                                   # (B, T, d_model)
        bias = self.encoder.block[0].layer[0].SelfAttention.position_bias(ids.shape[1])
        for block in self.encoder.block:
            x = block(x, bias)
        return self.encoder.final_layer_norm(x)


# --------------------------------------------------------------------------------------------
# Loading: SD3.5 text_encoders/*.safetensors, diffusers folders, bundled single files

# (diffusers subfolder, file stem in SD3.5's text_encoders/ and in bundled `text_encoders.<stem>.` keys)
PARTS = {"clip_l": ("text_encoder", "clip_l"), "clip_g": ("text_encoder_2", "clip_g"),
         "t5": ("text_encoder_3", "t5xxl")}
# Tensors files may hold that the towers do not use: a buffer older transformers saved, CLIP's
# contrastive temperature, and T5's second name for its tied token table (shared.weight is read).
IGNORED = {"text_model.embeddings.position_ids", "logit_scale", "encoder.embed_tokens.weight"}


def _open(path, part):
    """(SafetensorsFiles, HF config.json dict or {}) for one encoder ('clip_l', 'clip_g', 't5')."""
    sub, stem = PARTS[part]
    if os.path.isdir(path):
        if os.path.isdir(os.path.join(path, sub)):        # diffusers layout
            folder = os.path.join(path, sub)
            cfg = os.path.join(folder, "config.json")
            return SafetensorsFiles(folder), (read_json(cfg) if os.path.exists(cfg) else {})
        for folder in (path, os.path.join(path, "text_encoders")):   # SD3.5's text_encoders/ folder
            hits = sorted(glob.glob(os.path.join(folder, f"{stem}*.safetensors")))
            if hits:
                return SafetensorsFiles(hits[0]), {}
        raise CheckpointError(f"{path}: no {sub}/ folder and no {stem}*.safetensors file for the {part} encoder")
    f = SafetensorsFiles(path)
    if any(k.startswith("text_encoders.") for k in f.all_keys):       # a bundled single file
        prefix = f"text_encoders.{stem}.transformer."
        if not any(k.startswith(prefix) for k in f.all_keys):
            raise CheckpointError(f"{path}: bundles text encoders but has no {prefix}* keys ({part})")
        return SafetensorsFiles(path, prefix=prefix), {}
    return f, {}                                                        # one bare encoder file


def _clip_config(f, which, hf):
    """Sizes from the tensor shapes; heads / activation / eos from config.json when there is one
    (the shapes cannot tell them), else the published CLIP-L / bigG values (64-dim heads)."""
    base = CLIP_CONFIGS[which]
    tok = "text_model.embeddings.token_embedding.weight"
    if tok not in f:
        return base                                        # check_keys will list what is missing
    vocab, width = f.shape(tok)
    layers = len({k.split(".")[3] for k in list(f.keys()) if k.startswith("text_model.encoder.layers.")})
    fc1 = "text_model.encoder.layers.0.mlp.fc1.weight"
    cfg = replace(base, vocab=vocab, width=width, layers=layers, heads=width // 64,
                  mlp=f.shape(fc1)[0] if fc1 in f else base.mlp,
                  max_len=f.shape("text_model.embeddings.position_embedding.weight")[0]
                  if "text_model.embeddings.position_embedding.weight" in f else base.max_len,
                  proj=f.shape("text_projection.weight")[0] if "text_projection.weight" in f else width)
    if hf:
        eos = hf.get("eos_token_id", 2)
        cfg = replace(cfg, heads=hf.get("num_attention_heads", cfg.heads), act=hf.get("hidden_act", cfg.act),
                      eps=hf.get("layer_norm_eps", cfg.eps), eos_id=-1 if eos == 2 else eos)
    if cfg.act not in ("quick_gelu", "gelu"):
        raise CheckpointError(f"{f.path}: CLIP activation {cfg.act!r} is not quick_gelu or gelu")
    return cfg


def _t5_config(f, hf):
    base = T5_CONFIGS["t5xxl"]
    bias = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    emb = "shared.weight" if "shared.weight" in f else "encoder.embed_tokens.weight"
    if bias not in f or emb not in f:
        return base
    vocab, d_model = f.shape(emb)
    buckets, heads = f.shape(bias)
    q = "encoder.block.0.layer.0.SelfAttention.q.weight"
    wi = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight"
    cfg = replace(base, vocab=vocab, d_model=d_model, heads=heads, buckets=buckets,
                  layers=len({k.split(".")[2] for k in list(f.keys()) if k.startswith("encoder.block.")}),
                  d_kv=f.shape(q)[0] // heads if q in f else base.d_kv, d_ff=f.shape(wi)[0] if wi in f else base.d_ff)
    if hf:
        if hf.get("feed_forward_proj", "gated-gelu") != "gated-gelu":
            raise CheckpointError(f"{f.path}: feed_forward_proj {hf['feed_forward_proj']!r}: not a T5 v1.1 encoder")
        cfg = replace(cfg, max_distance=hf.get("relative_attention_max_distance", cfg.max_distance),
                      eps=hf.get("layer_norm_epsilon", cfg.eps))
    return cfg


def _load_weights(model, f, what, dtype):
    """Every key and shape checked against the module; tensors assigned to a meta-device model."""
    names = {k: k for k in list(f.keys()) if k not in IGNORED}
    if isinstance(model, T5Encoder) and "shared.weight" not in f and "encoder.embed_tokens.weight" in f:
        names["shared.weight"] = "encoder.embed_tokens.weight"     # the tied table under its other name
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_keys(f.path, want, {k: f.shape(v) for k, v in names.items()}, what)
    model.load_state_dict({k: f.get(names[k]).to(dtype) for k in want}, assign=True)
    return model.eval().requires_grad_(False)


def load_clip(path, which="clip_l", dtype=torch.float32):
    """CLIP-L ('clip_l') or CLIP-G ('clip_g') text tower from a file, a folder or a bundled file."""
    f, hf = _open(path, which)
    cfg = _clip_config(f, which, hf)
    with torch.device("meta"):
        model = CLIPText(cfg)
    return _load_weights(model, f, f"the {which} text encoder {cfg}", dtype)


def load_t5(path, dtype=torch.float32):
    f, hf = _open(path, "t5")
    cfg = _t5_config(f, hf)
    with torch.device("meta"):
        model = T5Encoder(cfg)
    return _load_weights(model, f, f"the T5 encoder {cfg}", dtype)


class TextEncoders(nn.Module):
    """The three towers and their tokenizers; t5 may be None (diffusers then uses zeros for its tokens)."""

    def __init__(self, clip_l, clip_g, t5, tok_l, tok_g, tok_t5):
        super().__init__()
        self.clip_l, self.clip_g, self.t5 = clip_l, clip_g, t5
        self.tok_l, self.tok_g, self.tok_t5 = tok_l, tok_g, tok_t5


def load_tokenizers(path):
    """CLIP-L, CLIP-G and T5 tokenizers from a diffusers folder (tokenizer/, tokenizer_2/, tokenizer_3/),
    or from its parent when `path` is SD3.5's text_encoders/ folder."""
    for root in (path, os.path.dirname(os.path.abspath(path))):
        if os.path.isdir(os.path.join(root, "tokenizer")):
            break
    else:
        raise CheckpointError(f"{path}: no tokenizer/ folder (pass the diffusers / SD3.5 repository folder "
                              f"that holds tokenizer/, tokenizer_2/ and tokenizer_3/)")
    tok_l = CLIPTokenizer.from_folder(os.path.join(root, "tokenizer"))
    tok_g = CLIPTokenizer.from_folder(os.path.join(root, "tokenizer_2"))
    return tok_l, tok_g, T5Tokenizer.from_file(os.path.join(root, "tokenizer_3", "tokenizer.json"))


def load_text_encoders(path, tokenizers=None, dtype=torch.float32, t5=True):
    """All three encoders from `path` (diffusers folder, SD3.5 text_encoders/ folder or its repository
    root, or a bundled single file) and tokenizers from `tokenizers` (default: `path`)."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or folder")
    tok_l, tok_g, tok_t5 = load_tokenizers(tokenizers or (path if os.path.isdir(path) else os.path.dirname(path)))
    return TextEncoders(load_clip(path, "clip_l", dtype), load_clip(path, "clip_g", dtype),
                        load_t5(path, dtype) if t5 else None, tok_l, tok_g, tok_t5)


# --------------------------------------------------------------------------------------------
# Prompt embeddings (diffusers StableDiffusion3Pipeline.encode_prompt, ARCH §5)


@torch.no_grad()
def encode_prompts(prompts, encoders, t5_len=77):
    """prompts: list of B strings -> an mfsr.Cond without z_lr: pooled (B, 2048), context (B, 77 + t5_len,
    4096), fp32. "" gives the null embedding (diffusers encodes the empty prompt; it is not zeros)."""
    assert isinstance(prompts, (list, tuple)) and all(isinstance(p, str) for p in prompts), prompts
    e = encoders
    dev = next(e.clip_l.parameters()).device
    h_l, pooled_l = e.clip_l(e.tok_l(prompts).to(dev))                       # (B, 77, 768), (B, 768)
    h_g, pooled_g = e.clip_g(e.tok_g(prompts).to(dev))                       # (B, 77, 1280), (B, 1280)
    clip = torch.cat([h_l, h_g], dim=-1).float()                             # (B, 77, 2048)
    if e.t5 is not None:
        t5 = e.t5(e.tok_t5(prompts, t5_len).to(next(e.t5.parameters()).device)).float().to(dev)
    else:
        t5 = torch.zeros(len(prompts), t5_len, 4096, device=dev)             # (B, T, 4096)
    assert clip.shape[-1] <= t5.shape[-1], (clip.shape, t5.shape)
    clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))                   # (B, 77, 4096): zero-padded
    context = torch.cat([clip, t5], dim=-2)                                  # (B, 77 + T, 4096)
    pooled = torch.cat([pooled_l, pooled_g], dim=-1).float()                 # (B, 2048)
    return Cond(None, pooled, context)


# --------------------------------------------------------------------------------------------
# Precompute: one embedding file per image, plus the null and negative embeddings (train.py reads them)


def caption_of(image):
    """The caption beside an image (name.txt), or "" (the null prompt) when there is none."""
    txt = os.path.splitext(image)[0] + ".txt"
    if not os.path.exists(txt):
        return ""
    with open(txt, encoding="utf-8") as f:
        return f.read().strip()


def save_embedding(path, emb, text, dtype):
    """One prompt's Cond (pooled (2048,), context (77 + T, 4096)) as an embedding file, atomically."""
    assert emb.context.ndim == 2 and emb.pooled.ndim == 1, (emb.context.shape, emb.pooled.shape)
    atomic_save({"context": emb.context.to(dtype).contiguous(), "pooled": emb.pooled.to(dtype).contiguous()}, path,
                {"prompt": text, "t5_len": str(emb.context.shape[0] - CLIP_LEN)})


def precompute(data, encoders, t5_len=77, batch=8, suffix="", negative=NEGATIVE_PROMPT, dtype=torch.float32):
    """Write name.safetensors (context (77 + t5_len, 4096), pooled (2048)) beside every image under
    `data`, and data/null.safetensors ("") and data/neg.safetensors (the negative prompt)."""
    if not os.path.isdir(data):
        raise SystemExit(f"error: --data {data}: not a folder")
    images = sorted(p for p in glob.glob(os.path.join(data, "**", "*"), recursive=True)
                    if p.lower().endswith(IMAGE_EXTS))
    if not images:
        raise SystemExit(f"error: --data {data}: no images ({', '.join(IMAGE_EXTS)}) found")
    clash = [p for p in images if os.path.splitext(os.path.relpath(p, data))[0] in ("null", "neg")]
    if clash:
        raise SystemExit(f"error: {clash[0]}: its embedding would be the null / negative embedding file; rename it")
    for i in range(0, len(images), batch):
        paths = images[i:i + batch]
        prompts = [(c + " " + suffix if c and suffix else c) for c in map(caption_of, paths)]
        embs = encode_prompts(prompts, encoders, t5_len)
        for i, (p, text) in enumerate(zip(paths, prompts)):
            save_embedding(os.path.splitext(p)[0] + ".safetensors", embs.rows(i), text, dtype)
        print(f"{min(i + batch, len(images))}/{len(images)} embeddings written")
    for name, prompt in (("null", ""), ("neg", negative)):
        save_embedding(os.path.join(data, f"{name}.safetensors"), encode_prompts([prompt], encoders, t5_len).rows(0),
                       prompt, dtype)
    print(f"wrote {os.path.join(data, 'null.safetensors')} and {os.path.join(data, 'neg.safetensors')}")


def write_prompts(out, encoders, prompt, negative, t5_len=256, dtype=torch.float32):
    """One prompt's embedding to `out` and the negative prompt's to neg.safetensors beside it, for
    sample.py --emb / --neg-emb (T5 length 256 as DiT4SR's inference)."""
    embs = encode_prompts([prompt, negative], encoders, t5_len)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    save_embedding(out, embs.rows(0), prompt, dtype)
    neg = os.path.join(os.path.dirname(out) or ".", "neg.safetensors")
    save_embedding(neg, embs.rows(1), negative, dtype)
    print(f"wrote {out} ({prompt!r}) and {neg}")


def main(argv=None):
    ap = argparse.ArgumentParser(description="Precompute SD3.5 prompt embeddings: beside each image of --data from "
                                             "its caption (for train.py), or one --prompt to --out (for sample.py).")
    ap.add_argument("--data", default=None, help="folder of images with name.txt captions (missing: empty prompt)")
    ap.add_argument("--prompt", default=None, help="one prompt's text, written to --out")
    ap.add_argument("--prompt-file", default=None, help="read --prompt from this UTF-8 file")
    ap.add_argument("--out", default=None, help="with --prompt: the embedding file (neg.safetensors goes beside it)")
    ap.add_argument("--encoders", required=True, help="diffusers SD3.5 folder, SD3.5 text_encoders/ folder or "
                                                       "repository root, or a single file bundling text_encoders.*")
    ap.add_argument("--tokenizers", default="", help="folder with tokenizer/, tokenizer_2/, tokenizer_3/ "
                                                     "(default: --encoders)")
    ap.add_argument("--t5-len", type=int, default=None, help="T5 tokens: 77 for training (--data's default), 256 "
                                                              "at inference (--prompt's default, DiT4SR)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--suffix", default="", help=f"appended to non-empty captions (DiT4SR inference: {POSITIVE_SUFFIX!r})")
    ap.add_argument("--negative", default="mfsr", help="the negative prompt written to neg.safetensors: a name "
                                                        f"({', '.join(NEGATIVE_PROMPTS)}) or the text itself")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32",
                    choices=["float32", "bfloat16", "float16"], help="encoder precision")
    ap.add_argument("--save-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    a = ap.parse_args(argv)
    if a.prompt_file is not None:
        if a.prompt is not None:
            ap.error("give --prompt or --prompt-file, not both")
        try:
            with open(a.prompt_file, encoding="utf-8") as f:
                a.prompt = f.read().strip()
        except (OSError, UnicodeDecodeError) as e:
            ap.error(f"--prompt-file {a.prompt_file}: cannot read it as UTF-8 text ({getattr(e, 'strerror', None) or e})")
    if (a.data is None) == (a.prompt is None):
        ap.error("give --data (captions beside images) or --prompt / --prompt-file with --out")
    if a.prompt is not None and not a.out:
        ap.error("--prompt needs --out, the embedding file to write")
    if a.data is not None and not os.path.isdir(a.data):
        raise SystemExit(f"error: --data {a.data}: not a folder")
    try:
        enc = load_text_encoders(a.encoders, a.tokenizers or None, getattr(torch, a.dtype))
    except (CheckpointError, ValueError) as e:
        raise SystemExit(f"error: --encoders {a.encoders}: {e}") from None
    dtype = getattr(torch, a.save_dtype)
    if a.prompt is not None:
        return write_prompts(a.out, enc.to(a.device), a.prompt, negative_prompt(a.negative), a.t5_len or 256, dtype)
    precompute(a.data, enc.to(a.device), a.t5_len or 77, a.batch, a.suffix, negative_prompt(a.negative), dtype)


if __name__ == "__main__":
    main(sys.argv[1:])
