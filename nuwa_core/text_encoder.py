"""Text encoders: a prompt -> per-token features [T, width] for cross-attention (the NUWA-Infinity
renderer's `text_dim`, the NUWA-XL MTD's `context_dim`).

`load_text_encoder(path)` reads either kind the pack trains with, by the file's layout:
- the pack's own small encoder (`nuwa_kind` "nuwa_text_encoder", `python -m nuwa_core.train text`):
  a word-level transformer whose vocabulary is stored in the file, trained here on captioned real
  images (see training/text.py). It needs no download and no tokenizer files.
- a CLIP-L text encoder in one of ComfyUI's layouts (clip_text_encoder.py): what stock CLIP Text
  Encode computes, so a model trained on it reads the same features at use time.

Why a word-level encoder: the shipped text models are trained on a few dozen captions over a
vocabulary of a dozen words. Sub-word BPE and a 49k-token table would be almost all unused weight;
a learned embedding per word, a small transformer for word order ("a blue sky over the sea" vs
"a sea over the blue sky") and a final LayerNorm are enough, and the file is about 0.2 MB.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch
from torch import nn

from .attention import attention
from .checkpoint import config_from_json, load_state_dict, load_strict, save_model_file, sha256_file

TEXT_ENCODER_KIND = "nuwa_text_encoder"
SPECIALS = ("<pad>", "<start>", "<end>", "<unk>")
PAD, START, END, UNK = range(len(SPECIALS))


class TextEncoderError(ValueError):
    pass


def words(prompt: str) -> list[str]:
    """Lower-case words (letters, digits, apostrophes); punctuation and spacing do not matter."""
    return re.findall(r"[a-z0-9']+", prompt.lower())


@dataclasses.dataclass
class WordTextConfig:
    vocab: tuple = ()             # the known words; ids start after SPECIALS
    context_length: int = 16      # T: start + words + end, padded
    width: int = 64
    layers: int = 2
    heads: int = 4


class _Block(nn.Module):
    """Pre-LN transformer block over the prompt's tokens (bidirectional; padding masked)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x, mask):  # x [B, T, w], mask [B, 1, 1, T] (True = attend)
        b, t, w = x.shape
        q, k, v = self.qkv(self.ln_1(x)).view(b, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(attention(q, k, v, mask).transpose(1, 2).reshape(b, t, w))
        return x + self.mlp(self.ln_2(x))


class WordTextEncoder(nn.Module):
    """Word ids [B, T] -> features [B, T, width]: embeddings + positions, `layers` blocks, final LayerNorm."""

    def __init__(self, config: WordTextConfig, name: str = "nuwa_text"):
        super().__init__()
        if config.width % config.heads:
            raise TextEncoderError(f"text encoder width {config.width} is not divisible by heads {config.heads}")
        self.config, self.name = config, name
        self.index = {w: i + len(SPECIALS) for i, w in enumerate(config.vocab)}
        self.token_embedding = nn.Embedding(len(SPECIALS) + len(config.vocab), config.width)
        self.positional_embedding = nn.Parameter(torch.randn(config.context_length, config.width) * 0.02)
        self.blocks = nn.ModuleList(_Block(config.width, config.heads) for _ in range(config.layers))
        self.ln_final = nn.LayerNorm(config.width)

    @property
    def width(self) -> int:
        return self.config.width

    def unknown_words(self, prompt: str) -> list[str]:
        return [w for w in words(prompt) if w not in self.index]

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """-> ids [B, T]: start, the words (unknown ones as <unk>), end, padding."""
        ids = torch.full((len(prompts), self.config.context_length), PAD, dtype=torch.long)
        for n, prompt in enumerate(prompts):
            ws = words(prompt)
            if not ws:
                raise TextEncoderError(f"prompt {prompt!r} has no words: describe the picture (e.g. "
                                       f"{' '.join(self.config.vocab[:4])!r}), or leave the prompt out for an "
                                       f"unconditional canvas")
            if len(ws) > self.config.context_length - 2:
                raise TextEncoderError(f"prompt {prompt!r} has {len(ws)} words; this text encoder ({self.name}) "
                                       f"reads at most {self.config.context_length - 2}")
            row = [START, *(self.index.get(w, UNK) for w in ws), END]
            ids[n, :len(row)] = torch.tensor(row)
        return ids

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(ids) + self.positional_embedding[:ids.shape[1]]
        mask = (ids != PAD)[:, None, None, :]
        for block in self.blocks:
            x = block(x, mask)
        return self.ln_final(x)

    @staticmethod
    def pooled(features: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The end token's feature [B, width] (the whole prompt, as CLIP pools it)."""
        return features[torch.arange(ids.shape[0], device=ids.device), (ids == END).int().argmax(1)]

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        """prompts -> [B, T, width] float32 on the encoder's device."""
        ids = self.tokenize(list(prompts)).to(self.positional_embedding.device)
        return self(ids).float()

    def save(self, path, dtype: torch.dtype | None = None) -> None:
        save_model_file(path, self.state_dict(), TEXT_ENCODER_KIND, self.config, dtype=dtype)


def text_encoder_layouts() -> dict[str, str]:
    from .clip_text_encoder import CLIP_LAYOUTS
    return {"nuwa_text_encoder": "the pack's word-level text encoder (python -m nuwa_core.train text)", **CLIP_LAYOUTS}


def load_text_encoder(path, allow_pickle: bool = False) -> nn.Module:
    """Any accepted text-encoder file -> an encoder with `.name`, `.width` and `.encode(prompts)` ([B, T, width])."""
    path = Path(path)
    tensors, meta = load_state_dict(path, allow_pickle=allow_pickle)
    if meta.get("nuwa_kind") == TEXT_ENCODER_KIND:
        config = config_from_json(WordTextConfig, meta["config"])
        config.vocab = tuple(config.vocab)
        encoder = WordTextEncoder(config, path.stem)
        load_strict(encoder, {k: v.float() for k, v in tensors.items()}, str(path))
    else:
        from .clip_text_encoder import ClipTextEncoder, clip_layout
        layout = clip_layout(tensors.keys())
        if layout is None:
            accepted = "; ".join(f"{k}: {v}" for k, v in text_encoder_layouts().items())
            raise TextEncoderError(f"{path.name} is not a text encoder in a layout this pack reads "
                                   f"({meta.get('nuwa_kind') or 'no nuwa_kind'}, e.g. key "
                                   f"{next(iter(tensors), '-')!r}). Accepted layouts: {accepted}")
        encoder = ClipTextEncoder.from_state_dict(tensors, layout, path.stem)
    encoder.sha256 = sha256_file(path)  # which version of the file: a retrained one may keep its name
    return encoder.eval().requires_grad_(False)


def describe(encoder: nn.Module) -> dict:
    """What a model trained on `encoder` (from load_text_encoder) records about it, to check prompts against
    at use time: name, width and the file's sha256."""
    return {"name": encoder.name, "width": encoder.width, "sha256": encoder.sha256}


def different_file(made_by: dict, trained_with: dict | None) -> str | None:
    """Why a prompt's encoder is not the one a model was trained with ({"name", "sha256"} each), or None."""
    if not made_by.get("name") or not (trained_with or {}).get("name"):
        return None
    if made_by["name"] != trained_with["name"]:
        return f"the prompt comes from the text encoder {made_by['name']}, but the model was trained with " \
               f"{trained_with['name']}: load {trained_with['name']} in NUWA Text Encoder Loader"
    if made_by.get("sha256") and trained_with.get("sha256") and made_by["sha256"] != trained_with["sha256"]:
        return f"the prompt comes from a text encoder file named {made_by['name']} that is not the one the model " \
               f"was trained with (sha256 {made_by['sha256'][:12]}... vs {trained_with['sha256'][:12]}...): the " \
               f"encoder was retrained or replaced; use the file the model was trained with, or retrain the model"
    return None
