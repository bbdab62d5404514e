"""The rendering model: NUWA-Infinity's L-layer vision decoder, Eq. 9-13.

    p_hat, a_n = NUWA(p_n, c_n, e_n, y)

Every layer l takes the current patch's hidden states z [B, M, d] and the same-layer caches of
its context patches c^(l) [B, Nc*M, d] (selected by the Nearby Context Pool):

    Q = LN(z) Wq
    K = [LN(c^(l)); LN(z)] Wk + e          (pre-RPE: ADC.Emb of each key's patch offset)
    V = [LN(c^(l)); LN(z)] Wv
    z = z + SelfAtt(Q, K, V)  (+ CrossAtt(LN(z), text) when a text width is configured)
    z = z + FFN(LN(z))

The cache a_n is the input of every layer for each of the patch's M tokens, [L, B, M, d], kept
in raster token order: entry r holds token r at its own position.

Three ways to fill a patch share these weights' layout but are trained separately
(`RendererConfig.decoder`):
  ar:   token by token in the direction's local order, causal attention over M + 1 slots:
          slot 0     = order start embedding                           + next(token 0)
          slot t     = tok_emb(token t-1) + pos(token t-1's position)  + next(token t)   (1 <= t < M)
          slot M     = tok_emb(token M-1) + pos(token M-1's position)  + end
        where next(.) is a second axial table telling the slot where the token it predicts goes
        (any local order works) and `end` a learned vector. Slot t (t < M) predicts token t; the
        cache of token t is slot t+1, so every token, the patch's last included, is in the cache.
  nar:  all tokens in one parallel pass from [MASK] + position.
  pnar: MaskGIT-style: tokens or [MASK] + position, bidirectional, iterated by the sampler.
For nar/pnar the cache comes from a second pass over the finished patch (`encode`).

`RendererConfig.transfer` False is the paper's ablation without information transmission
(Table 6, "w/o caches"): the cache a patch adds to the pool comes from a pass over the patch
without its context, so nothing travels further than the extent; its own logits still see it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..attention import attention
from .arbitrary_direction_controller import Coord, Order, RelativePositionEmbedding, local_permutation

DECODERS = ("ar", "nar", "pnar")


@dataclass
class RendererConfig:
    vocab_size: int = 16384          # VQGAN codebook size
    patch_size: tuple = (1, 16, 16)  # (frames, rows, columns) of tokens per patch; M = product
    n_layer: int = 24
    n_head: int = 20
    d_model: int = 1280
    extent: tuple = (0, 2, 2)        # (e_f, e_h, e_w): how far the context reaches, in patches
    text_dim: int = 0                # 0: no text; 512 open_clip ViT-B-32; 768 ComfyUI CLIP-L
    decoder: str = "ar"              # ar | nar | pnar
    rpe: str = "pre"                 # pre (paper) | post (ablation)
    mlp_ratio: int = 4
    dropout: float = 0.0
    transfer: bool = True            # False: pool caches made without context (ablation, Table 6)

    def __post_init__(self):
        self.patch_size, self.extent = tuple(self.patch_size), tuple(self.extent)
        if self.decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, got {self.decoder!r}")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model {self.d_model} must be divisible by n_head {self.n_head}")
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"patch_size must be (frames, rows, cols) >= 1, got {self.patch_size}")
        if len(self.extent) != 3 or min(self.extent) < 0:
            raise ValueError(f"extent must be (e_f, e_h, e_w) >= 0, got {self.extent}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1) (a share of activations dropped in training), got {self.dropout}")

    @property
    def tokens_per_patch(self) -> int:
        return math.prod(self.patch_size)

    @property
    def mask_id(self) -> int:
        return self.vocab_size


class Context:
    """The selected context of one patch, or of a batch of patches: same-layer caches and the key
    embedding indices.

    hidden [L, B, Nc*M, d]; rel [Nc*M] index of each key token's patch offset in ADC.Emb, or
    [B, Nc*M] when the rows are different patches (`batched`); key_mask [B, Nc*M] bool (True = a
    real key) when those patches select different numbers of caches and the shorter ones are padded.
    """

    def __init__(self, hidden: torch.Tensor | None, rel: torch.Tensor | None, n_patches: int,
                 key_mask: torch.Tensor | None = None):
        self.hidden, self.rel, self.n_patches, self.key_mask = hidden, rel, n_patches, key_mask

    @classmethod
    def from_pool(cls, selected: list[tuple[Coord, torch.Tensor]], coord: Coord,
                  emb: RelativePositionEmbedding, device) -> Context:
        if not selected:
            return cls(None, None, 0)
        m = selected[0][1].shape[2]
        hidden = torch.cat([cache for _, cache in selected], dim=2)
        rel = torch.tensor([emb.index(tuple(a - b for a, b in zip(c, coord))) for c, _ in selected],
                           dtype=torch.long, device=device).repeat_interleave(m)
        return cls(hidden, rel, len(selected))

    @classmethod
    def batched(cls, contexts: list[Context], halves: int = 1) -> Context:
        """The contexts of P patches as one batch of rows (patch_rows layout), keys padded to the longest.

        Each context's hidden is [L, halves*B, N_p, d] (halves = 2 for classifier-free guidance:
        rows [with text; without]); the batch is [L, halves*P*B, max N_p, d] with the padding masked.
        """
        if len(contexts) == 1:
            return contexts[0]
        real = [c for c in contexts if c.hidden is not None]
        if not real:
            return cls(None, None, 0)
        n_max = max(c.hidden.shape[2] for c in real)
        layers, rows, _, d = real[0].hidden.shape
        like = real[0].hidden
        hidden, rel, mask = [], [], []
        for c in contexts:
            n = 0 if c.hidden is None else c.hidden.shape[2]
            h = like.new_zeros(layers, rows, n_max, d)
            r = torch.zeros(n_max, dtype=torch.long, device=like.device)
            if n:
                h[:, :, :n] = c.hidden
                r[:n] = c.rel
            hidden.append(h)
            rel.append(r.expand(rows, n_max))
            mask.append((torch.arange(n_max, device=like.device) < n).expand(rows, n_max))
        padded = any(c.hidden is None or c.hidden.shape[2] < n_max for c in contexts)
        return cls(patch_rows(hidden, halves, dim=1), patch_rows(rel, halves, dim=0),
                   max(c.n_patches for c in contexts), patch_rows(mask, halves, dim=0) if padded else None)


def patch_rows(parts: list[torch.Tensor], halves: int, dim: int) -> torch.Tensor:
    """P tensors with rows [halves*B] along `dim` -> one with rows [halves*P*B]: half-major, then
    patch, then canvas, so a guided batch's [with text; without] halves stay contiguous
    (patch_samplers.guided chunks them)."""
    x = torch.stack(parts, dim=dim)  # [.., P, halves*B, ..]
    rows = x.shape[dim + 1]
    x = x.unflatten(dim + 1, (halves, rows // halves)).transpose(dim, dim + 1)  # [.., halves, P, B, ..]
    return x.flatten(dim, dim + 2)


def patch_row_split(x: torch.Tensor, p: int, halves: int, dim: int) -> list[torch.Tensor]:
    """Inverse of patch_rows: rows [halves*P*B] along `dim` -> P tensors with rows [halves*B]."""
    x = x.unflatten(dim, (halves, p, x.shape[dim] // (halves * p)))  # [.., halves, P, B, ..]
    return [x.select(dim + 1, i).flatten(dim, dim + 1) for i in range(p)]


class Block(nn.Module):
    def __init__(self, cfg: RendererConfig):
        super().__init__()
        d = cfg.d_model
        self.n_head = cfg.n_head
        self.ln_1 = nn.LayerNorm(d)
        self.q, self.k, self.v, self.proj = (nn.Linear(d, d) for _ in range(4))
        if cfg.text_dim:
            self.ln_x = nn.LayerNorm(d)
            self.xq, self.xproj = nn.Linear(d, d), nn.Linear(d, d)
            self.xk, self.xv = nn.Linear(cfg.text_dim, d), nn.Linear(cfg.text_dim, d)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, cfg.mlp_ratio * d), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.mlp_ratio * d, d), nn.Dropout(cfg.dropout))
        self.dropout = cfg.dropout

    def heads(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, d] -> [B, h, T, d/h]
        b, t, d = x.shape
        return x.view(b, t, self.n_head, d // self.n_head).transpose(1, 2)

    def context_kv(self, ctx: torch.Tensor, key_emb: torch.Tensor | None):
        """Context caches [B, N, d] -> keys and values [B, h, N, d/h] (key_emb [N, d]: pre-RPE)."""
        c = self.ln_1(ctx)
        k = self.k(c)
        if key_emb is not None:
            k = k + key_emb
        return self.heads(k), self.heads(self.v(c))

    def text_kv(self, text: torch.Tensor, gate: torch.Tensor | None = None):
        """-> (keys, values, gate): gate [B, 1, 1] scales the cross-attention's output (0: no text), or None."""
        return self.heads(self.xk(text)), self.heads(self.xv(text)), gate

    def forward(self, x, ctx_kv, self_key_emb, mask, text_kv=None, kv_cache=None, pos=None):
        """x [B, T, d] -> [B, T, d].

        ctx_kv: (k, v) of the context or None; self_key_emb [d] pre-RPE of offset 0 or None;
        mask: bool (True = attend) or float bias over [context; patch] keys, or None.
        kv_cache: (k [B, h, N, d/h], v, start) preallocated buffers whose first `start` rows hold
        the context (ctx_kv is then None); the new keys are written at start + pos and attention
        reads the buffer up to there, with no copy (token-by-token decoding).
        """
        h = self.ln_1(x)
        q, k = self.heads(self.q(h)), self.k(h)
        if self_key_emb is not None:
            k = k + self_key_emb
        k, v = self.heads(k), self.heads(self.v(h))
        if kv_cache is not None:
            kc, vc, start = kv_cache
            end = start + pos + x.shape[1]
            kc[:, :, start + pos:end], vc[:, :, start + pos:end] = k, v
            k, v = kc[:, :, :end], vc[:, :, :end]
        if ctx_kv is not None:
            k, v = torch.cat([ctx_kv[0], k], dim=2), torch.cat([ctx_kv[1], v], dim=2)
        y = attention(q, k, v, mask, self.dropout if self.training else 0.0)
        x = x + self.proj(y.transpose(1, 2).flatten(2))
        if text_kv is not None:
            text_k, text_v, gate = text_kv
            y = self.xproj(attention(self.heads(self.xq(self.ln_x(x))), text_k, text_v, None, 0.0).transpose(1, 2).flatten(2))
            x = x + (y if gate is None else y * gate)
        return x + self.mlp(self.ln_2(x))


class TokenStep:
    """The renderer run one AR slot at a time, every slot attending to [context; slots so far].

    Each layer's q, k, v weights are fused into one pre-transposed matrix (per head), the attention
    scale folded into q and the pre-RPE key embedding of the patch's own keys into k's bias
    (`fused_layers`, made once per set of weights). Per patch (or batch of patches), the context's
    keys (transposed) and values are projected once into buffers that each slot's key and value
    are written after. A step is then a few matmuls per layer, with no module calls and nothing of
    the context reshaped or reallocated; each layer's output is written straight into the buffer
    of the next layer's inputs. The same layers as Block.forward (tests compare it with the
    teacher-forced pass).

    inputs [L, slots, B, d]: each layer's input at each slot (what the pool caches).
    """

    def __init__(self, renderer: Renderer, context: Context, text_kv: list, rows: int, slots: int):
        cfg = renderer.config
        d, h = cfg.d_model, cfg.n_head
        dh = d // h
        self.d, self.h, self.rows = d, h, rows
        self.n_ctx = 0 if context.hidden is None else context.hidden.shape[2]
        n, like = self.n_ctx + slots, renderer.pos_f
        fused, self.head = fused_layers(renderer)
        ctx_kv = renderer.context_kv(context)
        self.layers = []
        for l, (ln_1, qkv, proj, text_w, ln_2, fc, out) in enumerate(fused):
            keys_t = like.new_empty(rows * h, dh, n)  # keys transposed: a query's scores are one bmm
            values = like.new_empty(rows * h, n, dh)
            if ctx_kv[l] is not None:
                keys_t[:, :, :self.n_ctx] = ctx_kv[l][0].reshape(rows * h, self.n_ctx, dh).transpose(1, 2)
                values[:, :self.n_ctx] = ctx_kv[l][1].reshape(rows * h, self.n_ctx, dh)
            mask = renderer.attn_mask(l, context, 1, slots, causal=False)  # one query over every key
            if mask is not None and mask.dtype == torch.bool:
                mask = torch.zeros(mask.shape, dtype=like.dtype, device=like.device).masked_fill(~mask, float("-inf"))
            text = None
            if text_kv[l] is not None:
                text_k, text_v, gate = text_kv[l]
                text = (*text_w, text_k.reshape(rows * h, -1, dh).transpose(1, 2).contiguous(),
                        text_v.reshape(rows * h, -1, dh).contiguous(), None if gate is None else gate.view(rows, 1))
            self.layers.append((ln_1, qkv, keys_t, values,
                                None if mask is None else mask.expand(rows, h, 1, n).reshape(rows * h, 1, n),
                                proj, text, ln_2, fc, out))
        self.inputs = like.new_empty(len(self.layers), slots, rows, d)

    def __call__(self, x: torch.Tensor, t: int, layers: int | None = None) -> torch.Tensor:
        """Slot t's input x [B, d] through the first `layers` layers (all by default) -> [B, d]; each
        layer's input is kept in `inputs` (a partial run's output too, as the next layer's input)."""
        d, h, rows = self.d, self.h, self.rows
        dh, at, end, shape = d // h, self.n_ctx + t, self.n_ctx + t + 1, (d,)
        inputs = self.inputs.select(1, t)  # [L, B, d]
        last = len(self.layers) - 1
        layers = last + 1 if layers is None else layers
        inputs[0].copy_(x)
        for l in range(layers):
            ln_1, qkv_w, keys_t, values, bias, proj, text, ln_2, fc, out = self.layers[l]
            x = inputs[l]
            qkv = torch.addmm(qkv_w[0], torch.layer_norm(x, shape, *ln_1), qkv_w[1]).view(rows * h, 3, dh)
            keys_t.select(2, at).copy_(qkv.select(1, 1))
            values.select(1, at).copy_(qkv.select(1, 2))
            scores = torch.bmm(qkv.narrow(1, 0, 1), keys_t.narrow(2, 0, end))  # [B*h, 1, keys]
            if bias is not None:
                scores += bias.narrow(2, 0, end)
            y = torch.bmm(scores.softmax(-1), values.narrow(1, 0, end)).view(rows, d)
            x = torch.addmm(proj[0], y, proj[1]).add_(x)
            if text is not None:
                ln_x, xq_b, xq_w, xproj_b, xproj_w, text_kt, text_v, gate = text
                q = torch.addmm(xq_b, torch.layer_norm(x, shape, *ln_x), xq_w).view(rows * h, 1, dh)
                y = torch.addmm(xproj_b, torch.bmm(torch.bmm(q, text_kt).softmax(-1), text_v).view(rows, d), xproj_w)
                x = x + (y if gate is None else y * gate)
            u = F.gelu(torch.addmm(fc[0], torch.layer_norm(x, shape, *ln_2), fc[1]), approximate="tanh")
            if l < last:  # the output is the next layer's input: written there
                x = torch.add(x, torch.addmm(out[0], u, out[1]), out=inputs[l + 1])
            else:
                x = torch.addmm(out[0], u, out[1]).add_(x)
        return x

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Last layer's output [B, d] -> logits [B, V]."""
        ln_f, head = self.head
        return torch.mm(torch.layer_norm(x, (self.d,), *ln_f), head)


def fused_layers(renderer: Renderer) -> tuple[list, tuple]:
    """TokenStep's per-layer weights (layer norms as (weight, bias, eps), linears as (bias, weight
    [in, out] contiguous), q/k/v fused per head) and the head's, made once and kept on the renderer
    until any parameter changes (training updates them in place: their versions move; weights
    loaded under torch.inference_mode, as ComfyUI runs nodes, have no version and are not trained)."""
    key = tuple((p.data_ptr(), 0 if p.is_inference() else p._version, p.dtype, p.device)
                for p in renderer.parameters())
    held = renderer.__dict__.get("_fused")
    if held is not None and held[0] == key:
        return held[1]
    cfg = renderer.config
    h, dh = cfg.n_head, cfg.d_model // cfg.n_head
    scale = dh ** -0.5

    def linear(bias: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return bias.detach(), weight.detach().t().contiguous()

    def by_head(q, k, v):  # rows of q, k, v [d, ..] -> [3d, ..] as (head, q/k/v, d/h): a step views it per head
        return torch.stack([x.reshape(h, dh, *x.shape[1:]) for x in (q, k, v)], dim=1).flatten(0, 2)

    def norm(ln: nn.LayerNorm) -> tuple:
        return ln.weight.detach(), ln.bias.detach(), ln.eps

    layers = []
    with torch.no_grad():
        for l, blk in enumerate(renderer.blocks):
            key_emb = renderer.self_key_emb(l)
            k_bias = blk.k.bias if key_emb is None else blk.k.bias + key_emb
            text = None
            if cfg.text_dim:
                text = (norm(blk.ln_x), *linear(blk.xq.bias * scale, blk.xq.weight * scale),
                        *linear(blk.xproj.bias, blk.xproj.weight))
            layers.append((norm(blk.ln_1), linear(by_head(blk.q.bias * scale, k_bias, blk.v.bias),
                                                  by_head(blk.q.weight * scale, blk.k.weight, blk.v.weight)),
                           linear(blk.proj.bias, blk.proj.weight), text, norm(blk.ln_2),
                           linear(blk.mlp[0].bias, blk.mlp[0].weight), linear(blk.mlp[2].bias, blk.mlp[2].weight)))
        head = (norm(renderer.ln_f), renderer.head.weight.detach().t().contiguous())
    renderer.__dict__["_fused"] = (key, (layers, head))
    return layers, head


class Renderer(nn.Module):
    def __init__(self, cfg: RendererConfig):
        super().__init__()
        self.config = cfg
        d, (pf, ph, pw) = cfg.d_model, cfg.patch_size
        self.tok_emb = nn.Embedding(cfg.vocab_size + 1, d)  # + [MASK]
        self.order_emb = nn.Embedding(len(Order), d)  # AR start token; added everywhere for nar/pnar
        self.pos_f = nn.Parameter(torch.randn(pf, d) * 0.02)  # axial absolute position in the patch
        self.pos_h = nn.Parameter(torch.randn(ph, d) * 0.02)
        self.pos_w = nn.Parameter(torch.randn(pw, d) * 0.02)
        if cfg.decoder == "ar":  # where the token a slot predicts goes (axial), and the slot after the last token
            self.next_f = nn.Parameter(torch.randn(pf, d) * 0.02)
            self.next_h = nn.Parameter(torch.randn(ph, d) * 0.02)
            self.next_w = nn.Parameter(torch.randn(pw, d) * 0.02)
            self.next_end = nn.Parameter(torch.randn(d) * 0.02)
        self.rel = RelativePositionEmbedding(cfg.extent, cfg.n_layer, d, cfg.n_head, cfg.rpe)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, cfg.vocab_size, bias=False)
        self.self_rel = self.rel.index((0, 0, 0))
        self.apply(self._init_weights)
        self._perms: dict[Order, tuple[torch.Tensor, torch.Tensor]] = {}

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    # ---- inputs ---------------------------------------------------------------------------
    def positions(self) -> torch.Tensor:
        """Axial position embedding of every token of a patch, raster order. [M, d]"""
        return (self.pos_f[:, None, None] + self.pos_h[None, :, None] + self.pos_w[None, None]).flatten(0, 2)

    def next_positions(self, order: Order) -> torch.Tensor:
        """AR: what each of the M + 1 slots is told about the token it predicts, in generation
        order: the next-position embedding of token t at slot t, `end` at slot M. [M + 1, d]"""
        nxt = (self.next_f[:, None, None] + self.next_h[None, :, None] + self.next_w[None, None]).flatten(0, 2)
        return torch.cat([nxt[self.permutation(order)[0]], self.next_end[None]])

    def permutation(self, order: Order) -> tuple[torch.Tensor, torch.Tensor]:
        """(generation order -> raster index, raster index -> generation order), both [M]."""
        if order not in self._perms:
            perm = local_permutation(self.config.patch_size, order)
            self._perms[order] = perm, torch.argsort(perm)
        perm, inv = self._perms[order]
        return perm.to(self.pos_f.device), inv.to(self.pos_f.device)

    def edge_tokens(self, order: Order) -> torch.Tensor:
        """The tokens on the patch's edge that its context lies against in `order`: those in the row
        or the column of the first token generated (bool, raster). [M]"""
        _, ph, pw = self.config.patch_size
        first = int(self.permutation(order)[0][0])
        raster = torch.arange(self.config.tokens_per_patch, device=self.pos_f.device)
        row, col = raster // pw % ph, raster % pw
        return (row == first // pw % ph) | (col == first % pw)

    def ar_inputs(self, tokens_ordered: torch.Tensor, order: Order) -> torch.Tensor:
        """Teacher-forced AR inputs of the first T <= M tokens. tokens_ordered [B, T] in
        generation order -> slots [B, T + 1, d] (module docstring): slot 0 the order's start,
        slot t >= 1 token t-1 at its own position; each slot + where the token it predicts goes.
        """
        b, t = tokens_ordered.shape
        perm, _ = self.permutation(order)
        start = self.order_emb.weight[order.id].expand(b, 1, -1)
        own = self.tok_emb(tokens_ordered) + self.positions()[perm[:t]]
        return torch.cat([start, own], dim=1) + self.next_positions(order)[:t + 1]

    def parallel_inputs(self, tokens: torch.Tensor, order: Order) -> torch.Tensor:
        """nar/pnar inputs. tokens [B, M] raster (mask_id where unknown) -> [B, M, d]."""
        return self.tok_emb(tokens) + self.positions() + self.order_emb.weight[order.id]

    # ---- the network ----------------------------------------------------------------------
    def context_kv(self, context: Context, room: int = 0) -> list:
        """Per layer (k, v) of the context, or None when there is no context.

        room > 0: per layer (k, v, n_ctx) buffers [B, h, n_ctx + room, d/h] holding the context's
        keys and values, with room after them for a pass's own `room` keys (Block.forward's
        kv_cache): passes repeated over one context (P-NAR's steps, the cache pass) then write their
        keys there instead of concatenating the whole context again in every layer.
        """
        if context.hidden is None:
            return [None] * len(self.blocks)
        pre = self.config.rpe == "pre"
        kv = [blk.context_kv(context.hidden[l], self.rel(l, context.rel) if pre else None)
              for l, blk in enumerate(self.blocks)]
        if not room:
            return kv
        buffers = []
        for k, v in kv:
            n_ctx = k.shape[2]
            k_buf, v_buf = k.new_empty(*k.shape[:2], n_ctx + room, k.shape[3]), v.new_empty(*v.shape[:2], n_ctx + room, v.shape[3])
            k_buf[:, :, :n_ctx], v_buf[:, :, :n_ctx] = k, v
            buffers.append((k_buf, v_buf, n_ctx))
        return buffers

    def text_kv(self, text: torch.Tensor | None, with_null: bool = False) -> list:
        """Per layer the cross-attention's (keys, values, gate) of text [B, T, D], or None without text.
        with_null: for classifier-free guidance, a batch of 2B whose second half runs without the text
        (its cross-attention output gated to 0, as a caption dropped in training leaves it out)."""
        if text is None or not self.config.text_dim:
            return [None] * len(self.blocks)
        if text.shape[-1] != self.config.text_dim:
            raise ValueError(f"text embeddings are {text.shape[-1]} wide but this renderer was "
                             f"built for {self.config.text_dim}")
        gate = None
        if with_null:
            gate = torch.cat([text.new_ones(len(text)), text.new_zeros(len(text))])[:, None, None]
            text = torch.cat([text, text])
        return [blk.text_kv(text, gate) for blk in self.blocks]

    def attn_mask(self, layer: int, context: Context, n_query: int, n_self: int, causal: bool):
        """Keys visible to each query over [context; n_self patch keys]: None (all), bool [T, keys]
        (True = attend) or a float bias [h, T, keys] for post-RPE; with per-row context keys (a
        batch of patches: padded keys, or post-RPE with per-row offsets) [B, 1 or h, T, keys]."""
        n_ctx = 0 if context.hidden is None else context.hidden.shape[2]
        post = self.config.rpe == "post"
        padded = context.key_mask is not None and n_ctx > 0
        if not causal and not post and not padded:
            return None
        device = self.pos_f.device
        visible = torch.ones(n_query, n_ctx + n_self, dtype=torch.bool, device=device)
        if causal:  # lower-right aligned: query t sees every context key and patch keys <= t
            q_pos = torch.arange(n_self - n_query, n_self, device=device)[:, None]
            visible[:, n_ctx:] = torch.arange(n_self, device=device)[None] <= q_pos
        if padded:  # [B, 1, T, keys]: each row's own padding hidden
            own = torch.ones(len(context.key_mask), n_self, dtype=torch.bool, device=device)
            visible = visible & torch.cat([context.key_mask, own], dim=1)[:, None, None]
        if not post:
            return visible
        bias = self.rel(layer, torch.tensor([self.self_rel], device=device)).T  # [h, 1]
        bias = bias.expand(-1, n_self)
        if n_ctx:
            ctx_bias = self.rel(layer, context.rel).transpose(-1, -2)  # [h, Nc*M] or [B, h, Nc*M]
            bias = torch.cat([ctx_bias, bias.expand(*ctx_bias.shape[:-1], n_self)], dim=-1)
        return bias.unsqueeze(-2).masked_fill(~visible, float("-inf"))  # [(B,) h, T, keys]

    def forward(self, x: torch.Tensor, context: Context, text_kv: list, ctx_kv: list | None = None,
                causal: bool = False):
        """One pass over a whole patch. x [B, T, d] inputs -> (logits [B, T, V], layer inputs [L, B, T, d]).
        ctx_kv: context_kv(context), or its buffers (room=T) when several passes share the context."""
        out, inputs = self.trunk(x, context, text_kv, ctx_kv, causal)
        return self.head(self.ln_f(out)), inputs

    def trunk(self, x: torch.Tensor, context: Context, text_kv: list, ctx_kv: list | None = None,
              causal: bool = False):
        """The L layers without the head: x [B, T, d] -> (output [B, T, d], layer inputs [L, B, T, d])."""
        ctx_kv = ctx_kv if ctx_kv is not None else self.context_kv(context)
        inputs = []
        for l, blk in enumerate(self.blocks):
            inputs.append(x)
            mask = self.attn_mask(l, context, x.shape[1], x.shape[1], causal)
            if ctx_kv[l] is not None and len(ctx_kv[l]) == 3:  # a buffer with room for this pass's keys
                x = blk(x, None, self.self_key_emb(l), mask, text_kv[l], kv_cache=ctx_kv[l], pos=0)
            else:
                x = blk(x, ctx_kv[l], self.self_key_emb(l), mask, text_kv[l])
        return x, torch.stack(inputs)

    def self_key_emb(self, layer: int) -> torch.Tensor | None:
        if self.config.rpe != "pre":
            return None
        return self.rel.table[layer, self.self_rel]

    # ---- the paper's NUWA(p, c, e, y) for a known patch: training and pre-caching ----------
    def teacher_forced(self, tokens: torch.Tensor, order: Order, context: Context,
                       text_kv: list, masked: torch.Tensor | None = None):
        """tokens [B, M] raster -> (logits [B, M, V] raster, cache for the pool [L, B, M, d] raster).

        ar: one causal pass over M + 1 slots whose logits at token t condition on the tokens
        before t; the cache is the same pass's slots 1..M.
        nar: logits from an all-[MASK] input; pnar: from the input with `masked` [B, M] hidden.
        For nar/pnar the cache is that of the finished patch (a second pass, as in the paper).
        With transfer off, the cache is a second pass without the context (`encode`).
        """
        cfg = self.config
        if cfg.decoder == "ar":
            logits, cache = self._ar_pass(tokens, order, context, text_kv, with_logits=True)
            if cfg.transfer or context.hidden is None:
                return logits, cache
        else:
            hidden = torch.ones_like(tokens, dtype=torch.bool) if cfg.decoder == "nar" else masked
            logits, _ = self(self.parallel_inputs(tokens.masked_fill(hidden, cfg.mask_id), order), context, text_kv)
        with torch.no_grad():  # the cache only feeds later patches; nothing flows back through it
            return logits, self.encode(tokens, order, context, text_kv)

    def encode(self, tokens: torch.Tensor, order: Order, context: Context, text_kv: list,
               ctx_kv: list | None = None) -> torch.Tensor:
        """The cache [L, B, M, d] raster a finished patch (tokens [B, M] raster) adds to the pool
        (NCP.Add): its layer inputs, made with `context` (ctx_kv: its keys and values, when the
        caller has them), or without any when transfer is off."""
        if not self.config.transfer:
            context, ctx_kv = Context(None, None, 0), None
        if self.config.decoder == "ar":
            return self._ar_pass(tokens, order, context, text_kv, with_logits=False)[1]
        return self.trunk(self.parallel_inputs(tokens, order), context, text_kv, ctx_kv)[1]

    def _ar_pass(self, tokens: torch.Tensor, order: Order, context: Context, text_kv: list, with_logits: bool):
        """tokens [B, M] raster -> (logits [B, M, V] raster or None, cache [L, B, M, d] raster)."""
        perm, inv = self.permutation(order)
        out, inputs = self.trunk(self.ar_inputs(tokens[:, perm], order), context, text_kv, causal=True)
        logits = self.head(self.ln_f(out[:, :-1]))[:, inv] if with_logits else None  # slot t predicts token t
        return logits, inputs[:, :, 1:][:, :, inv]  # token t sits at slot t + 1
