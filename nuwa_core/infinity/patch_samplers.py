"""Local decoders: fill one patch given its context (NUWA-Infinity Table 7a; appendix A).

Every sampler is a plain function with one signature:

    sample(renderer, context, order, text_kv, batch, settings, generator) -> (tokens [B, M], cache [L, B, M, d])

With classifier-free guidance (settings.guidance != 1) the batch is [with text; without text]: every
sampler draws the first half's tokens from the guided logits (`guided`) and returns them for both halves.

tokens and cache in raster order; the cache is what the patch adds to the pool (the one
`Renderer.encode` makes). `generator` is a CPU generator: every random draw is made on the CPU and
moved to the model's device, so a seed gives the same tokens on CPU, CUDA and MPS (up to the
logits' float rounding). The schedules (`cosine_schedule`, `gumbel_temperature`) and the logit
filters are kept apart from the network, as in MaskGIT.

    ar:   token by token with a preallocated KV cache; temperature, top-k (paper: 768), top-p.
    nar:  one parallel pass, gumbel sampling.
    pnar: MaskGIT: cosine schedule, confidence = log p + t_g * gumbel, the gumbel temperature
          t_g annealed linearly 4.5 -> 1.0 over the steps (appendix A; `gumbel_temperature`),
          tokens already fixed never re-masked.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .arbitrary_direction_controller import Order
from .renderer import Context, Renderer, TokenStep

# epsilon of the user-facing entry points (the Render node, the demo): with the shipped 512-code
# model, a token must be 5x as likely as a uniform pick. The core default stays 0 (the paper's top-k only).
EPSILON_DEFAULT = 0.01


@dataclass
class SamplerSettings:
    decoder: str = "auto"        # auto (the renderer's own) | ar | nar | pnar
    temperature: float = 1.0
    top_k: int = 768             # 0 disables; the paper's AR setting
    top_p: float = 1.0           # 1.0 disables
    epsilon: float = 0.0         # drop tokens less likely than this (0 disables); see filter_logits
    steps: int = 8               # pnar iterations
    gumbel_start: float = 4.5    # pnar gumbel temperature, annealed linearly...
    gumbel_end: float = 1.0      # ...to this at the last step
    guidance: float = 1.0        # classifier-free guidance scale (1 = off); see `guided`
    candidates: int = 1          # draws per patch, the best kept (neighbours + agreement + border: candidate_patches.py)

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.epsilon < 1:
            raise ValueError(f"epsilon is a probability in [0, 1), got {self.epsilon}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not isinstance(self.candidates, int) or self.candidates < 1:
            raise ValueError(f"candidates (draws per patch, the best kept) must be a whole number >= 1, "
                             f"got {self.candidates!r}")
        if self.guidance < 0:
            raise ValueError(f"guidance must be >= 0 (1 = off, 0 = ignore the prompt), got {self.guidance}")


def guided(logits: torch.Tensor, settings: SamplerSettings) -> torch.Tensor:
    """Classifier-free guidance: with guidance g != 1 the batch is [with text; without text] (2B rows,
    `Renderer.text_kv(with_null=True)`) -> the B rows u + g (c - u); else the logits as they are."""
    if settings.guidance == 1.0:
        return logits
    cond, uncond = logits.float().chunk(2)
    return uncond + settings.guidance * (cond - uncond)


def both_halves(tokens: torch.Tensor, settings: SamplerSettings) -> torch.Tensor:
    """The B sampled rows for both halves of a guided batch (the same tokens with and without text)."""
    return tokens if settings.guidance == 1.0 else tokens.repeat(2, *(1,) * (tokens.ndim - 1))


def sampled_rows(batch: int, settings: SamplerSettings) -> int:
    """Rows a sampler draws tokens for: all of them, or a guided batch's first half (`guided`)."""
    return batch if settings.guidance == 1.0 else batch // 2


def filter_logits(logits: torch.Tensor, settings: SamplerSettings) -> torch.Tensor:
    """Scale by temperature, keep the tokens at least `epsilon` likely, then the top-k, then the
    top-p nucleus; others get -inf (the most likely token always stays). [.., V]

    epsilon is a probability under the model's own (temperature-scaled) distribution over the
    whole vocabulary, so it is applied before top-k: after it, top-k's renormalised mass would
    lift a floor token above epsilon.

    epsilon sampling (Hewitt et al. 2022, "Truncation sampling as language model desmoothing"): a
    renderer trained with label smoothing a over V codes gives every code at least about a / V, a
    floor that top-k alone still samples from (a = 0.15, V = 512: 2.9e-4 per code, ~3% of the
    mass of a top-100); a patch of 64 tokens then picks a couple of codes the model never meant.
    """
    if settings.temperature != 1.0:
        logits = logits / settings.temperature
    top_k, top_p = settings.top_k, settings.top_p
    if settings.epsilon > 0:
        probs = logits.softmax(-1)
        floor = probs.amax(-1, keepdim=True).clamp_(max=settings.epsilon)  # the most likely token stays
        logits = logits.masked_fill(probs < floor, float("-inf"))
        if top_k * settings.epsilon >= 1:  # at most 1/epsilon tokens are epsilon likely: all in the top-k
            top_k = 0
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1, sorted=False).values.amin(-1, keepdim=True)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    return logits


class PatchStreams:
    """The random streams of a batch of patches: one CPU generator per patch, each drawing the rows
    of its own patch (rows [p*B:(p+1)*B] of what is sampled; renderer.patch_rows), so the noise a
    patch gets does not depend on which patches share its batch. Pass it where a generator goes."""

    def __init__(self, generators: list[torch.Generator]):
        self.generators = list(generators)

    def rand(self, shape) -> torch.Tensor:
        rows, p = shape[0], len(self.generators)
        if rows % p:
            raise ValueError(f"{rows} rows cannot be shared by {p} patch streams")
        return torch.cat([torch.rand((rows // p, *shape[1:]), generator=g, dtype=torch.float32)
                          for g in self.generators])


def gumbel_noise(shape, generator, device) -> torch.Tensor:
    """Standard Gumbel noise of `shape` on `device`, drawn on the CPU and then moved.

    The uniform draw and its transform both run on the CPU (as ComfyUI makes its noise), so a seed
    gives the same noise, bit for bit, whatever device the model runs on; `generator` must be a CPU
    generator (None: torch's default one) or PatchStreams (split along the first axis).
    """
    if isinstance(generator, PatchStreams):
        u = generator.rand(tuple(shape))
    else:
        u = torch.rand(tuple(shape), generator=generator, dtype=torch.float32)
    u.clamp_(1e-20, 1.0 - 1e-7)
    return (-torch.log(-torch.log(u))).to(device)


def sample_categorical(logits: torch.Tensor, generator) -> torch.Tensor:
    """One draw per row by the gumbel-max trick (reproducible with a CPU generator): the noise is the
    same on every device, so only the logits' float rounding can change a token. [.., V] -> [..]"""
    return (logits.float() + gumbel_noise(logits.shape, generator, logits.device)).argmax(-1)


NOISE_CHUNK = 1 << 18  # floats per row the AR sampler draws at once (a fixed share of the patch's tokens)


def ar_noise(generator, rows: int, m: int, vocab: int, device):
    """The gumbel noise of a patch's M token draws, one [rows, V] per call of the function returned,
    drawn a chunk of tokens at a time (one CPU draw and one copy to the device per chunk, not per
    token). The chunk depends only on (M, V), so a patch consumes its stream the same way in any
    batch and any schedule."""
    chunk = max(1, min(m, NOISE_CHUNK // vocab))
    draws = (token for start in range(0, m, chunk)  # rows first: PatchStreams splits rows by patch
             for token in gumbel_noise((rows, min(chunk, m - start), vocab), generator, device).unbind(1))
    return lambda: next(draws)


def cosine_schedule(ratio: float) -> float:
    """Fraction of tokens still masked after a fraction `ratio` of the P-NAR steps."""
    return math.cos(math.pi / 2 * ratio)


def gumbel_temperature(ratio: float, settings: SamplerSettings) -> float:
    """P-NAR confidence noise temperature after a fraction `ratio` of the steps: linear from
    gumbel_start to gumbel_end (appendix A: 4.5 -> 1.0), the only annealing."""
    return settings.gumbel_start + (settings.gumbel_end - settings.gumbel_start) * ratio


@torch.no_grad()
def sample_ar(renderer: Renderer, context: Context, order: Order, text_kv, batch: int,
              settings: SamplerSettings, generator=None):
    cfg = renderer.config
    noise = ar_noise(generator, sampled_rows(batch, settings), cfg.tokens_per_patch, cfg.vocab_size,
                     renderer.pos_f.device)

    def choose(logits):
        scores = filter_logits(guided(logits, settings), settings).float() + noise()
        return both_halves(scores.argmax(-1), settings)
    tokens, cache = decode_ar(renderer, context, order, text_kv, batch, choose)
    if not cfg.transfer:
        cache = renderer.encode(tokens, order, context, text_kv)
    return tokens, cache


def check_overflow(x: torch.Tensor) -> torch.Tensor:
    """Refuse activations holding NaN or infinite values: the caches [L, B, M, d] of a batch of
    patches, and the logits the samplers draw from (the last layer's output reaches no cache), one
    check per batch. Activations that overflowed, as a model fine-tuned to large activations can in
    float16, would otherwise go on as garbage tokens and poison every later patch's context."""
    if x.device.type != "meta" and not torch.isfinite(x).all():  # a meta tensor holds no values to check
        fix = ("run the model in float32 or bfloat16 (ComfyUI: start it with --fp32-unet or --bf16-unet; "
               "nuwa_core: model.to(torch.float32))" if x.dtype == torch.float16 else
               "its weights hold non-finite or huge values: reload the model file, or retrain it")
        raise FloatingPointError(f"the renderer's activations overflowed (NaN or infinite values in its layers) "
                                 f"running in {x.dtype}: {fix}")
    return x


@torch.no_grad()
def decode_ar(renderer: Renderer, context: Context, order: Order, text_kv, batch: int, choose):
    """Token-by-token decoding; choose(logits [B, V]) -> tokens [B].

    renderer.TokenStep runs one slot (renderer module docstring) at a time through every layer,
    attending to [context; slots so far] held in preallocated key / value buffers; the context is
    projected once per patch. Slot t predicts token t; one more step after the last token runs
    slot M only as far as the last layer's input, for the cache (no head).
    """
    cfg = renderer.config
    m, n_layer = cfg.tokens_per_patch, cfg.n_layer
    perm, inv = renderer.permutation(order)
    # inference mode skips autograd's bookkeeping on each of the step's small ops (~15% of a token
    # here); what leaves it is made outside it (the indexing below), so callers get ordinary tensors
    with torch.inference_mode():
        nxt = renderer.next_positions(order)  # [M + 1, d]
        after = renderer.positions()[perm] + nxt[1:]  # [M, d] slot t+1 = tok_emb(token t) + this
        step = TokenStep(renderer, context, text_kv, batch, m + 1)
        tokens = torch.zeros(batch, m, dtype=torch.long, device=nxt.device)
        x = (renderer.order_emb.weight[order.id] + nxt[0]).expand(batch, -1)
        for t in range(m):
            logits = step.logits(step(x, t))
            token = choose(logits)
            tokens[:, t] = token
            x = torch.add(F.embedding(token, renderer.tok_emb.weight), after[t])
        check_overflow(logits)  # the last token's: an overflow in the last layer reaches no cache
        step(x, m, layers=n_layer - 1)  # slot M: the last token's cache
    cache = step.inputs[:, 1:].transpose(1, 2)  # [L, B, M, d], generation order (slot t+1 holds token t)
    return tokens[:, inv], cache[:, :, inv]


@torch.no_grad()
def sample_nar(renderer: Renderer, context: Context, order: Order, text_kv, batch: int,
               settings: SamplerSettings, generator=None):
    cfg = renderer.config
    ctx_kv = renderer.context_kv(context, room=cfg.tokens_per_patch)  # shared by the pass and the cache pass
    masked = torch.full((batch, cfg.tokens_per_patch), cfg.mask_id, dtype=torch.long, device=renderer.pos_f.device)
    logits, _ = renderer(renderer.parallel_inputs(masked, order), context, text_kv, ctx_kv)
    logits = filter_logits(guided(check_overflow(logits), settings), settings)
    tokens = both_halves(sample_categorical(logits, generator), settings)
    return tokens, renderer.encode(tokens, order, context, text_kv, ctx_kv)


@torch.no_grad()
def sample_pnar(renderer: Renderer, context: Context, order: Order, text_kv, batch: int,
                settings: SamplerSettings, generator=None):
    cfg = renderer.config
    m, device = cfg.tokens_per_patch, renderer.pos_f.device
    ctx_kv = renderer.context_kv(context, room=m)  # every step and the cache pass write their keys after it
    rows = sampled_rows(batch, settings)
    tokens = torch.full((rows, m), cfg.mask_id, dtype=torch.long, device=device)
    unknown = torch.ones(rows, m, dtype=torch.bool, device=device)
    for step in range(settings.steps):
        logits, _ = renderer(renderer.parallel_inputs(both_halves(tokens, settings), order), context, text_kv, ctx_kv)
        logits = filter_logits(guided(check_overflow(logits), settings), settings)
        sampled = torch.where(unknown, sample_categorical(logits, generator), tokens)
        ratio = (step + 1) / settings.steps
        n_unknown = int(unknown[0].sum())
        if step == settings.steps - 1 or n_unknown == 0:
            tokens = sampled
            break
        n_mask = max(1, min(n_unknown - 1, math.floor(m * cosine_schedule(ratio))))
        log_p = logits.log_softmax(-1).gather(-1, sampled[..., None])[..., 0]
        confidence = log_p + gumbel_temperature(ratio, settings) * gumbel_noise(log_p.shape, generator, device)
        confidence = confidence.masked_fill(~unknown, float("inf"))  # fixed tokens stay fixed
        cut = confidence.sort(dim=-1).values[:, n_mask - 1:n_mask]
        unknown = confidence <= cut
        tokens = sampled.masked_fill(unknown, cfg.mask_id)
    tokens = both_halves(tokens, settings)
    return tokens, renderer.encode(tokens, order, context, text_kv, ctx_kv)


SAMPLERS = {"ar": sample_ar, "nar": sample_nar, "pnar": sample_pnar}
