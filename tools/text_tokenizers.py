"""SD3.5's two tokenizers from scratch, read from the standard files of the diffusers layout:
CLIP's byte-level BPE (`tokenizer{,_2}/vocab.json + merges.txt`, as the Python `CLIPTokenizer` of
transformers 4 without ftfy) and T5's unigram model (`tokenizer_3/tokenizer.json`, as
`T5TokenizerFast`: its normalizer's precompiled charsmap, Metaspace pre-tokenizer, Viterbi split).

    tok = CLIPTokenizer.from_folder("sd3.5/tokenizer")          # ids = tok(["a cat"], 77)
    t5 = T5Tokenizer.from_file("sd3.5/tokenizer_3/tokenizer.json")

Used by text.py (`load_tokenizers`), which also holds the encoders.
"""
import base64
import json
import math
import os
import sys
import re
import struct
import unicodedata
from functools import lru_cache
from itertools import pairwise

import torch

sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the core files at the root

from plumbing.checkpoints import CheckpointError

CLIP_LEN = 77                   # CLIP's context: start, 75 tokens, end


# --------------------------------------------------------------------------------------------
# CLIP tokenizer: byte-level BPE with "</w>" word ends (as transformers 4's Python CLIPTokenizer)


def bytes_to_unicode():
    """GPT-2's reversible map of the 256 bytes to printable characters: printable Latin-1 bytes map
    to themselves, the others to code points from 256 up, so BPE never sees whitespace or controls."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return {b: chr(b) if b in keep else chr(next(extra)) for b in range(256)}


@lru_cache(maxsize=1)
def _clip_pretokenizer():
    """CLIP's split: specials | contractions | letter runs | single digits | other non-space runs.
    The original uses \\p{L} and \\p{N} (the `regex` module); these are built from unicodedata."""
    letters, numbers = [], []
    for cp in range(0x40000):   # planes 0-3 hold every letter and number of the Unicode tables
        cat = unicodedata.category(chr(cp))
        (letters if cat[0] == "L" else numbers if cat[0] == "N" else []).append(cp)
    L, N = _char_class(letters), _char_class(numbers)
    return re.compile(rf"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[{L}]+|[{N}]|[^\s{L}{N}]+",
                      re.IGNORECASE)


def _char_class(cps):
    """Sorted code points -> the inside of a regex [...] class, as ranges."""
    out, start = [], cps[0]
    for a, b in zip(cps, cps[1:] + [None]):
        if b != a + 1:
            out.append(re.escape(chr(start)) + ("-" + re.escape(chr(a)) if a > start else ""))
            start = b
    return "".join(out)


def _is_cjk(cp):
    return any(lo <= cp <= hi for lo, hi in ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF),
                                              (0x2A700, 0x2B73F), (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF),
                                              (0xF900, 0xFAFF), (0x2F800, 0x2FA1F)))


def clip_clean(text):
    """The ftfy-less cleaning of transformers' CLIPTokenizer (its BasicTokenizer): drop NUL, U+FFFD and
    control characters, whitespace -> space, space around CJK ideographs, NFC, lowercase, collapse spaces."""
    out = []
    for ch in text:
        cat = unicodedata.category(ch)
        if ch in "\t\n\r" or cat == "Zs":
            out.append(" ")
        elif ch not in ("\0", "\ufffd") and not cat.startswith("C"):
            out.append(f" {ch} " if _is_cjk(ord(ch)) else ch)
    return " ".join(w.lower() for w in unicodedata.normalize("NFC", "".join(out)).split())


class CLIPTokenizer:
    """ids = CLIPTokenizer.from_folder("sd3.5/tokenizer")(["a cat"])   # (B, 77) LongTensor
    [bos] + BPE tokens (truncated to 75) + [eos], padded to 77 with the folder's pad token."""

    def __init__(self, vocab, merges, pad_token="<|endoftext|>", max_len=CLIP_LEN):
        self.vocab, self.max_len = vocab, max_len
        # transformers 4 splits every special token (bos, eos and the pad token) out of the text before
        # BPE; with CLIP-G's pad "!" every "!" in a prompt becomes id 0 (not the "!</w>" BPE token).
        self.specials = sorted({"<|startoftext|>", "<|endoftext|>", pad_token}, key=len, reverse=True)
        self.ranks = {tuple(m.split()): i for i, m in enumerate(merges)}
        self.bos, self.eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
        self.pad = vocab[pad_token]
        self.byte_char = bytes_to_unicode()
        self.cache = {}

    @classmethod
    def from_folder(cls, folder, max_len=CLIP_LEN):
        if not os.path.isdir(folder):
            raise CheckpointError(f"{folder}: no such tokenizer folder")
        vocab = read_json(os.path.join(folder, "vocab.json"))
        with open(os.path.join(folder, "merges.txt"), encoding="utf-8") as f:
            lines = f.read().strip().split("\n")
        # transformers keeps at most 49152 - 256 - 2 merges (the CLIP vocabulary) after the header line
        merges = [m for m in lines[1 if lines[0].startswith("#") else 0:] if m][:49152 - 256 - 2]
        return cls(vocab, merges, _pad_token(folder, "<|endoftext|>"), max_len)

    def bpe(self, word):
        """Merge the lowest-ranked adjacent pair until none is in the merge list (word ends in </w>)."""
        if word in self.cache:
            return self.cache[word]
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pair = min(pairwise(parts), key=lambda p: self.ranks.get(p, math.inf))
            if pair not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        self.cache[word] = parts
        return parts

    def tokenize(self, text):
        """Token ids of one string, without bos/eos. Literal specials in the text stay one token."""
        ids = []
        for piece in re.split("(" + "|".join(map(re.escape, self.specials)) + ")", text):
            if piece in self.specials:
                ids.append(self.vocab[piece])
                continue
            for word in _clip_pretokenizer().findall(clip_clean(piece)):
                chars = "".join(self.byte_char[b] for b in word.encode("utf-8"))
                ids += [self.vocab.get(t, self.eos) for t in self.bpe(chars)]   # unk = eos
        return ids

    def __call__(self, texts):
        rows = []
        for t in texts:
            ids = [self.bos] + self.tokenize(t)[: self.max_len - 2] + [self.eos]
            rows.append(ids + [self.pad] * (self.max_len - len(ids)))
        return torch.tensor(rows, dtype=torch.long)


# --------------------------------------------------------------------------------------------
# T5 tokenizer: SentencePiece unigram model read from tokenizer.json (as T5TokenizerFast)


class T5Tokenizer:
    """ids = T5Tokenizer.from_file("sd3.5/tokenizer_3/tokenizer.json")(["a cat"], 77)   # (B, 77)
    special tokens split out of the raw text -> normalizer -> whitespace split + "▁" metaspace ->
    Viterbi over the unigram pieces -> truncate to length - 1, append </s>, pad with <pad> (id 0)."""

    def __init__(self, spec):
        model = spec["model"]
        if model.get("type") != "Unigram":
            raise ValueError(f"tokenizer.json: model type {model.get('type')!r}, expected 'Unigram'")
        self.pieces = {p: i for i, (p, _) in enumerate(model["vocab"])}   # a repeated piece: the last id wins
        self.scores = [s for _, s in model["vocab"]]
        self.max_piece = max(len(p) for p, _ in model["vocab"])
        self.unk = model["unk_id"]
        self.unk_score = min(self.scores) - 10.0        # SentencePiece's unknown-piece penalty
        added = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
        self.added = added
        self.added_re = re.compile("|".join(map(re.escape, sorted(added, key=len, reverse=True)))) if added else None
        self.normalizers = _flatten(spec.get("normalizer"), "normalizers")
        self.pretokenizers = _flatten(spec.get("pre_tokenizer"), "pretokenizers")
        self.eos = added.get("</s>", self.pieces.get("</s>"))
        self.pad = added.get("<pad>", self.pieces.get("<pad>", 0))
        self.charsmap = {}

    @classmethod
    def from_file(cls, path):
        return cls(read_json(path))

    def normalize(self, s):
        for n in self.normalizers:
            kind = n["type"]
            if kind in ("NFC", "NFD", "NFKC", "NFKD"):
                s = unicodedata.normalize(kind, s)
            elif kind == "Lowercase":
                s = s.lower()
            elif kind == "Strip":
                s = s.lstrip() if n.get("strip_left", True) else s
                s = s.rstrip() if n.get("strip_right", True) else s
            elif kind == "Replace":
                pat = n["pattern"]
                rx = pat["Regex"] if "Regex" in pat else re.escape(pat["String"])
                s = re.sub(rx, n["content"].replace("\\", "\\\\"), s)
            elif kind == "Prepend":
                s = n["prepend"] + s if s else s
            elif kind == "Precompiled":
                s = self._precompiled(n["precompiled_charsmap"]).normalize(s)
            else:
                raise ValueError(f"tokenizer.json: normalizer {kind!r} is not supported")
        return s

    def _precompiled(self, blob):
        if blob not in self.charsmap:
            self.charsmap[blob] = PrecompiledCharsmap(base64.b64decode(blob))
        return self.charsmap[blob]

    def pretokenize(self, s):
        words = [s]
        for p in self.pretokenizers:
            if p["type"] == "WhitespaceSplit":
                words = [w for x in words for w in x.split()]
            elif p["type"] == "Metaspace":
                words = [w for x in words for w in _metaspace(x, p)]
            else:
                raise ValueError(f"tokenizer.json: pre-tokenizer {p['type']!r} is not supported")
        return words

    def viterbi(self, word):
        """Best segmentation of `word` into pieces (max total score); a character no piece starts
        with becomes <unk>, and adjacent unknowns are fused into one (as tokenizers' Unigram)."""
        n = len(word)
        best = [(-math.inf, -1, -1)] * (n + 1)      # (score, start, id) of the best path ending here
        best[0] = (0.0, 0, -1)
        for i in range(n):
            single = False
            for j in range(i + 1, min(n, i + self.max_piece) + 1):
                pid = self.pieces.get(word[i:j])
                if pid is not None:
                    cand = best[i][0] + self.scores[pid]
                    if best[j][1] < 0 or cand > best[j][0]:    # the first of equal scores wins
                        best[j] = (cand, i, pid)
                    single |= j == i + 1
            if not single and (best[i + 1][1] < 0 or best[i][0] + self.unk_score > best[i + 1][0]):
                best[i + 1] = (best[i][0] + self.unk_score, i, self.unk)
        ids, end = [], n
        while end > 0:
            _, start, pid = best[end]
            if not (pid == self.unk and ids and ids[-1] == self.unk):
                ids.append(pid)
            end = start
        return ids[::-1]

    def tokenize(self, text):
        """Token ids of one string, without </s>."""
        ids, pos = [], 0
        for m in list(self.added_re.finditer(text)) if self.added_re else []:
            ids += self._segment(text[pos:m.start()]) + [self.added[m.group()]]
            pos = m.end()
        return ids + self._segment(text[pos:])

    def _segment(self, s):
        return [i for w in self.pretokenize(self.normalize(s)) for i in self.viterbi(w)] if s else []

    def __call__(self, texts, length):
        rows = []
        for t in texts:
            ids = self.tokenize(t)[: length - 1] + [self.eos]
            rows.append(ids + [self.pad] * (length - len(ids)))
        return torch.tensor(rows, dtype=torch.long)


def _flatten(spec, key):
    """A tokenizer.json normalizer / pre-tokenizer (maybe a Sequence) as a flat list of steps."""
    if not spec:
        return []
    if spec["type"] == "Sequence":
        return [s for sub in spec[key] for s in _flatten(sub, key)]
    return [spec]


def _metaspace(word, p):
    """Spaces -> "▁", a leading "▁" (prepend_scheme "always"/"first" or add_prefix_space), and a split
    before every "▁" (each "▁" starts a new piece)."""
    rep = p.get("replacement", "▁")
    word = word.replace(" ", rep)
    scheme = p.get("prepend_scheme", "always" if p.get("add_prefix_space", True) else "never")
    if scheme in ("always", "first") and not word.startswith(rep):
        word = rep + word     # "first" differs only after special tokens; T5 uses "always"
    if not p.get("split", True):
        return [word]
    return [w for w in re.split(f"(?={re.escape(rep)})", word) if w]


class PrecompiledCharsmap:
    """SentencePiece's compiled normalisation rules (nmt_nfkc for T5), as stored in tokenizer.json:
    a uint32 size, a darts-clone double-array trie over UTF-8 byte strings, then the replacement
    strings (NUL-terminated) that trie values point at. Applied as tokenizers' `Precompiled`: each
    grapheme shorter than 6 bytes is looked up whole, else each character; the first (shortest) trie
    match gives the replacement, no match keeps the text."""

    def __init__(self, blob):
        size = struct.unpack_from("<I", blob)[0]
        self.units = struct.unpack_from(f"<{size // 4}I", blob, 4)
        self.strings = blob[4 + size:]

    def lookup(self, text):
        key, units = text.encode("utf-8"), self.units
        pos = (units[0] >> 10) << ((units[0] & (1 << 9)) >> 6)        # offset of the root
        for c in key:
            pos ^= c
            unit = units[pos]
            if unit & ((1 << 31) | 0xFF) != c:                          # label mismatch: no (more) matches
                return None
            pos ^= (unit >> 10) << ((unit & (1 << 9)) >> 6)
            if (unit >> 8) & 1:                                         # has a leaf: the first match wins
                start = units[pos] & ((1 << 31) - 1)
                return self.strings[start:self.strings.index(b"\0", start)].decode("utf-8")
        return None

    def normalize(self, s):
        out = []
        for g in _graphemes(s):
            whole = self.lookup(g) if len(g.encode("utf-8")) < 6 else None
            out.append(whole if whole is not None else "".join(self.lookup(c) or c for c in g))
        return "".join(out)


def _graphemes(s):
    """An approximation of Unicode extended grapheme clusters (enough for prompts): a character with
    its combining marks, variation selectors, emoji modifiers and zero-width-joined followers; CR LF;
    pairs of regional-indicator flags."""
    out = []
    for ch in s:
        if out and _extends(out[-1], ch):
            out[-1] += ch
        else:
            out.append(ch)
    return out


def _extends(cluster, ch):
    last, cp = cluster[-1], ord(ch)
    if last == "\r":
        return ch == "\n"
    if _is_control(last) or _is_control(ch):
        return False
    if unicodedata.category(ch) in ("Mn", "Me", "Mc") or cp == 0x200D or 0x1F3FB <= cp <= 0x1F3FF:
        return True
    if last == "\u200d":
        return True
    flags = sum(0x1F1E6 <= ord(c) <= 0x1F1FF for c in cluster)
    return 0x1F1E6 <= cp <= 0x1F1FF and flags % 2 == 1 and len(cluster) == flags


def _is_control(ch):
    return ch != "\u200d" and (unicodedata.category(ch) in ("Cc", "Zl", "Zp") or ch in "\r\n")


def read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a JSON file ({e})") from None


def _pad_token(folder, default):
    """The pad token a diffusers tokenizer folder names (SD3.5: CLIP-L "<|endoftext|>", CLIP-G "!")."""
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            pad = read_json(path).get("pad_token")
            if pad:
                return pad["content"] if isinstance(pad, dict) else pad
    return default
