"""Captions for renderer training: one text-feature sequence [T, D] per training image, for the
renderer's cross-attention (`RendererConfig.text_dim` = D).

Two sources, keyed by the image's file stem:
  --text-embeddings FILE  a .safetensors with one tensor per image stem, [T, D] or [D] (read as [1, D]).
  --clip FILE             every image's same-name `.txt` caption, encoded once, up front, by an open_clip
                          text tower: architecture `--clip-model`, weights FILE (loaded strictly).

What --clip computes is what a stock ComfyUI CLIP Text Encode node hands the Patch Renderer at
inference (CONDITIONING [1, 77, 768] for SD1 CLIP-L): the per-token output of the text
transformer's last layer after its final LayerNorm, [context_length, width], with no pooling and
no text projection. Width is 768 for ViT-L-14 (use `ViT-L-14-quickgelu` with OpenAI's weights, the
SD1 text encoder) and 512 for ViT-B-32. ComfyUI pads a prompt with the end token, open_clip with 0;
under the causal mask the features up to the end token agree.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint import load_state_dict, load_strict
from .loop import TrainingError

ENCODE_BATCH = 32


def _named(items: list[str], limit: int = 8) -> str:
    return ", ".join(items[:limit]) + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def image_stems(paths: list[Path]) -> list[str]:
    stems = [p.stem for p in paths]
    twice = sorted({s for s in stems if stems.count(s) > 1})
    if twice:
        raise TrainingError(f"captions are matched to images by file name without extension, but these names "
                            f"belong to more than one image: {_named(twice)}; rename them")
    return stems


def load_text_embeddings(path: str, paths: list[Path]) -> torch.Tensor:
    """--text-embeddings: the file's tensor for every image, [n_images, T, D]."""
    if Path(path).suffix != ".safetensors":
        raise TrainingError(f"--text-embeddings {path}: expected a .safetensors file (one tensor per image stem)")
    tensors, _ = load_state_dict(path)
    stems = image_stems(paths)
    missing = [s for s in stems if s not in tensors]
    if missing:
        raise TrainingError(f"--text-embeddings {path} has no embedding for {len(missing)} training image(s): "
                            f"{_named(missing)} (keys are image file names without extension)")
    embs = {s: tensors[s][None] if tensors[s].ndim == 1 else tensors[s] for s in stems}
    bad = [f"{s} {tuple(tensors[s].shape)}" for s, e in embs.items() if e.ndim != 2]
    if bad:
        raise TrainingError(f"--text-embeddings {path}: expected [T, D] or [D] per image, got {_named(bad)}")
    shapes = sorted({tuple(e.shape) for e in embs.values()})
    if len(shapes) > 1:
        raise TrainingError(f"--text-embeddings {path}: every image needs the same [T, D] to be batched, found "
                            f"{_named([str(s) for s in shapes])}")
    return torch.stack([embs[s] for s in stems]).float()


def read_captions(paths: list[Path], flag: str = "--clip") -> list[str]:
    image_stems(paths)
    missing = [p.name for p in paths if not p.with_suffix(".txt").is_file()]
    if missing:
        raise TrainingError(f"{flag}: no caption (same-name .txt) for {len(missing)} training image(s): "
                            f"{_named(missing)}; an empty .txt trains that image without a description")
    return [p.with_suffix(".txt").read_text(encoding="utf-8").strip() for p in paths]


def encode_each(encoder, texts: list[str], paths: list[Path]) -> torch.Tensor:
    """Captions -> [n, T, D] through a text encoder (text_encoder.load_text_encoder), one at a time: every
    caption must give the same T (a CLIP caption longer than 75 tokens takes a second row of 77)."""
    feats = [encoder.encode([t]) for t in texts]
    lengths = [f.shape[1] for f in feats]
    if len(set(lengths)) > 1:
        shortest = min(lengths)
        longer = [p.name for p, n in zip(paths, lengths) if n > shortest]
        raise TrainingError(f"--text-encoder {encoder.name}: these captions encode to more tokens ({max(lengths)}) "
                            f"than the others ({shortest}): {_named(longer)}; shorten them (CLIP: 75 tokens a row)")
    return torch.cat(feats)


def _import_open_clip():
    try:
        import open_clip
    except ImportError as err:
        raise TrainingError(f"--clip needs the optional open_clip package (and torchvision): "
                            f"pip install open_clip_torch, or pip install -e '.[clip]' here ({err})") from err
    return open_clip


def _architecture(open_clip, model_name: str) -> str:
    """A built-in open_clip config name, or a .json config file (registered under its stem)."""
    if model_name.endswith(".json"):
        if not Path(model_name).is_file():
            raise TrainingError(f"--clip-model {model_name}: no such config file")
        open_clip.add_model_config(model_name)
        model_name = Path(model_name).stem
    if model_name not in open_clip.list_models():
        raise TrainingError(f"--clip-model {model_name!r} is not an open_clip architecture; e.g. ViT-B-32, "
                            f"ViT-L-14-quickgelu, or an open_clip .json config file")
    if "hf_model_name" in open_clip.get_model_config(model_name).get("text_cfg", {}):
        raise TrainingError(f"--clip-model {model_name}: its text tower comes from Hugging Face, which needs a "
                            f"download; use a CLIP-style text transformer")
    return model_name


def load_text_tower(weights: str, model_name: str, allow_pickle: bool = False):
    """-> (open_clip model without its image tower, tokenizer). The architecture is built with random
    weights (nothing downloaded), then the file's weights are loaded strictly (image keys ignored)."""
    if Path(weights).suffix != ".safetensors" and not allow_pickle:
        raise TrainingError(f"--clip {weights}: only .safetensors is read by default; a pickled .bin/.pt needs "
                            f"--clip-allow-pickle (read with torch.load(weights_only=True))")
    open_clip = _import_open_clip()
    name = _architecture(open_clip, model_name)
    model = open_clip.create_model(name, pretrained=None)
    model.visual = torch.nn.Identity()  # only the text tower is used
    tensors, _ = load_state_dict(weights)
    load_strict(model, tensors, f"--clip {weights} (open_clip {name})", drop_prefixes=("visual.",))
    return model.eval().requires_grad_(False), open_clip.get_tokenizer(name)


def _token_features(model, ids: torch.Tensor) -> torch.Tensor:
    """open_clip encode_text up to the final LayerNorm, without pooling: ids [B, T] -> [B, T, width]."""
    text = getattr(model, "text", None)
    if text is not None:  # CustomTextCLIP: its TextTransformer returns the tokens when asked
        if getattr(text, "cls_emb", None) is not None:
            raise TrainingError("--clip-model: text towers with a CLS embedding (CoCa) are not supported")
        text.output_tokens = True
        return text(ids)[1]
    x = model.token_embedding(ids) + model.positional_embedding
    batch_first = getattr(model.transformer, "batch_first", False)  # older open_clip runs [T, B, width]
    x = model.transformer(x if batch_first else x.transpose(0, 1), attn_mask=model.attn_mask)
    return model.ln_final(x if batch_first else x.transpose(0, 1))


@torch.no_grad()
def encode_captions(weights: str, model_name: str, paths: list[Path], allow_pickle: bool = False) -> torch.Tensor:
    """--clip: every image's caption -> [n_images, context_length, width]."""
    captions = read_captions(paths)
    model, tokenizer = load_text_tower(weights, model_name, allow_pickle)
    ids = tokenizer(captions)
    return torch.cat([_token_features(model, ids[i:i + ENCODE_BATCH]).float()
                      for i in range(0, len(ids), ENCODE_BATCH)])
