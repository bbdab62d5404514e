"""The SD 1.x CLIP-L text encoder, computed as stock ComfyUI computes it: a prompt -> the CONDITIONING
tensor that ComfyUI's CLIP Text Encode node makes of it ([1, 77 * chunks, 768]), without ComfyUI.

What ComfyUI does with a plain prompt (comfy/sd1_clip.py, comfy/clip_model.py, comfy/sd.py), and how this
module matches it:
- Files. ComfyUI reads CLIP-L from `models/text_encoders/clip_l.safetensors` (transformers' CLIPTextModel
  keys `text_model.*`; an open_clip text tower is renamed into those keys when loaded) or from an SD 1.x
  checkpoint (`cond_stage_model.transformer.text_model.*`, or the older `cond_stage_model.transformer.*`
  without `text_model.`). Those are the layouts of CLIP_LAYOUTS; the rest of a file (the image tower,
  the UNet and VAE of a checkpoint, text_projection, logit_scale, position_ids) is ignored, and every key
  of the text transformer must be present with the right shape (the error names the bad keys).
  Width, depth and positions come from the tensors' shapes, heads = width / 64. A file with a 23rd layer
  is refused: ComfyUI takes such a file for CLIP-H or CLIP-G (SD 2 / SDXL), whose conditioning is another
  one (penultimate layer, other padding). Only the CLIP-L shape (width 768, 12 layers, 77 positions, the
  49408-token vocabulary) has a ComfyUI counterpart; smaller shapes (the tests' tiny models) are run the
  same way.
- Precision. ComfyUI stores text-encoder weights in float16 by default, on every device (unless started
  with --fp32-text-enc / --bf16-text-enc ...), and computes in float32 (its "manual cast" layers cast
  each weight up to the float32 activations). `from_state_dict(weight_dtype=torch.float16)` does the
  same: weights are rounded through float16 once, then held and used in float32. Pass
  `weight_dtype=None` to keep the file's precision (what ComfyUI computes with --fp32-text-enc).
- Tokens. The text is normalised as the `tokenizers` backend of transformers 5 does for CLIPTokenizer
  (NFC, every whitespace run -> one space, lower case character by character), split into words
  (letter runs, single digits, runs of other symbols, the contractions 's 't 're 've 'm 'll 'd), and
  each word is byte-level BPE encoded with "</w>" ending its last symbol, from CLIP's merge list (the
  vocabulary ids follow from it: 256 byte symbols, the same with "</w>", one token per merge, then
  <|startoftext|> and <|endoftext|>).
- Chunks. ComfyUI makes rows of 77 ids: the start token, up to 75 prompt tokens, the end token, then
  padding with the end token (SD1: pad_with_end). A longer prompt goes on in further rows, each again
  start + tokens + end (+ padding in the last); the rows are encoded separately and concatenated along
  the token axis: [1, 154, 768] for 76..150 tokens, and so on. A group of fewer than 8 tokens (a
  bracketed weight group, see below) that does not fit in a row moves whole to the next row (the row is
  closed with the end token and padded); a longer group is split. Same here, with "77" being the file's
  number of positions (248 for a Long-CLIP file, as in ComfyUI).
- The network. Token + position embeddings, pre-LN transformer layers (causal attention, QuickGELU MLP:
  ComfyUI's SD1 config uses QuickGELU for every CLIP-L file, so this does too), the final LayerNorm; the
  output is the last layer after the final LayerNorm (ComfyUI's SD1 default "last" layer; no CLIP Set
  Last Layer), every position including the padding, with no attention mask beyond the causal one.
- Weights in the prompt. ComfyUI reads `(text)` as weight 1.1, `((text))` 1.21, `(text:1.3)` 1.3, and
  `\\(` `\\)` as literal brackets. A weighted token's feature becomes
  empty + w * (feature - empty), where `empty` is the feature at the same position of the prompt-free
  row (start, end, padding). Implemented the same way here. Unbalanced brackets are refused (ComfyUI's
  parser reads them in a way that depends on their position; write `\\(` for a literal bracket).

Checked against ComfyUI itself (tests/test_clip_text_encoder.py, `-m comfyui`): random weights of the full
CLIP-L shape, loaded by ComfyUI's CLIPLoader (clip_l and open_clip layouts, and a 248-position Long-CLIP
file) and by its checkpoint loader's CLIP path (SD 1.5 layout), then CLIP Text Encode, on the CPU: tokens
equal for every prompt (300 random ones too), features equal within 3.4e-6 (max abs, features of size
~5) for 1-row, 2-row, empty and weighted prompts; keeping float32 weights instead of ComfyUI's float16
would differ by 3e-3.

Refused with an error that says why, never encoded differently: textual-inversion embeddings
(`embedding:NAME`: ComfyUI loads a file from its embeddings folder, or drops the word when it is
missing); the special-token texts <|startoftext|> and <|endoftext|>; characters that ComfyUI
tokenizes differently depending on its transformers version (4.x runs a Python tokenizer that removes
control and format characters, spaces out CJK ideographs and lower-cases a word-final sigma as ς; 5.x,
matched here, does none of those): control/format/private/unassigned characters other than tab and
newline, line and paragraph separators, CJK ideographs and Σ. (transformers 4.x with the optional ftfy
package also "fixes" quotes and ligatures; ftfy is not among ComfyUI's requirements.) Prompts of
different lengths that need a different number of 77-token rows cannot share one batch of `encode`.

The BPE merge list is CLIP's (`bpe_simple_vocab_16e6.txt`, MIT, OpenAI). It is not shipped with this
pack: every ComfyUI install has it as `comfy/sd1_tokenizer/merges.txt`, and the open_clip package ships it
as `open_clip/bpe_simple_vocab_16e6.txt.gz`. `find_vocabulary()` looks, in order, at the path given, the
NUWA_CLIP_VOCAB environment variable, the ComfyUI this pack is installed in (custom_nodes/../comfy),
COMFYUI_DIR, an importable `comfy` package, and an installed open_clip (found without importing it);
the error lists every place it looked.
"""
from __future__ import annotations

import functools
import gzip
import importlib.util
import itertools
import os
import re
import unicodedata
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import load_strict

CLIP_LAYOUTS: dict[str, str] = {
    "clip_l": "CLIP-L text encoder as ComfyUI's models/text_encoders/clip_l.safetensors "
              "(transformers CLIPTextModel keys text_model.*)",
    "sd1_checkpoint": "SD 1.x checkpoint (its text encoder under cond_stage_model.transformer.text_model.*; "
                      "UNet and VAE ignored)",
    "open_clip": "open_clip text tower (token_embedding.weight, positional_embedding, "
                 "transformer.resblocks.*, ln_final.*; image tower ignored)",
}

START_TEXT, END_TEXT = "<|startoftext|>", "<|endoftext|>"
HEAD_WIDTH = 64          # CLIP convention: heads = width / 64
LARGE_GROUP = 8          # ComfyUI splits a token group across rows only from this length on
FIRST_BIG_LAYER = 22     # ComfyUI: a text_model.encoder.layers.22 key means CLIP-H/G, not CLIP-L
ENCODE_ROWS = 32         # rows of 77 tokens per forward pass
BYTE_SYMBOLS = 256
VOCAB_ENV = "NUWA_CLIP_VOCAB"


class ClipTextError(ValueError):
    """A CLIP file, vocabulary or prompt this module cannot encode as ComfyUI does; the message says why."""


# ---------------------------------------------------------------------------------------------------------
# state-dict layouts -> one canonical key set (transformers' names without the text_model. prefix)

_SD1_PREFIX = "cond_stage_model.transformer."
_MARKERS = {
    "sd1_checkpoint": (_SD1_PREFIX + "text_model.embeddings.token_embedding.weight",
                       _SD1_PREFIX + "embeddings.token_embedding.weight"),
    "clip_l": ("text_model.embeddings.token_embedding.weight",),
    "open_clip": ("token_embedding.weight",),
}
_IGNORED = {  # parts of the accepted files that the conditioning does not use
    "clip_l": ("vision_model.", "visual_projection.", "text_projection", "logit_scale",
               "text_model.embeddings.position_ids"),
    "sd1_checkpoint": (_SD1_PREFIX + "text_model.embeddings.position_ids", _SD1_PREFIX + "embeddings.position_ids",
                       _SD1_PREFIX + "text_projection", "cond_stage_model.logit_scale"),
    "open_clip": ("visual.", "text_projection", "logit_scale", "logit_bias", "attn_mask"),
}
_OPEN_CLIP_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                    "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_OPEN_CLIP_TOP = {"token_embedding.weight": "embeddings.token_embedding.weight",
                  "positional_embedding": "embeddings.position_embedding.weight",
                  "ln_final.weight": "final_layer_norm.weight", "ln_final.bias": "final_layer_norm.bias"}


def clip_layout(keys: Iterable[str]) -> str | None:
    """Which CLIP_LAYOUTS entry a state dict's keys are in, or None."""
    keys = set(keys)
    if any(m in keys for m in _MARKERS["sd1_checkpoint"]):
        return "sd1_checkpoint"
    if _MARKERS["clip_l"][0] in keys:
        return "clip_l"
    if _MARKERS["open_clip"][0] in keys and any(k.startswith("transformer.resblocks.") for k in keys):
        return "open_clip"
    return None


def _canonical(tensors: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """The file's text-transformer tensors under canonical names (ignored parts dropped, the rest kept
    as they are so that load_strict names anything unexpected)."""
    if layout not in CLIP_LAYOUTS:
        raise ClipTextError(f"unknown CLIP layout {layout!r}; accepted: {', '.join(CLIP_LAYOUTS)}")
    kept = {k: v for k, v in tensors.items() if not k.startswith(_IGNORED[layout])}
    out = {}
    if layout == "clip_l":
        for k, v in kept.items():
            out[k.removeprefix("text_model.")] = v
    elif layout == "sd1_checkpoint":
        for k, v in kept.items():
            if not k.startswith("cond_stage_model."):
                continue  # UNet, VAE, EMA copies: not the text encoder
            name = k.removeprefix(_SD1_PREFIX)
            out[name.removeprefix("text_model.")] = v
    else:  # open_clip: other names, and one fused q/k/v projection per block
        for k, v in kept.items():
            block = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)", k)
            fused = re.fullmatch(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", k)
            if k in _OPEN_CLIP_TOP:
                out[_OPEN_CLIP_TOP[k]] = v
            elif fused:
                for part, name in zip(v.chunk(3, dim=0), ("q_proj", "k_proj", "v_proj")):
                    out[f"encoder.layers.{fused.group(1)}.self_attn.{name}.{fused.group(2)}"] = part
            elif block and block.group(2) in _OPEN_CLIP_BLOCK:
                out[f"encoder.layers.{block.group(1)}.{_OPEN_CLIP_BLOCK[block.group(2)]}.{block.group(3)}"] = v
            else:
                out[k] = v  # kept under its own name: load_strict reports it as unexpected
    return out


# ---------------------------------------------------------------------------------------------------------
# the vocabulary and the byte-level BPE tokenizer

def _byte_symbols() -> tuple[list[str], list[int]]:
    """(symbols, bytes): the printable character standing for each byte, in CLIP's (GPT-2's) vocabulary
    order: the bytes that are printable Latin-1 characters stand for themselves, the other bytes, in
    order, for chr(256), chr(257), ..."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(BYTE_SYMBOLS) if b not in set(printable)]
    return [chr(b) for b in printable] + [chr(BYTE_SYMBOLS + n) for n in range(len(rest))], printable + rest


def _here_comfyui() -> Path | None:
    """ComfyUI/ when this file is ComfyUI/custom_nodes/<pack>/nuwa_core/clip_text_encoder.py (a linked pack
    folder counts where it is linked, not where it points)."""
    parents = Path(os.path.abspath(__file__)).parents
    return parents[3] if len(parents) > 3 and parents[2].name == "custom_nodes" else None


def vocabulary_candidates() -> list[tuple[str, Path | None]]:
    """(where, path) for every place find_vocabulary looks, in order (path None: that place is absent)."""
    places: list[tuple[str, Path | None]] = []
    env = os.environ.get(VOCAB_ENV)
    places.append((f"${VOCAB_ENV}", Path(env).expanduser() if env else None))
    here = _here_comfyui()
    places.append(("the ComfyUI this pack is installed in",
                   here / "comfy" / "sd1_tokenizer" / "merges.txt" if here else None))
    comfy_dir = os.environ.get("COMFYUI_DIR")
    places.append(("$COMFYUI_DIR", Path(comfy_dir).expanduser() / "comfy" / "sd1_tokenizer" / "merges.txt"
                   if comfy_dir else None))
    for package, file in (("comfy", "sd1_tokenizer/merges.txt"), ("open_clip", "bpe_simple_vocab_16e6.txt.gz")):
        folder = _package_dir(package)
        places.append((f"the installed {package} package", folder / file if folder else None))
    return places


def _package_dir(package: str) -> Path | None:
    """Where an installed top-level package lives, found without importing it (open_clip imports torchvision)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    locations = list(spec.submodule_search_locations or []) if spec else []
    return Path(locations[0]) if locations else None


def find_vocabulary(path: str | os.PathLike | None = None) -> Path:
    """CLIP's BPE merge list: `path` if given, else the first of vocabulary_candidates() that exists."""
    if path is not None:
        if not Path(path).is_file():
            raise ClipTextError(f"CLIP vocabulary {path}: no such file (want CLIP's BPE merge list: ComfyUI's "
                                f"comfy/sd1_tokenizer/merges.txt or open_clip's bpe_simple_vocab_16e6.txt.gz)")
        return Path(path)
    places = vocabulary_candidates()
    for _, candidate in places:
        if candidate is not None and candidate.is_file():
            return candidate
    looked = "\n  ".join(f"{where}: {p if p is not None else '(not set / not installed)'}" for where, p in places)
    raise ClipTextError(
        "CLIP's BPE vocabulary (merge list) was not found; the CLIP text encoder needs it to turn prompts into "
        f"tokens. Looked at:\n  {looked}\nEvery ComfyUI has it as comfy/sd1_tokenizer/merges.txt (set COMFYUI_DIR "
        f"to the ComfyUI folder, or {VOCAB_ENV} to that file); `pip install open_clip_torch` also brings it "
        "(open_clip/bpe_simple_vocab_16e6.txt.gz).")


@functools.lru_cache(maxsize=4)
def _read_merges(path: str) -> tuple[tuple[str, str], ...]:
    raw = Path(path).read_bytes()
    text = (gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw).decode("utf-8")
    lines = text.split("\n")[1:]  # the first line is a version header in both files
    merges = []
    for n, line in enumerate(lines):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2:
            raise ClipTextError(f"CLIP vocabulary {path}: line {n + 2} is not a merge of two symbols: {line!r}")
        merges.append((parts[0], parts[1]))
    return tuple(merges)


def _is_letter(c: str) -> bool:
    return unicodedata.category(c)[0] == "L"


def _is_number(c: str) -> bool:
    return unicodedata.category(c)[0] == "N"


_WHITESPACE = re.compile(r"[\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+")
_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
_CJK = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
        (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))


def _version_dependent(c: str) -> str | None:
    """Why ComfyUI's transformers 4.x and 5.x tokenizers would read this character differently, or None."""
    if c in "\t\n\r":
        return None
    cat = unicodedata.category(c)
    if cat[0] == "C" or cat in ("Zl", "Zp") or c == "\ufffd":
        return "a control, format, private-use or unassigned character"
    if any(a <= ord(c) <= b for a, b in _CJK):
        return "a CJK ideograph"
    if c == "Σ":
        return "a capital sigma (lower-cased as σ or ς depending on the version)"
    return None


def _words(text: str) -> list[str]:
    """Normalised text -> CLIP's pre-tokens: contractions, letter runs, single digits, runs of other non-space
    characters; whitespace separates and is dropped."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if c == " ":
            i += 1
            continue
        if c == "'":
            found = next((s for s in _CONTRACTIONS if text.startswith(s, i)), None)
            if found:
                out.append(found)
                i += len(found)
                continue
        j = i + 1
        if _is_letter(c):
            while j < n and _is_letter(text[j]):
                j += 1
        elif not _is_number(c):
            while j < n and text[j] != " " and not _is_letter(text[j]) and not _is_number(text[j]):
                j += 1
        out.append(text[i:j])
        i = j
    return out


class ClipTokenizer:
    """Byte-level BPE as CLIP's tokenizer (transformers 5) does it; ids of CLIP's vocabulary order."""

    def __init__(self, merges: tuple[tuple[str, str], ...], source: str = "merges"):
        symbols, self._byte_order = _byte_symbols()
        self._byte_symbol = {b: s for s, b in zip(symbols, self._byte_order)}
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [START_TEXT, END_TEXT]
        self.ids = {tok: i for i, tok in enumerate(vocab)}
        if len(self.ids) != len(vocab):
            raise ClipTextError(f"CLIP vocabulary {source}: a merge produces a token twice; not a BPE merge list")
        self.merges = merges
        self.ranks = {m: r for r, m in enumerate(merges)}
        self.start, self.end = self.ids[START_TEXT], self.ids[END_TEXT]
        self.size = len(vocab)
        self._cache: dict[str, list[int]] = {}

    def _bpe(self, word: str) -> list[int]:
        """One pre-token -> ids: its bytes as symbols ("</w>" on the last), then, repeatedly, every
        occurrence (left to right) of the adjacent pair whose merge comes first in the list is joined."""
        hit = self._cache.get(word)
        if hit is not None:
            return hit
        parts = [self._byte_symbol[b] for b in word.encode("utf-8")]
        parts[-1] += "</w>"
        while len(parts) > 1:
            best = min(self.ranks.get(pair, self.size) for pair in itertools.pairwise(parts))
            if best == self.size:
                break
            a, b = self.merges[best]
            joined, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == a and parts[i + 1] == b:
                    joined.append(a + b)
                    i += 2
                else:
                    joined.append(parts[i])
                    i += 1
            parts = joined
        ids = [self.ids[p] for p in parts]
        self._cache[word] = ids
        return ids

    @staticmethod
    def normalize(text: str) -> str:
        text = _WHITESPACE.sub(" ", unicodedata.normalize("NFC", text))
        return "".join(c.lower() for c in text)

    def __call__(self, text: str) -> list[int]:
        """Text -> token ids, without start and end tokens."""
        return [i for word in _words(self.normalize(text)) for i in self._bpe(word)]

    def rows(self, prompt: str, length: int = 77) -> tuple[list[list[int]], list[list[float]]]:
        """A prompt -> rows of `length` token ids and their weights, as ComfyUI's SD1 tokenizer lays them out
        (padding with the end token)."""
        check_prompt(prompt)
        groups = [[(t, w) for t in self(text)] for text, w in weighted_segments(prompt) if text]
        rows = layout_rows(groups, length, self.start, self.end, self.end)
        return [[i for i, _ in r] for r in rows], [[w for _, w in r] for r in rows]


# ---------------------------------------------------------------------------------------------------------
# prompts -> rows of token ids and weights, as ComfyUI's SD1 tokenizer lays them out

_OPEN, _CLOSE = "\ue000", "\ue001"  # stand-ins for \( and \) (private-use characters are refused in prompts)


def check_prompt(prompt: str) -> None:
    """Raise ClipTextError for what ComfyUI would not read as plain (possibly weighted) text."""
    if not isinstance(prompt, str):
        raise ClipTextError(f"a prompt must be a string, got {type(prompt).__name__}")
    if "embedding:" in prompt:
        raise ClipTextError(f"prompt {prompt!r} names a textual-inversion embedding ('embedding:'), which ComfyUI "
                            f"loads from its embeddings folder; embeddings are not supported here: reword it")
    for special in (START_TEXT, END_TEXT):
        if special in prompt.lower():
            raise ClipTextError(f"prompt {prompt!r} contains {special}, which CLIP's tokenizer reads as a special "
                                f"token; special tokens in prompts are not supported here: remove it")
    for c in prompt:
        why = _version_dependent(c)
        if why:
            raise ClipTextError(f"prompt {prompt!r} contains {c!r} (U+{ord(c):04X}), {why}: ComfyUI encodes it "
                                f"differently under transformers 4.x and 5.x, so a model trained on it could "
                                f"not count on the same features at use time; remove or replace it")


def weighted_segments(prompt: str) -> list[tuple[str, float]]:
    """ComfyUI's prompt weighting: (text) multiplies the weight by 1.1, (text:w) sets it to w, \\( \\) are
    literal brackets -> [(text, weight)] in order. Unbalanced brackets are refused."""
    text = prompt.replace("\\)", _CLOSE).replace("\\(", _OPEN)
    depth = 0
    for n, c in enumerate(text):
        depth += (c == "(") - (c == ")")
        if depth < 0:
            break
    if depth:
        where = f"an unmatched ')' (character {n + 1})" if depth < 0 else f"{depth} unclosed '('"
        raise ClipTextError(f"prompt {prompt!r} has {where}. ComfyUI reads brackets as weights, (text) or "
                            f"(text:1.2); write \\( and \\) for literal brackets")
    return [(s.replace(_OPEN, "(").replace(_CLOSE, ")"), w) for s, w in _weighted(text, 1.0)]


def _weighted(text: str, weight: float) -> list[tuple[str, float]]:
    out, i = [], 0
    while i < len(text):
        if text[i] != "(":
            j = text.find("(", i)
            j = len(text) if j < 0 else j
            out.append((text[i:j], weight))
            i = j
            continue
        depth, j = 0, i
        while True:  # the matching bracket (balance was checked)
            depth += (text[j] == "(") - (text[j] == ")")
            if depth == 0:
                break
            j += 1
        inner, inner_weight = text[i + 1:j], weight * 1.1
        colon = inner.rfind(":")
        if colon > 0:
            try:
                inner_weight = float(inner[colon + 1:])
                inner = inner[:colon]
            except ValueError:
                pass
        out += _weighted(inner, inner_weight)
        i = j + 1
    return out


def layout_rows(groups: list[list[tuple[int, float]]], length: int, start: int, end: int,
                pad: int) -> list[list[tuple[int, float]]]:
    """Token groups (one per weighted segment) -> rows of `length` (token, weight): start, tokens, end,
    padding. A group that does not fit the row: under LARGE_GROUP tokens it moves whole to the next row
    (this one is closed and padded), otherwise it is split."""
    rows, row = [], [(start, 1.0)]
    for group in groups:
        large = len(group) >= LARGE_GROUP
        while group:
            room = length - 1 - len(row)
            if len(group) <= room:
                row += group
                break
            if large:
                row += group[:room] + [(end, 1.0)]
                group = group[room:]
            else:
                row += [(end, 1.0)] + [(pad, 1.0)] * room
            rows.append(row)
            row = [(start, 1.0)]
    row.append((end, 1.0))
    rows.append(row + [(pad, 1.0)] * (length - len(row)))
    return rows


# ---------------------------------------------------------------------------------------------------------
# the network (module names as transformers' CLIPTextModel below text_model., so that layout's keys load as they are)

class _Embeddings(nn.Module):
    def __init__(self, vocab: int, positions: int, width: int):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, width)
        self.position_embedding = nn.Embedding(positions, width)


class _SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj = nn.Linear(width, width), nn.Linear(width, width)
        self.v_proj, self.out_proj = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, T, w], causal
        b, t, w = x.shape
        q, k, v = (p(x).view(b, t, self.heads, w // self.heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # square: top-left causal is right
        return self.out_proj(out.transpose(1, 2).reshape(b, t, w))


class _MLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        return self.fc2(x * torch.sigmoid(1.702 * x))  # QuickGELU


class _Layer(nn.Module):
    def __init__(self, width: int, heads: int, hidden: int):
        super().__init__()
        self.layer_norm1, self.layer_norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.self_attn, self.mlp = _SelfAttention(width, heads), _MLP(width, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class _Encoder(nn.Module):
    def __init__(self, layers: int, width: int, heads: int, hidden: int):
        super().__init__()
        self.layers = nn.ModuleList(_Layer(width, heads, hidden) for _ in range(layers))


def _shapes(canon: dict[str, torch.Tensor], source: str) -> tuple[int, int, int, int, int]:
    """(vocab, positions, width, layers, hidden) from the tensors' shapes."""
    needed = ("embeddings.token_embedding.weight", "embeddings.position_embedding.weight",
              "encoder.layers.0.mlp.fc1.weight")
    missing = [k for k in needed if k not in canon]
    if missing:
        raise ClipTextError(f"{source}: cannot read the text encoder's shape, missing {', '.join(missing)} "
                            f"(canonical names; found e.g. {', '.join(sorted(canon)[:4]) or 'nothing'})")
    vocab, width = canon[needed[0]].shape
    positions = canon[needed[1]].shape[0]
    hidden = canon[needed[2]].shape[0]
    layers = 1 + max(int(m.group(1)) for k in canon if (m := re.match(r"encoder\.layers\.(\d+)\.", k)))
    return vocab, positions, width, layers, hidden


class ClipTextEncoder(nn.Module):
    """A CLIP text transformer that encodes prompts as ComfyUI's CLIP Text Encode does (see the module doc)."""

    def __init__(self, vocab: int, positions: int, width: int, layers: int, hidden: int,
                 tokenizer: ClipTokenizer, name: str = "clip_l"):
        super().__init__()
        if width % HEAD_WIDTH:
            raise ClipTextError(f"{name}: CLIP width {width} is not a multiple of {HEAD_WIDTH} (heads = width / 64)")
        if positions < LARGE_GROUP + 2:
            raise ClipTextError(f"{name}: {positions} positions; ComfyUI's row layout needs at least {LARGE_GROUP + 2}")
        if tokenizer.size != vocab:
            raise ClipTextError(f"{name}: the text encoder has {vocab} token embeddings but the vocabulary has "
                                f"{tokenizer.size} tokens")
        self.name, self.width, self.length, self.tokenizer = name, width, positions, tokenizer
        self.embeddings = _Embeddings(vocab, positions, width)
        self.encoder = _Encoder(layers, width, width // HEAD_WIDTH, hidden)
        self.final_layer_norm = nn.LayerNorm(width)

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor], layout: str, name: str, *,
                        vocabulary: str | os.PathLike | None = None,
                        weight_dtype: torch.dtype | None = torch.float16) -> ClipTextEncoder:
        """A file's tensors in one of CLIP_LAYOUTS -> the encoder. weight_dtype: the precision ComfyUI keeps
        the weights in (float16 by default; None keeps the file's); computing is in float32 either way.
        vocabulary: CLIP's BPE merge list (default: find_vocabulary())."""
        source = f"{name} (CLIP text encoder, {layout} layout)"
        canon = _canonical(tensors, layout)
        vocab, positions, width, layers, hidden = _shapes(canon, source)
        if layers > FIRST_BIG_LAYER:
            raise ClipTextError(f"{source} has {layers} layers: ComfyUI reads a text encoder with more than "
                                f"{FIRST_BIG_LAYER} layers as CLIP-H or CLIP-G (SD 2 / SDXL), whose conditioning is "
                                f"not SD1's CLIP-L one; only SD1 CLIP-L (12 layers) is reproduced here")
        path = find_vocabulary(vocabulary)
        merges = _read_merges(str(path))
        wanted = vocab - 2 * BYTE_SYMBOLS - 2
        if wanted < 0 or len(merges) < wanted:
            raise ClipTextError(f"{source} has {vocab} token embeddings, which needs {wanted} BPE merges, but the "
                                f"CLIP vocabulary {path} has {len(merges)}")
        model = cls(vocab, positions, width, layers, hidden, ClipTokenizer(merges[:wanted], str(path)), name)

        def stored(v: torch.Tensor) -> torch.Tensor:
            return (v.to(weight_dtype) if weight_dtype is not None else v).float() if v.is_floating_point() else v
        load_strict(model, {k: stored(v) for k, v in canon.items()}, source)
        return model

    def tokenize(self, prompt: str) -> tuple[list[list[int]], list[list[float]]]:
        """A prompt -> its rows of `length` token ids and their weights, as ComfyUI lays them out."""
        return self.tokenizer.rows(prompt, self.length)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [N, T] -> last layer after the final LayerNorm, [N, T, width] float32."""
        x = self.embeddings.token_embedding(ids) + self.embeddings.position_embedding.weight[:ids.shape[1]]
        for layer in self.encoder.layers:
            x = layer(x)
        return self.final_layer_norm(x)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        """prompts -> [B, length * rows, width] float32 on the module's device: for each prompt, what
        ComfyUI's CLIP Text Encode puts in its CONDITIONING tensor."""
        if isinstance(prompts, str):
            raise ClipTextError("encode takes a list of prompts, not one string")
        laid = [self.tokenize(p) for p in prompts]
        counts = sorted({len(ids) for ids, _ in laid})
        if len(counts) > 1:
            rows = ", ".join(f"{p[:40]!r}: {len(ids)}" for p, (ids, _) in zip(prompts, laid))
            raise ClipTextError(f"these prompts need different numbers of {self.length}-token rows ({rows}), so "
                                f"their features have different lengths; encode them separately")
        if not laid:
            return torch.zeros(0, self.length, self.width, device=self.final_layer_norm.weight.device)
        device = self.final_layer_norm.weight.device
        ids = torch.tensor([row for rows, _ in laid for row in rows], dtype=torch.long, device=device)
        weights = torch.tensor([row for _, rows in laid for row in rows], dtype=torch.float32, device=device)
        weighted = bool((weights != 1.0).any())
        if weighted:  # the prompt-free row: start, end, padding
            empty = [self.tokenizer.start, self.tokenizer.end] + [self.tokenizer.end] * (self.length - 2)
            ids = torch.cat([ids, torch.tensor([empty], dtype=torch.long, device=device)])
        z = torch.cat([self(ids[i:i + ENCODE_ROWS]).float() for i in range(0, len(ids), ENCODE_ROWS)])
        if weighted:
            z, empty_z = z[:-1], z[-1]
            w = weights[..., None]
            z = torch.where(w != 1.0, (z - empty_z) * w + empty_z, z)
        return z.reshape(len(prompts), counts[0] * self.length, self.width)
