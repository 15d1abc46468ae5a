"""Pytest fixtures shared by several test files (the text encoders' tiny SD3 folder), with their helpers."""

import io
import json
import os

import pytest
import torch

from builders import _TXT_CORPUS


def _txt_clip_pattern():
    return (r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
            r"""[^\s\p{L}\p{N}]+""")


def _txt_build_clip_tokenizer(folder, pad):
    """Train a small byte-level BPE with </w> word ends (CLIP's format) and write vocab.json + merges.txt."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import Regex, models, pre_tokenizers, trainers
    tok = tokenizers.Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tok.normalizer = tokenizers.normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_txt_clip_pattern()), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=700, end_of_word_suffix="</w>", initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(_TXT_CORPUS[:12] * 3, trainer)
    trained = json.loads(tok.to_str())["model"]
    chars = sorted(alphabet)   # every byte alone and as a word end, as CLIP's vocabulary has
    vocab = {}
    for t in chars + [c + "</w>" for c in chars] + sorted(trained["vocab"], key=trained["vocab"].get):
        vocab.setdefault(t, len(vocab))
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1   # eos = the largest id
    merges = [" ".join(m) if isinstance(m, list) else m for m in trained["merges"]]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    specials = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                "pad_token": pad}
    with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
        json.dump(specials, f)
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({**specials, "model_max_length": 77, "tokenizer_class": "CLIPTokenizer"}, f)
    return vocab


def _txt_read_proto(buf):
    """Fields of one protobuf message: {field number: [values]} (varints, 32-bit, bytes)."""
    out, i = {}, 0

    def varint():
        nonlocal i
        v, shift = 0, 0
        while True:
            b = buf[i]
            i += 1
            v |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                return v
    while i < len(buf):
        key = varint()
        field, wire = key >> 3, key & 7
        if wire == 0:
            val = varint()
        elif wire == 5:
            val, i = buf[i:i + 4], i + 4
        elif wire == 1:
            val, i = buf[i:i + 8], i + 8
        else:
            n = varint()
            val, i = buf[i:i + n], i + n
        out.setdefault(field, []).append(val)
    return out


def _txt_build_t5_tokenizer(folder):
    """Train a tiny SentencePiece unigram model with nmt_nfkc rules; write it as T5's tokenizer.json
    (<pad> </s> <unk> first, extra ids last, Precompiled + Replace normaliser, WhitespaceSplit + Metaspace)."""
    spm = pytest.importorskip("sentencepiece")
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import Regex, models, normalizers, pre_tokenizers, processors
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(_TXT_CORPUS[:12] * 4), model_writer=model,
                                   vocab_size=250, model_type="unigram", normalization_rule_name="nmt_nfkc",
                                   character_coverage=0.98, hard_vocab_limit=False, minloglevel=3)
    proc = spm.SentencePieceProcessor(model_proto=model.getvalue())
    charsmap = _txt_read_proto(_txt_read_proto(model.getvalue())[3][0])[2][0]   # normalizer_spec.precompiled_charsmap
    pieces = [(proc.id_to_piece(i), proc.get_score(i)) for i in range(proc.get_piece_size())
              if not (proc.is_control(i) or proc.is_unknown(i))]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + pieces + [(f"<extra_id_{i}>", 0.0) for i in range(3)]
    tok = tokenizers.Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.Precompiled(charsmap), normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")])
    tok.add_special_tokens(["<pad>", "</s>", "<unk>"] + [f"<extra_id_{i}>" for i in range(3)])
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    return tok, len(vocab)


def _txt_randomize(model, seed):
    """Random values for every parameter (norm weights and biases too), scaled to keep activations O(1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if p.ndim == 1:
                p.copy_(1 + 0.2 * r if name.endswith("weight") else 0.2 * r)
            else:
                p.copy_(r if "embed" in name or "shared" in name or "relative" in name else r / p.shape[1] ** 0.5)
    return model


def _txt_hf_clip(vocab, width, heads, act, proj, eos, seed):
    tr = pytest.importorskip("transformers")
    cfg = tr.CLIPTextConfig(vocab_size=vocab, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=3,
                            num_attention_heads=heads, max_position_embeddings=77, hidden_act=act,
                            projection_dim=proj, eos_token_id=eos, bos_token_id=eos - 1, pad_token_id=eos)
    torch.manual_seed(seed)
    return _txt_randomize(tr.CLIPTextModelWithProjection(cfg).eval(), seed)


def _txt_hf_t5(vocab, d_model, seed):
    tr = pytest.importorskip("transformers")
    cfg = tr.T5Config(vocab_size=vocab, d_model=d_model, d_kv=16, d_ff=128, num_layers=3, num_heads=4,
                      feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
                      relative_attention_max_distance=128, dropout_rate=0.0)
    torch.manual_seed(seed)
    return _txt_randomize(tr.T5EncoderModel(cfg).eval(), seed)


@pytest.fixture(scope="module")
def _txt_pipeline(tmp_path_factory):
    """A tiny SD3-layout folder: tokenizer{,_2,_3}/ and text_encoder{,_2,_3}/ saved by transformers.
    CLIP-L: quick_gelu, eos id in its config; CLIP-G: gelu, the legacy eos 2 (pool at argmax), as SD3's."""
    root = str(tmp_path_factory.mktemp("sd3_text"))
    vocab = _txt_build_clip_tokenizer(os.path.join(root, "tokenizer"), "<|endoftext|>")
    _txt_build_clip_tokenizer(os.path.join(root, "tokenizer_2"), "!")
    t5_tok, t5_vocab = _txt_build_t5_tokenizer(os.path.join(root, "tokenizer_3"))
    eos = vocab["<|endoftext|>"]
    # 64-dim heads, as the real towers: SD3.5's text_encoders/ files have no config.json to say otherwise
    hf = {"text_encoder": _txt_hf_clip(len(vocab), 64, 1, "quick_gelu", 24, eos, 1),
          "text_encoder_2": _txt_hf_clip(len(vocab), 128, 2, "gelu", 40, eos, 2),
          "text_encoder_3": _txt_hf_t5(t5_vocab, 224, 3)}
    hf["text_encoder_2"].config.eos_token_id = 2
    for sub, m in hf.items():
        m.save_pretrained(os.path.join(root, sub), safe_serialization=True)
    return root, hf, t5_tok
