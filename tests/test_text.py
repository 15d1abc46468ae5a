"""Tests of tools/text.py: the CLIP / T5 encoders and tokenizers against transformers, their files and commands."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

import mfsr
import sample
import text
import text_tokenizers
import train
from builders import _TINY, _TXT_CORPUS, _images
from plumbing.checkpoints import CheckpointError, SafetensorsFiles
from plumbing import checkpoints


# Where transformers 4's Python CLIPTokenizer (what text.py follows; SD3/DiT4SR ran with it) and
# transformers 5's tokenizers-backed one differ: format/control characters (dropped vs kept, e.g. the
# emoji zero-width joiner), CJK ideographs (one word each vs one run), U+FFFD / NUL; and the pad token
# "!" of CLIP-G, which version 4 splits out of the text as id 0.
_TXT_SLOW_ONLY = ["tab\x0bvertical\x0cform control\x07bell", "中文字符 and 日本語です", "nul\x00char \ufffd",
                  "zwj 🐱\u200d👤 family 👨\u200d👩\u200d👧", "wow!!! great! (!)"]


# ---- encoders against transformers


def test_text_clip_matches_transformers(_txt_pipeline):
    """Both CLIP variants (quick-GELU + eos id, GELU + argmax pooling), loaded from save_pretrained files."""
    root, hf, _ = _txt_pipeline
    tok = text_tokenizers.CLIPTokenizer.from_folder(os.path.join(root, "tokenizer"))
    ids = tok(["a photo of a cat", "", _TXT_CORPUS[11]])
    for which, sub in (("clip_l", "text_encoder"), ("clip_g", "text_encoder_2")):
        ours = text.load_clip(root, which)
        assert ours.cfg.act == ("quick_gelu" if which == "clip_l" else "gelu")
        with torch.no_grad():
            ref = hf[sub](ids, output_hidden_states=True)
            pen, pooled = ours(ids)
        assert (pen - ref.hidden_states[-2]).abs().max() <= 1e-5
        assert (pooled - ref.text_embeds).abs().max() <= 1e-5
        assert ref.text_embeds.abs().mean() > 0.1     # not a trivially small output


def test_text_t5_matches_transformers(_txt_pipeline):
    """T5 v1.1 encoder at a tiny size, 200 tokens (past max_distance 128: every bucket is used)."""
    root, hf, _ = _txt_pipeline
    ours = text.load_t5(root)
    ids = torch.randint(0, ours.cfg.vocab, (2, 200), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf["text_encoder_3"](ids).last_hidden_state
        out = ours(ids)
    assert (out - ref).abs().max() <= 1e-5
    assert ref.abs().mean() > 0.1


def test_text_relative_position_buckets():
    """Bucket boundaries of T5's bidirectional scheme (16 per direction, 8 exact, log up to 128)."""
    rel = torch.tensor([0, 1, 7, 8, 12, 127, 128, 1000, -1, -7, -8, -128, -1000])
    b = text.relative_position_bucket(rel, 32, 128).tolist()
    assert b == [0, 17, 23, 24, 25, 31, 31, 31, 1, 7, 8, 15, 15]   # 12: 16 + 8 + floor(8 log1.5 / log16)


def test_text_encode_prompts_matches_diffusers(_txt_pipeline):
    """encode_prompts == diffusers StableDiffusion3Pipeline.encode_prompt with the same tiny parts."""
    tr = pytest.importorskip("transformers")
    diffusers = pytest.importorskip("diffusers")
    root, hf, _ = _txt_pipeline
    enc = text.load_text_encoders(root)
    prompts = ["a photo of a cat", "", _TXT_CORPUS[3], _TXT_CORPUS[11]]
    emb = text.encode_prompts(prompts, enc, t5_len=20)
    context, pooled = emb.context, emb.pooled
    assert emb.z_lr is None and context.shape == (4, 77 + 20, 224) and pooled.shape == (4, 24 + 40)
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=None, scheduler=None, vae=None,
        text_encoder=hf["text_encoder"], tokenizer=tr.CLIPTokenizer.from_pretrained(os.path.join(root, "tokenizer")),
        text_encoder_2=hf["text_encoder_2"],
        tokenizer_2=tr.CLIPTokenizer.from_pretrained(os.path.join(root, "tokenizer_2")),
        text_encoder_3=hf["text_encoder_3"],
        tokenizer_3=tr.PreTrainedTokenizerFast(tokenizer_file=os.path.join(root, "tokenizer_3", "tokenizer.json"),
                                               pad_token="<pad>", eos_token="</s>", unk_token="<unk>"))
    with torch.no_grad():
        ref, _, ref_pooled, _ = pipe.encode_prompt(prompts, prompts, prompts, device=torch.device("cpu"),
                                                   do_classifier_free_guidance=False, max_sequence_length=20)
    assert (context - ref).abs().max() <= 1e-5 and (pooled - ref_pooled).abs().max() <= 1e-5
    assert context[:, :77, 192:].abs().max() == 0      # CLIP channels 64 + 128 = 192, zero-padded to 224
    null = text.encode_prompts([""], enc, t5_len=20).context
    assert torch.equal(null[0], context[1])            # "" is the null embedding, batch-independent


# ---- tokenizers against transformers / tokenizers


def test_text_clip_tokenizer_matches_reference(_txt_pipeline):
    tr = pytest.importorskip("transformers")
    root, _, _ = _txt_pipeline
    for sub, pad in (("tokenizer", None), ("tokenizer_2", "!")):
        ref = tr.CLIPTokenizer.from_pretrained(os.path.join(root, sub))
        ours = text_tokenizers.CLIPTokenizer.from_folder(os.path.join(root, sub))
        assert ours.pad == (ours.eos if pad is None else ours.vocab["!"])
        corpus = _TXT_CORPUS + (_TXT_SLOW_ONLY if not ref.is_fast else [])   # slow: transformers < 5
        want = ref(corpus, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        got = ours(corpus)
        bad = [s for s, a, b in zip(corpus, got, want) if not torch.equal(a, b)]
        assert not bad, bad
        assert got[11, -1] == ours.eos and got[11, -2] not in (ours.pad, ours.eos)   # truncated to 77, then eos


def test_text_clip_cleaning():
    """The ftfy-less cleaning of transformers 4's CLIPTokenizer (checked against it when installed)."""
    assert text_tokenizers.clip_clean("  A\x0bB\tC\u00a0 中文 x\x00y\ufffd ") == "ab c 中 文 xy"
    assert text_tokenizers.clip_clean("Cafe\u0301") == "café"     # NFC composes


def test_text_t5_tokenizer_matches_tokenizers(_txt_pipeline):
    root, _, ref = _txt_pipeline
    ours = text_tokenizers.T5Tokenizer.from_file(os.path.join(root, "tokenizer_3", "tokenizer.json"))
    ref.enable_truncation(max_length=77)
    ref.enable_padding(length=77, pad_id=0, pad_token="<pad>")
    corpus = _TXT_CORPUS + _TXT_SLOW_ONLY
    want = torch.tensor([e.ids for e in ref.encode_batch(corpus)])
    got = ours(corpus, 77)
    bad = [s for s, a, b in zip(corpus, got, want) if not torch.equal(a, b)]
    assert not bad, bad
    assert (got == 2).any()                            # some characters are unknown: <unk> paths are tested
    assert got[11, -1] == 1 and got[1, 0] == 1 and got[1, 1] == 0   # truncated ends in </s>; "" -> </s> <pad>


def test_text_precompiled_charsmap(_txt_pipeline):
    """nmt_nfkc through the darts trie: full-width -> ASCII, ligature split, NFKC of ①."""
    root, _, _ = _txt_pipeline
    with open(os.path.join(root, "tokenizer_3", "tokenizer.json"), encoding="utf-8") as f:
        spec = json.load(f)
    blob = text_tokenizers._flatten(spec["normalizer"], "normalizers")[0]["precompiled_charsmap"]
    cm = text_tokenizers.T5Tokenizer(spec)._precompiled(blob)
    assert cm.normalize("ＡＢＣ ﬁ ① plain") == "ABC fi 1 plain"


# ---- full sizes, key names, parameter counts


def test_text_full_size_parameter_counts():
    """Published sizes: CLIP-L text + projection 123,650,304; OpenCLIP bigG text + projection 694,659,840;
    T5 v1.1 XXL encoder 4,762,310,656 (transformers' models at these configs give the same numbers)."""
    with torch.device("meta"):
        models = {"clip_l": text.CLIPText(text.CLIP_CONFIGS["clip_l"]), "clip_g": text.CLIPText(text.CLIP_CONFIGS["clip_g"]),
                  "t5": text.T5Encoder(text.T5_CONFIGS["t5xxl"])}
    counts = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    assert counts == {"clip_l": 123_650_304, "clip_g": 694_659_840, "t5": 4_762_310_656}
    keys = {k: set(m.state_dict()) for k, m in models.items()}
    assert len(keys["clip_l"]) == 197 and len(keys["clip_g"]) == 517 and len(keys["t5"]) == 219
    assert {"text_projection.weight", "text_model.final_layer_norm.bias",
            "text_model.encoder.layers.11.self_attn.out_proj.weight"} <= keys["clip_l"]
    assert "text_model.encoder.layers.31.mlp.fc2.bias" in keys["clip_g"]
    assert {"shared.weight", "encoder.final_layer_norm.weight",
            "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
            "encoder.block.23.layer.1.DenseReluDense.wi_1.weight"} <= keys["t5"]
    assert not any("relative_attention_bias" in k for k in keys["t5"] if not k.startswith("encoder.block.0."))
    tr = pytest.importorskip("transformers")
    with torch.device("meta"):
        ref = tr.CLIPTextModelWithProjection(tr.CLIPTextConfig(hidden_size=1280, intermediate_size=5120,
                                                               num_hidden_layers=32, num_attention_heads=20,
                                                               projection_dim=1280, hidden_act="gelu"))
    assert {k: tuple(v.shape) for k, v in ref.state_dict().items() if k not in text.IGNORED} == \
        {k: tuple(v.shape) for k, v in models["clip_g"].state_dict().items()}


# ---- file layouts and errors


def _txt_tensors(path, prefix=""):
    f = SafetensorsFiles(path)
    return {prefix + k: f.get(k) for k in list(f.keys())}


def test_text_layouts_sd35_folder_and_bundle(_txt_pipeline, tmp_path):
    """The same weights from SD3.5's text_encoders/{clip_l,clip_g,t5xxl_fp16}.safetensors and from one
    file bundling text_encoders.<name>.transformer.* (T5's table under encoder.embed_tokens there)."""
    root, _, _ = _txt_pipeline
    te = tmp_path / "text_encoders"
    te.mkdir()
    parts = {"clip_l": "text_encoder", "clip_g": "text_encoder_2", "t5xxl": "text_encoder_3"}
    bundle = {}
    for stem, sub in parts.items():
        t = _txt_tensors(os.path.join(root, sub))
        save_file(t, str(te / f"{stem}{'_fp16' if stem == 't5xxl' else ''}.safetensors"))
        if stem == "t5xxl":
            t["encoder.embed_tokens.weight"] = t.pop("shared.weight")
        bundle.update({f"text_encoders.{stem}.transformer.{k}": v for k, v in t.items()})
    bundle["model.diffusion_model.x"] = torch.zeros(1)
    save_file(bundle, str(tmp_path / "single.safetensors"))
    ref = text.encode_prompts(["a cat"], text.load_text_encoders(root), 8)
    for path in (str(te), str(tmp_path / "single.safetensors")):
        got = text.encode_prompts(["a cat"], text.load_text_encoders(path, tokenizers=root), 8)
        assert (got.context - ref.context).abs().max() <= 1e-6 and (got.pooled - ref.pooled).abs().max() <= 1e-6, path


def test_text_load_errors(_txt_pipeline, tmp_path):
    root, _, _ = _txt_pipeline
    t = _txt_tensors(os.path.join(root, "text_encoder"))
    bad = dict(t)
    del bad["text_model.encoder.layers.1.mlp.fc1.bias"]
    bad["text_model.encoder.layers.0.self_attn.q_proj.weight"] = torch.zeros(64, 63)
    save_file(bad, str(tmp_path / "clip_l.safetensors"))
    with pytest.raises(CheckpointError, match=r"(?s)clip_l.safetensors.*missing \(1\).*layers.1.mlp.fc1.bias"
                                              r".*misshapen \(1\).*q_proj.weight: file \(64, 63\)"):
        text.load_clip(str(tmp_path / "clip_l.safetensors"))
    save_file({"encoder.conv_in.weight": torch.zeros(2, 2)}, str(tmp_path / "vae.safetensors"))
    with pytest.raises(CheckpointError, match=r"vae.safetensors: checkpoint does not match the T5 encoder"):
        text.load_t5(str(tmp_path / "vae.safetensors"))
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="only .safetensors"):
        text.load_clip(str(tmp_path / "notes.txt"))
    (tmp_path / "x.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        text.load_clip(str(tmp_path / "x.safetensors"))
    save_file({"text_encoders.clip_l.transformer.a": torch.zeros(1)}, str(tmp_path / "partial.safetensors"))
    with pytest.raises(CheckpointError, match=r"no text_encoders.t5xxl.transformer.\* keys"):
        text.load_t5(str(tmp_path / "partial.safetensors"))
    with pytest.raises(CheckpointError, match="no text_encoder_2/ folder"):
        text.load_clip(str(tmp_path), "clip_g")


# ---- precompute command


def test_text_precompute_command(_txt_pipeline, tmp_path):
    root, _, _ = _txt_pipeline
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "a.png").write_bytes(b"png")
    (data / "a.txt").write_text("a red fox in snow\n")
    (data / "sub" / "b.jpg").write_bytes(b"jpg")                   # no caption: the null prompt
    text.main(["--data", str(data), "--encoders", root, "--t5-len", "12", "--batch", "1"])
    enc = text.load_text_encoders(root)
    ref = text.encode_prompts(["a red fox in snow", "", text.NEGATIVE_PROMPT], enc, 12)
    null = mfsr.Cond(None, torch.zeros(64), torch.zeros(1, 224))
    for name, i in (("a", 0), ("sub/b", 1), ("null", 1), ("neg", 2)):
        got = checkpoints.load_embedding(str(data / f"{name}.safetensors"), null)
        assert got.context.shape == (77 + 12, 224) and got.pooled.shape == (64,)
        assert (got.context - ref.context[i]).abs().max() <= 1e-6 and (got.pooled - ref.pooled[i]).abs().max() <= 1e-6
    assert (data / "a.png").read_bytes() == b"png" and not list(data.glob("*.tmp*"))
    with pytest.raises(SystemExit, match="not a folder"):
        text.main(["--data", str(tmp_path / "nope"), "--encoders", root])
    with pytest.raises(SystemExit, match="--encoders .*no such file"):
        text.main(["--data", str(data), "--encoders", str(tmp_path / "missing")])
    (data / "neg.png").write_bytes(b"png")
    with pytest.raises(SystemExit, match="neg.png: its embedding would be"):
        text.main(["--data", str(data), "--encoders", root])


def test_prompt_text_is_a_tools_step_and_captions_without_embeddings_warn(tmp_path, capsys):
    """Prompt text is encoded by tools/text.py, never by train.py or sample.py (no card file imports the
    text encoders): their --prompt flags are gone, and captions left unencoded are reported."""
    for parse, argv in ((sample.parse_args, ["in.png", "--prompt", "a cat"]),
                        (train.parse_args, ["--data", "d", "--prompt", "a cat"])):
        with pytest.raises(SystemExit):
            parse(argv)
        assert "unrecognized arguments: --prompt" in capsys.readouterr().err
    for argv, msg in ((["--prompt", "a cat", "--encoders", "e"], "--prompt needs --out"),
                      (["--encoders", "e"], "give --data"),
                      (["--data", "d", "--prompt", "x", "--out", "o", "--encoders", "e"], "give --data")):
        with pytest.raises(SystemExit):
            text.main(argv)
        assert msg in capsys.readouterr().err
    data = _images(tmp_path / "data", n=2)
    (tmp_path / "data" / "img0.txt").write_text("a photo")
    train.main(_TINY + ["--data", data, "--steps", "1", "--lora-rank", "4", "--out", str(tmp_path / "o")])
    assert "1 captions (e.g. " in capsys.readouterr().out


def test_negative_prompt_is_the_papers_by_default_and_dit4sr_by_name():
    assert text.NEGATIVE_PROMPT == text.negative_prompt("mfsr") == (
        "oil painting, cartoon, blur, dirty, messy, low quality, deformation, low resolution, oversmooth")
    assert text.negative_prompt("dit4sr").startswith("motion blur, noisy, dotted, bokeh") and \
        text.negative_prompt("dit4sr").endswith("deformed, lowres, chaotic")
    assert text.negative_prompt("grainy, dark") == "grainy, dark"                     # any other text as it is
