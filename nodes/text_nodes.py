"""Prompts for models trained with the pack's own text encoder: NUWA Text Encoder Loader and NUWA Text Encode.

Text encoders (`python -m nuwa_core.train text`, nuwa_kind "nuwa_text_encoder") live in the `text_encoders`
folder of the "nuwa" model folder: ComfyUI/models/nuwa/text_encoders, the pack's models/nuwa/text_encoders
(where the shipped one is), and any `nuwa_text_encoders:` folder of extra_model_paths.yaml. Models trained
on ComfyUI's CLIP-L take stock CLIP Text Encode instead.
"""
from __future__ import annotations

from pathlib import Path

from . import _comfy

CATEGORY = "NUWA/Prompts"
SUBFOLDER = "text_encoders"
FOLDER = "nuwa_text_encoders"
DEFAULT_TEXT_ENCODER = "nuwa_text_scenes.safetensors"

_comfy.register_subfolder(SUBFOLDER, FOLDER)


def list_text_encoders() -> list[str]:
    names = _comfy.list_subfolder(SUBFOLDER, FOLDER)
    return [DEFAULT_TEXT_ENCODER] + [n for n in names if n != DEFAULT_TEXT_ENCODER]


def text_encoder_path(name: str) -> Path:
    from nuwa_core.weights import find_model_file
    return find_model_file(name, _comfy.subfolder_paths(SUBFOLDER, FOLDER))


class NUWATextEncoderLoader:
    DESCRIPTION = ("Loads a NUWA text encoder (the pack's small word-level encoder, trained with `python -m "
                   "nuwa_core.train text`) for NUWA Text Encode. The shipped one knows the words of its captions, "
                   "e.g. 'a sunset sky over the sea'.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("NUWA_TEXT_ENCODER",)
    RETURN_NAMES = ("text_encoder",)
    OUTPUT_TOOLTIPS = ("The text encoder; feed it to NUWA Text Encode.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text_encoder_name": (list_text_encoders(), {
            "default": DEFAULT_TEXT_ENCODER,
            "tooltip": "Text encoder file in models/nuwa/text_encoders; use the one the model was trained with."})}}

    def load(self, text_encoder_name):
        from nuwa_core.text_encoder import load_text_encoder
        return (load_text_encoder(text_encoder_path(text_encoder_name)),)


class NUWATextEncode:
    DESCRIPTION = ("Encodes a prompt with a NUWA text encoder into stock CONDITIONING, for the Patch Renderer and "
                   "the NUWA-XL nodes of models trained with that encoder. Words the encoder never saw are "
                   "read as unknown (listed in the log).")
    CATEGORY = CATEGORY
    FUNCTION = "encode"
    RETURN_TYPES = ("CONDITIONING",)
    RETURN_NAMES = ("conditioning",)
    OUTPUT_TOOLTIPS = ("[[features [1, tokens, width], {'nuwa_text_encoder': name, 'nuwa_text_encoder_sha256': ...}]]",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text_encoder": ("NUWA_TEXT_ENCODER", {"tooltip": "From NUWA Text Encoder Loader."}),
            "text": ("STRING", {"multiline": True, "dynamicPrompts": True, "default": "a blue sky over a green meadow",
                                "tooltip": "The prompt, in the words the encoder was trained on."}),
        }}

    def encode(self, text_encoder, text):
        if not text.strip():
            raise ValueError("NUWA Text Encode: the prompt is empty; describe the picture (e.g. 'a blue sky over the "
                             "sea'), or leave the renderer's conditioning unconnected for an unprompted canvas")
        unknown = getattr(text_encoder, "unknown_words", lambda _: [])(text)
        if unknown:
            vocab = ", ".join(text_encoder.config.vocab)
            _comfy.log.warning("NUWA Text Encode: %s does not know %s (read as unknown); it knows: %s",
                               text_encoder.name, ", ".join(repr(w) for w in unknown), vocab)
        features = text_encoder.encode([text]).to(_comfy.intermediate_device())
        tags = {"nuwa_text_encoder": text_encoder.name}
        if getattr(text_encoder, "sha256", None):
            tags["nuwa_text_encoder_sha256"] = text_encoder.sha256
        return ([[features, tags]],)


NODE_CLASS_MAPPINGS = {"NUWATextEncoderLoader": NUWATextEncoderLoader, "NUWATextEncode": NUWATextEncode}
NODE_DISPLAY_NAME_MAPPINGS = {"NUWATextEncoderLoader": "NUWA Text Encoder Loader", "NUWATextEncode": "NUWA Text Encode"}
