"""Fused clipped policy-gradient loss (GRPO / DAPO, Patho-R1 section 3.4) without a `[B, T, V]` tensor.

The expensive part of the loss is the per-token log-probability of the sampled token,
`logp[b, t] = h[b, t] . W[:, y] - logsumexp_v(h[b, t] . W[:, v])`, over Qwen2.5-VL's 151,936-token
vocabulary. `token_logprobs` computes it tile by tile over the vocabulary with an online
log-sum-exp (forward) and recomputes the tiles in the backward pass (`jax.custom_vjp`):
`dlogits = g * (onehot(y) - softmax)` per tile, `dh += dlogits @ W_tile.T`, `dW_tile = h.T @ dlogits`.
Only `[B, T]` vectors and one `[rows, tile]` block of logits exist at a time.

The clipped surrogate itself is elementwise on `[B, T]` and shared by every implementation:

    ratio_t = exp(logp_t - old_t)
    surrogate_t = min(ratio_t * A, clip(ratio_t, 1 - eps_low, 1 + eps_high) * A)
    surrogate_t = max(surrogate_t, dual_clip * A)   where A < 0, only with a dual clip (verl, > 1)
    objective_t = surrogate_t - beta * KL_t
    KL_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1          (k3 estimator; 0 without ref)
    loss = -aggregate(objective_t over response tokens)           (minimise the loss)

Aggregation (`AGG_MODES`): "token-mean" sums over every response token of the batch and divides by
the number of response tokens (verl's token-mean, its DAPO recipe); "seq-mean-token-mean" (GRPO
Eq. 1) takes each sequence's token mean, then the mean over sequences that have at least one
response token; "group-mean-token-mean" (DAPO Eq. 2 as written) takes each group's token mean over
its `group_size` consecutive sequences, then the mean over groups that have a response token.

Temperature: `logp` is the log-probability under softmax(logits / T), the distribution that sampling
at temperature T draws from (as verl and EasyR1 compute it). The wrappers divide the hidden states by
T once, before any implementation runs, so every implementation (and its gradient) sees it the same.

Metrics (token means over response tokens): `clip_fraction` (tokens where the clipped term is the
smaller one, i.e. clipping removes the gradient), `mean_ratio`, `kl` (k3; 0 without ref).

Implementations (`impl`): "xla" (reference: materialises the float32 logits), "chunked" (plain
JAX loop over vocabulary tiles, custom_vjp), "pallas" (Mosaic TPU kernels; CPU needs
`PATHOR1_PALLAS_INTERPRET=1`), "auto" (pallas on TPU, chunked elsewhere).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pathor1_jax.kernels.attention import pallas_interpret

AGG_MODES = ("token-mean", "seq-mean-token-mean", "group-mean-token-mean")
IMPLS = ("auto", "xla", "chunked", "pallas")
# Tiles: Pallas (rows, vocab) fit TPU VMEM at D=2048 bf16; chunked XLA takes all rows at once.
PALLAS_TILES = (256, 1024)
CHUNKED_VOCAB_TILE = 8192

_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_TN = (((0,), (0,)), ((), ()))  # a.T @ b


class _Config(NamedTuple):
    vocab: int
    block_rows: int
    block_vocab: int
    impl: str  # "chunked" or "pallas"
    interpret: bool


# ------------------------------------------------------------------------------- per-tile math


def _tile_logits(h, w, col0: jax.Array | int, vocab: int):
    """Float32 logits `[n, bv]` of one vocabulary tile; columns >= vocab are -inf, their W zeroed."""
    col = col0 + lax.broadcasted_iota(jnp.int32, (h.shape[0], w.shape[1]), 1)
    valid = col < vocab
    w = jnp.where(valid[:1], w, 0)
    logits = jnp.dot(h, w, preferred_element_type=jnp.float32)
    return jnp.where(valid, logits, -jnp.inf), col, w


def _tile_stats(h, w, tokens, col0, vocab: int, carry):
    """Online log-sum-exp update with one tile: carry (m, l, token logit), each `[n, 1]`."""
    m, l, tok = carry
    logits, col, _ = _tile_logits(h, w, col0, vocab)
    tok = tok + jnp.sum(jnp.where(col == tokens, logits, 0.0), axis=-1, keepdims=True)
    m_new = jnp.maximum(m, logits.max(axis=-1, keepdims=True))
    l = l * jnp.exp(m - m_new) + jnp.exp(logits - m_new).sum(axis=-1, keepdims=True)
    return m_new, l, tok


def _tile_dlogits(h, w, tokens, lse, g, col0, vocab: int):
    """`g * (onehot(y) - softmax)` for one tile `[n, bv]` (float32) and the tile's zero-padded W."""
    logits, col, w = _tile_logits(h, w, col0, vocab)
    onehot = (col == tokens).astype(jnp.float32)
    return g * (onehot - jnp.exp(logits - lse)), w


# --------------------------------------------------------------------------------- pallas (TPU)


def _fwd_kernel(h_ref, w_ref, tok_ref, m_ref, l_ref, t_ref, *, vocab: int):
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        t_ref[...] = jnp.zeros(t_ref.shape, jnp.float32)

    col0 = j * w_ref.shape[1]
    carry = (m_ref[...], l_ref[...], t_ref[...])
    m_ref[...], l_ref[...], t_ref[...] = _tile_stats(h_ref[...], w_ref[...], tok_ref[...], col0, vocab, carry)


def _dh_kernel(h_ref, w_ref, tok_ref, lse_ref, g_ref, dh_ref, acc_ref, *, vocab: int):
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    h = h_ref[...]
    dlogits, w = _tile_dlogits(
        h, w_ref[...], tok_ref[...], lse_ref[...], g_ref[...], j * w_ref.shape[1], vocab
    )
    acc_ref[...] += lax.dot_general(dlogits.astype(w.dtype), w, _NT, preferred_element_type=jnp.float32)

    @pl.when(j == pl.num_programs(1) - 1)
    def _write():
        dh_ref[...] = acc_ref[...].astype(dh_ref.dtype)


def _dw_kernel(h_ref, w_ref, tok_ref, lse_ref, g_ref, dw_ref, acc_ref, *, vocab: int):
    j, i = pl.program_id(0), pl.program_id(1)

    @pl.when(i == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    h = h_ref[...]
    dlogits, _ = _tile_dlogits(
        h, w_ref[...], tok_ref[...], lse_ref[...], g_ref[...], j * w_ref.shape[1], vocab
    )
    h_t = h.astype(jnp.float32).T.astype(h.dtype)  # [D, bn]: explicit transpose, then an NN matmul (Mosaic)
    acc_ref[...] += jnp.dot(h_t, dlogits.astype(h.dtype), preferred_element_type=jnp.float32)

    @pl.when(i == pl.num_programs(1) - 1)
    def _write():
        dw_ref[...] = acc_ref[...].astype(dw_ref.dtype)


def _params(semantics: tuple[str, ...]):
    return pltpu.CompilerParams(dimension_semantics=semantics)


def _pallas_forward(cfg: _Config, h, w, tokens):
    n, d = h.shape
    bn, bv = cfg.block_rows, cfg.block_vocab
    row = pl.BlockSpec((bn, 1), lambda i, j: (i, 0))
    stats = pl.pallas_call(
        functools.partial(_fwd_kernel, vocab=cfg.vocab),
        grid=(n // bn, pl.cdiv(cfg.vocab, bv)),
        in_specs=[
            pl.BlockSpec((bn, d), lambda i, j: (i, 0)),
            pl.BlockSpec((d, bv), lambda i, j: (0, j)),
            row,
        ],
        out_specs=[row, row, row],
        out_shape=[jax.ShapeDtypeStruct((n, 1), jnp.float32)] * 3,
        compiler_params=_params(("parallel", "arbitrary")),
        interpret=cfg.interpret,
        name="token_logprobs_fwd",
    )(h, w, tokens)
    return stats


def _pallas_backward(cfg: _Config, h, w, tokens, lse, g):
    n, d = h.shape
    bn, bv = cfg.block_rows, cfg.block_vocab
    nv = pl.cdiv(cfg.vocab, bv)
    row = pl.BlockSpec((bn, 1), lambda i, j: (i, 0))
    dh = pl.pallas_call(
        functools.partial(_dh_kernel, vocab=cfg.vocab),
        grid=(n // bn, nv),
        in_specs=[
            pl.BlockSpec((bn, d), lambda i, j: (i, 0)),
            pl.BlockSpec((d, bv), lambda i, j: (0, j)),
            row,
            row,
            row,
        ],
        out_specs=pl.BlockSpec((bn, d), lambda i, j: (i, 0)),
        out_shape=jax.ShapeDtypeStruct((n, d), h.dtype),
        scratch_shapes=[pltpu.VMEM((bn, d), jnp.float32)],
        compiler_params=_params(("parallel", "arbitrary")),
        interpret=cfg.interpret,
        name="token_logprobs_dh",
    )(h, w, tokens, lse, g)
    row_t = pl.BlockSpec((bn, 1), lambda j, i: (i, 0))
    dw = pl.pallas_call(
        functools.partial(_dw_kernel, vocab=cfg.vocab),
        grid=(nv, n // bn),
        in_specs=[
            pl.BlockSpec((bn, d), lambda j, i: (i, 0)),
            pl.BlockSpec((d, bv), lambda j, i: (0, j)),
            row_t,
            row_t,
            row_t,
        ],
        out_specs=pl.BlockSpec((d, bv), lambda j, i: (0, j)),
        out_shape=jax.ShapeDtypeStruct((d, cfg.vocab), w.dtype),
        scratch_shapes=[pltpu.VMEM((d, bv), jnp.float32)],
        compiler_params=_params(("parallel", "arbitrary")),
        interpret=cfg.interpret,
        name="token_logprobs_dw",
    )(h, w, tokens, lse, g)
    return dh, dw


# ------------------------------------------------------------------------------ chunked (XLA)


def _vocab_tiles(cfg: _Config):
    """(number of full tiles, start and size of the remainder tile or None)."""
    full = cfg.vocab // cfg.block_vocab
    rest = cfg.vocab - full * cfg.block_vocab
    return full, ((full * cfg.block_vocab, rest) if rest else None)


def _chunked_forward(cfg: _Config, h, w, tokens):
    n, bv = h.shape[0], cfg.block_vocab
    full, rest = _vocab_tiles(cfg)

    def body(j, carry):
        w_tile = lax.dynamic_slice_in_dim(w, j * bv, bv, axis=1)
        return _tile_stats(h, w_tile, tokens, j * bv, cfg.vocab, carry)

    carry = (
        jnp.full((n, 1), -jnp.inf, jnp.float32),
        jnp.zeros((n, 1), jnp.float32),
        jnp.zeros((n, 1), jnp.float32),
    )
    carry = lax.fori_loop(0, full, body, carry)
    if rest is not None:
        start, size = rest
        carry = _tile_stats(h, w[:, start : start + size], tokens, start, cfg.vocab, carry)
    return carry


def _chunked_backward(cfg: _Config, h, w, tokens, lse, g):
    bv = cfg.block_vocab
    full, rest = _vocab_tiles(cfg)

    def tile(w_tile, col0):
        dlogits, w_tile = _tile_dlogits(h, w_tile, tokens, lse, g, col0, cfg.vocab)
        dh = lax.dot_general(dlogits.astype(w.dtype), w_tile, _NT, preferred_element_type=jnp.float32)
        dw = lax.dot_general(h, dlogits.astype(h.dtype), _TN, preferred_element_type=jnp.float32)
        return dh, dw.astype(w.dtype)

    def body(j, carry):
        dh, dw = carry
        dh_tile, dw_tile = tile(lax.dynamic_slice_in_dim(w, j * bv, bv, axis=1), j * bv)
        return dh + dh_tile, lax.dynamic_update_slice_in_dim(dw, dw_tile, j * bv, axis=1)

    carry = (jnp.zeros(h.shape, jnp.float32), jnp.zeros(w.shape, w.dtype))
    dh, dw = lax.fori_loop(0, full, body, carry)
    if rest is not None:
        start, size = rest
        dh_tile, dw_tile = tile(w[:, start : start + size], start)
        dh, dw = dh + dh_tile, dw.at[:, start:].set(dw_tile)
    return dh, dw


# ------------------------------------------------------------------------------------ custom_vjp


def _forward(cfg: _Config, h, w, tokens):
    fn = _pallas_forward if cfg.impl == "pallas" else _chunked_forward
    m, l, tok = fn(cfg, h, w, tokens)
    lse = m + jnp.log(l)
    return tok - lse, lse  # [N, 1] each


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused_logprobs(cfg: _Config, h, w, tokens):
    return _forward(cfg, h, w, tokens)[0]


def _fused_fwd(cfg: _Config, h, w, tokens):
    logp, lse = _forward(cfg, h, w, tokens)
    return logp, (h, w, tokens, lse)


def _fused_bwd(cfg: _Config, res, g):
    h, w, tokens, lse = res
    fn = _pallas_backward if cfg.impl == "pallas" else _chunked_backward
    dh, dw = fn(cfg, h, w, tokens, lse, g.astype(jnp.float32))
    return dh.astype(h.dtype), dw.astype(w.dtype), None


_fused_logprobs.defvjp(_fused_fwd, _fused_bwd)


# --------------------------------------------------------------------------------------- public


def token_logprobs_reference(hidden: jax.Array, lm_head: jax.Array, tokens: jax.Array) -> jax.Array:
    """Plain-jnp per-token log-probs `[B, T]` float32 (materialises the `[B, T, V]` float32 logits)."""
    logits = jnp.einsum("btd,dv->btv", hidden, lm_head, preferred_element_type=jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return jnp.take_along_axis(logp, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]


def _resolve_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"policy loss: unknown impl {impl!r}; expected one of {IMPLS}")
    on_tpu = jax.default_backend() == "tpu"
    if impl == "auto":
        return "pallas" if on_tpu else "chunked"
    if impl == "pallas" and not on_tpu and not pallas_interpret():
        raise ValueError(
            f"policy loss: impl 'pallas' needs a TPU (backend is {jax.default_backend()!r}); "
            "set PATHOR1_PALLAS_INTERPRET=1 to interpret it"
        )
    return impl


def token_logprobs(
    hidden: jax.Array,
    lm_head: jax.Array,
    tokens: jax.Array,
    *,
    temperature: float = 1.0,
    impl: str = "auto",
) -> jax.Array:
    """Log-probability `[B, T]` (float32) of `tokens` under `softmax(hidden @ lm_head / temperature)`.

    hidden `[B, T, D]`, lm_head `[D, V]`, tokens `[B, T]` int. Tiled over the vocabulary for
    impl "chunked"/"pallas" (see module doc), with tiles `PALLAS_TILES` / `CHUNKED_VOCAB_TILE`.
    `temperature` (a Python float > 0) divides the hidden states before the dispatch.
    """
    if hidden.ndim != 3 or lm_head.ndim != 2 or hidden.shape[-1] != lm_head.shape[0]:
        raise ValueError(
            f"token_logprobs: hidden {hidden.shape} must be [B, T, D] and lm_head {lm_head.shape} [D, V]"
        )
    if tokens.shape != hidden.shape[:2]:
        raise ValueError(f"token_logprobs: tokens {tokens.shape} must be [B, T] = {hidden.shape[:2]}")
    if not temperature > 0:
        raise ValueError(f"token_logprobs: temperature must be > 0, got {temperature}")
    if temperature != 1.0:
        hidden = hidden / jnp.asarray(temperature, hidden.dtype)  # logits / T = (hidden / T) @ W
    impl = _resolve_impl(impl)
    if impl == "xla":
        return token_logprobs_reference(hidden, lm_head, tokens)
    b, t, d = hidden.shape
    vocab = lm_head.shape[1]
    n = b * t
    block_rows, block_vocab = PALLAS_TILES if impl == "pallas" else (n, CHUNKED_VOCAB_TILE)
    block_vocab = min(block_vocab, vocab)
    n_pad = -(-n // block_rows) * block_rows
    cfg = _Config(vocab, block_rows, block_vocab, impl, impl == "pallas" and pallas_interpret())
    h = jnp.pad(hidden.reshape(n, d), ((0, n_pad - n), (0, 0)))
    tok = jnp.pad(tokens.reshape(n).astype(jnp.int32), (0, n_pad - n))[:, None]
    return _fused_logprobs(cfg, h, lm_head, tok)[:n, 0].reshape(b, t)


def _masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _aggregate(per_token: jax.Array, mask: jax.Array, agg: str, group_size: int) -> jax.Array:
    """The loss from masked per-token values `[B, T]` (see the module doc for the modes)."""
    if agg == "token-mean":
        return jnp.sum(per_token) / jnp.maximum(jnp.sum(mask), 1.0)
    if agg == "seq-mean-token-mean":
        rows, counts = jnp.sum(per_token, axis=1), jnp.sum(mask, axis=1)  # [B]
    else:  # group-mean-token-mean
        b = per_token.shape[0]
        if group_size < 1 or b % group_size:
            raise ValueError(f"agg {agg!r}: {b} sequences are not whole groups of group_size={group_size}")
        rows = jnp.sum(per_token, axis=1).reshape(b // group_size, group_size).sum(axis=1)  # [groups]
        counts = jnp.sum(mask, axis=1).reshape(b // group_size, group_size).sum(axis=1)
    means = rows / jnp.maximum(counts, 1.0)
    return jnp.sum(means) / jnp.maximum(jnp.sum(counts > 0), 1)


def clipped_surrogate(
    logp: jax.Array,
    old_logprobs: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    eps_low: float,
    eps_high: float,
    ref_logprobs: jax.Array | None = None,
    beta: float = 0.0,
    agg: str = "token-mean",
    group_size: int = 1,
    dual_clip: float | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Loss (= -objective) and metrics from per-token log-probs `[B, T]` (see module doc).

    `group_size`: sequences per group, for agg "group-mean-token-mean". `dual_clip`: the constant c
    > 1 bounding the objective of negative-advantage tokens below by c·A (None: no dual clip).
    """
    if agg not in AGG_MODES:
        raise ValueError(f"clipped_policy_loss: unknown agg {agg!r}; expected one of {AGG_MODES}")
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"clipped_policy_loss: dual_clip must be > 1 (or None), got {dual_clip}")
    mask = mask.astype(jnp.float32)
    ratio = jnp.exp(logp - old_logprobs)  # [B, T]
    adv = advantages.astype(jnp.float32)[:, None]  # [B, 1]
    unclipped = ratio * adv
    clipped = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
    objective = jnp.minimum(unclipped, clipped)
    dual_clipped = jnp.zeros_like(objective, dtype=bool)
    if dual_clip is not None:
        floor = dual_clip * adv
        dual_clipped = (adv < 0) & (objective < floor)
        objective = jnp.where(dual_clipped, floor, objective)
    kl = jnp.zeros_like(logp)
    if ref_logprobs is not None:
        log_r = ref_logprobs - logp
        kl = jnp.exp(log_r) - log_r - 1.0
        objective = objective - beta * kl
    loss = _aggregate(-objective * mask, mask, agg, group_size)
    metrics = {
        "clip_fraction": _masked_mean((clipped < unclipped).astype(jnp.float32), mask),
        "dual_clip_fraction": _masked_mean(dual_clipped.astype(jnp.float32), mask),
        "mean_ratio": _masked_mean(ratio, mask),
        "kl": _masked_mean(kl, mask),
    }
    return loss, jax.tree.map(lax.stop_gradient, metrics)


def clipped_policy_loss(
    hidden: jax.Array,
    lm_head: jax.Array,
    tokens: jax.Array,
    old_logprobs: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    eps_low: float,
    eps_high: float,
    ref_logprobs: jax.Array | None = None,
    beta: float = 0.0,
    agg: str = "token-mean",
    group_size: int = 1,
    dual_clip: float | None = None,
    temperature: float = 1.0,
    impl: str = "auto",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Clipped policy-gradient loss from final hidden states (see module doc for the formulas).

    hidden `[B, T, D]`, lm_head `[D, V]`, tokens `[B, T]` (sampled token at each position, i.e.
    already shifted to align with hidden), old/ref log-probs `[B, T]` (at the same `temperature`),
    advantages `[B]`, mask `[B, T]` (1 = response token). Returns `(loss, {"clip_fraction",
    "dual_clip_fraction", "mean_ratio", "kl"})`.
    """
    b, t = tokens.shape
    for name, x in (("old_logprobs", old_logprobs), ("mask", mask), ("ref_logprobs", ref_logprobs)):
        if x is not None and x.shape != (b, t):
            raise ValueError(f"clipped_policy_loss: {name} {x.shape} must be [B, T] = {(b, t)}")
    if advantages.shape != (b,):
        raise ValueError(f"clipped_policy_loss: advantages {advantages.shape} must be [B] = {(b,)}")
    logp = token_logprobs(hidden, lm_head, tokens, temperature=temperature, impl=impl)
    return clipped_surrogate(
        logp,
        old_logprobs,
        advantages,
        mask,
        eps_low=eps_low,
        eps_high=eps_high,
        ref_logprobs=ref_logprobs,
        beta=beta,
        agg=agg,
        group_size=group_size,
        dual_clip=dual_clip,
    )


def clipped_policy_loss_reference(
    hidden: jax.Array,
    lm_head: jax.Array,
    tokens: jax.Array,
    old_logprobs: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    eps_low: float,
    eps_high: float,
    ref_logprobs: jax.Array | None = None,
    beta: float = 0.0,
    agg: str = "token-mean",
    group_size: int = 1,
    dual_clip: float | None = None,
    temperature: float = 1.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The same loss with plain jnp, materialising the float32 logits (`impl="xla"`)."""
    return clipped_policy_loss(
        hidden,
        lm_head,
        tokens,
        old_logprobs,
        advantages,
        mask,
        eps_low=eps_low,
        eps_high=eps_high,
        ref_logprobs=ref_logprobs,
        beta=beta,
        agg=agg,
        group_size=group_size,
        dual_clip=dual_clip,
        temperature=temperature,
        impl="xla",
    )
