"""The `bundle` stage: swap a fine-tuned decoder (`vqgan --train decoder --init`) into a trained
NUWA-Infinity bundle, refusing a tokenizer that makes other tokens than the bundle's."""
from __future__ import annotations

import sys

import torch

from ..checkpoint import stored_dtype
from ..infinity.generation import NuwaInfinity
from ..infinity.vqgan import VQModel, load_vqgan
from .loop import TrainingError


def token_tensors_that_differ(a: VQModel, b: VQModel, dtype: torch.dtype) -> list[str]:
    """Names of the encoder / quant_conv / codebook tensors that differ between two tokenizers at
    `dtype` (a bundle's storage precision): empty when both make the same tokens."""
    ours, theirs = a.state_dict(), b.state_dict()
    return [k for k in ours if k.startswith(("encoder.", "quant_conv.", "quantize."))
            and not torch.equal(ours[k].to(dtype), theirs[k].to(dtype))]


def assemble_bundle(args) -> dict:
    """A trained bundle with its tokenizer replaced by one that makes the same tokens (a decoder
    fine-tuned with `vqgan --train decoder`): its encoder and codebook must equal the bundle's."""
    model = NuwaInfinity.load(args.model)
    vq = load_vqgan(args.tokenizer).float()
    if vq.config != model.vqgan.config:
        raise TrainingError(f"{args.tokenizer} is a VQGAN of another configuration than {args.model}'s "
                            f"tokenizer ({vq.config} vs {model.vqgan.config})")
    saved_dtype = stored_dtype(args.model)
    changed = token_tensors_that_differ(model.vqgan, vq, saved_dtype)
    if changed:
        raise TrainingError(f"{args.tokenizer} makes other tokens than {args.model}'s tokenizer ({len(changed)} "
                            f"encoder/codebook tensors differ, e.g. {changed[0]}); its renderer would not fit. "
                            f"Only a decoder fine-tuned with `vqgan --train decoder --init` can be swapped in")
    NuwaInfinity(vq, model.renderer, model.text_encoder).save(args.out, dtype=saved_dtype)
    print(f"[train] bundle: {args.model}'s renderer with {args.tokenizer}'s tokenizer -> {args.out}", file=sys.stderr)
    return {"stopped": "done", "out": str(args.out)}


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="the trained NUWA-Infinity bundle")
    p.add_argument("--tokenizer", required=True, help="a VQGAN from `vqgan --train decoder --init` of its tokenizer")
    p.add_argument("--out", required=True)


def run(args) -> dict:
    return assemble_bundle(args)
