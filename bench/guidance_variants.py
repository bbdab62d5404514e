"""Two variants of classifier-free guidance, measured by bench/text_following.py (issue 14: the sky).

The template's guidance 5 draws the ground the prompt names but smooths the blue sky's clouds away,
and EfficientNet then reads the sky as the fog (README, Prompts). Each variant replaces
patch_samplers.guided for one run of the text-following bench (same rows, controls and seeds):

  entropy   u + g (c - u), then per token the temperature that gives it the entropy of the
            conditional distribution c (bisection on the log temperature, kept within e^-1..e^2):
            guidance moves the distribution without sharpening it
  ramp      guidance ramped over the plan, as Muse and MAR schedule it: patch i of N is guided at
            1 + (g - 1) i / (N - 1), so the first patches (the sky row) are drawn nearly unguided
  projected adaptive projected guidance (APG, Sadat et al. 2024) on the logits: the update c - u
            (both centred over the vocabulary) split into its part along c, which only sharpens c,
            and the rest; c + (g - 1) (orthogonal part + eta x parallel part), eta 0 unless --eta E
  support   plain guidance, drawn only among the tokens the conditional distribution c itself gives at
            least epsilon (the template's 0.01, or --epsilon E) instead of those the guided one does
            (the run's own epsilon filter is switched off)
  attention the text's cross-attention output scaled by g in every layer, and the logits of that
            pass sampled as they are: the prompt's pull made stronger inside the network instead of
            by extrapolating the logits (the guided batch's text-free half is run and unused)

None is in the package (none lifted the sky without losing the ground).

    python bench/guidance_variants.py entropy|ramp|projected|support|attention [--eta E] [--epsilon E]
        [text_following.py's options, e.g. --seeds 2 --guidance 5]
"""
from __future__ import annotations

import argparse
import functools
import runpy
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nuwa_core.infinity import generation, patch_samplers, renderer


def entropy(logits: torch.Tensor) -> torch.Tensor:
    return -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)


def entropy_matched(logits: torch.Tensor, settings) -> torch.Tensor:
    if settings.guidance == 1.0:
        return logits
    cond, uncond = logits.float().chunk(2)
    guided = uncond + settings.guidance * (cond - uncond)
    target = entropy(cond)[..., None]
    low, high = torch.full_like(target, -1.0), torch.full_like(target, 2.0)  # log temperature in [e^-1, e^2]
    for _ in range(16):
        mid = (low + high) / 2
        too_sharp = entropy(guided / mid.exp())[..., None] < target
        low, high = torch.where(too_sharp, mid, low), torch.where(too_sharp, high, mid)
    return guided / ((low + high) / 2).exp()


class Ramp:
    """Where each patch of the running plan stands in it, read from generate() and the wave's contexts."""

    def __init__(self):
        self.index, self.count, self.drawn = {}, 1, []
        generate, context = generation.NuwaInfinity.generate, generation.PatchBatch.context

        def planned(model, state, plan, *args, **kwargs):
            coords = [c for segment in plan.segments for c in segment.patches]
            self.index, self.count = {c: i for i, c in enumerate(coords)}, len(coords)
            return generate(model, state, plan, *args, **kwargs)

        def wave(rows, selections):
            self.drawn = [c for c, _ in selections]  # this wave's patches, in the batch's row order
            return context(rows, selections)

        generation.NuwaInfinity.generate, generation.PatchBatch.context = planned, wave

    def __call__(self, logits: torch.Tensor, settings) -> torch.Tensor:
        if settings.guidance == 1.0:
            return logits
        cond, uncond = logits.float().chunk(2)  # rows: patch-major, then canvas (renderer.patch_rows)
        share = torch.tensor([self.index[c] / max(self.count - 1, 1) for c in self.drawn], device=cond.device)
        scale = 1 + (settings.guidance - 1) * share.repeat_interleave(cond.shape[0] // len(share))
        return uncond + scale.view(-1, *(1,) * (cond.ndim - 1)) * (cond - uncond)


def projected(logits: torch.Tensor, settings, eta: float = 0.0) -> torch.Tensor:
    """eta: the weight of the update's part along c (1: plain guidance); --eta sets it."""
    if settings.guidance == 1.0:
        return logits
    cond, uncond = logits.float().chunk(2)
    cond, uncond = cond - cond.mean(-1, keepdim=True), uncond - uncond.mean(-1, keepdim=True)
    update = cond - uncond
    along = (update * cond).sum(-1, keepdim=True) / (cond * cond).sum(-1, keepdim=True).clamp_min(1e-12) * cond
    return cond + (settings.guidance - 1) * (update - along + eta * along)


def support(logits: torch.Tensor, settings, epsilon: float = patch_samplers.EPSILON_DEFAULT) -> torch.Tensor:
    """epsilon: the floor under c (--epsilon). (At the bench's temperature 1.) Unguided rows get the same
    floor, so they draw as the template's do."""
    cond, uncond = logits.float().chunk(2) if settings.guidance != 1.0 else (logits.float(), None)
    probs = cond.softmax(-1)
    floor = probs.amax(-1, keepdim=True).clamp(max=epsilon)  # c's most likely token stays
    drawn = cond if uncond is None else uncond + settings.guidance * (cond - uncond)
    return drawn.masked_fill(probs < floor, float("-inf"))


class ScaledAttention:
    """Renderer.text_kv's guided batch with the text half's gate g (the text-free half's stays 0),
    and `guided` returning that half's logits."""

    def __init__(self, scale: float):
        # every guided row of the bench runs at its --guidance; text_kv is made before any logits
        self.scale = scale
        text_kv = renderer.Renderer.text_kv

        def scaled(model, text, with_null=False):
            layers = text_kv(model, text, with_null)
            if not with_null:
                return layers
            return [(k, v, gate * self.scale) for k, v, gate in layers]

        renderer.Renderer.text_kv = scaled

    def __call__(self, logits: torch.Tensor, settings) -> torch.Tensor:
        return logits if settings.guidance == 1.0 else logits.float().chunk(2)[0]


def main() -> None:
    variants = {"entropy": lambda o: entropy_matched, "ramp": lambda o: Ramp(),
                "projected": lambda o: functools.partial(projected, eta=o.eta),
                "support": lambda o: functools.partial(support, epsilon=o.epsilon),
                "attention": lambda o: ScaledAttention(o.guidance)}
    if len(sys.argv) < 2 or sys.argv[1] not in variants:
        raise SystemExit(f"usage: python bench/guidance_variants.py {{{'|'.join(variants)}}} [text_following options]")
    # this script's options are taken out; the rest (--guidance too, read here and left in) go to the bench
    own = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    own.add_argument("--eta", type=float, default=0.0)
    own.add_argument("--epsilon", type=float, default=patch_samplers.EPSILON_DEFAULT)
    options, rest = own.parse_known_args(sys.argv[2:])
    bench = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    bench.add_argument("--guidance", type=float, default=5.0)  # text_following.py's default
    options.guidance = bench.parse_known_args(rest)[0].guidance
    if sys.argv[1] == "support":  # the bench reads the floor when it runs: `support` applies it instead
        patch_samplers.EPSILON_DEFAULT = 0.0
    patch_samplers.guided = variants[sys.argv[1]](options)
    sys.argv = [str(ROOT / "bench" / "text_following.py")] + rest
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
