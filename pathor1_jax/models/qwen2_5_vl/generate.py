"""Batched generation with a static-shape KV cache and a jitted decode loop.

Prompts are left-padded (`attention_mask` 0 on the left). The prompt is prefilled in one pass;
each decode step writes one key/value slot per layer and attends over the whole static cache,
whose segment ids (0 = padding or not yet written) do the masking. Positions continue M-RoPE:
the next token of a row sits at `max(prompt positions) + 1`, as in Hugging Face's `generate`.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .modeling import KVCache, Qwen2_5_VLForConditionalGeneration, prepare_inputs


def sample_token(
    logits: jax.Array, key: jax.Array, temperature: float, top_p: float, top_k: int
) -> jax.Array:
    """Next token `[B]` from float32 logits `[B, V]`: greedy when temperature == 0."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        cutoff = jnp.min(jnp.where(mass_before < top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@partial(
    nnx.jit,
    static_argnames=("max_new_tokens", "temperature", "top_p", "top_k", "eos_token_id", "pad_token_id"),
)
def _generate(
    model: Qwen2_5_VLForConditionalGeneration,
    input_ids,
    attention_mask,
    pixel_values,
    vision_index,
    position_ids,
    key,
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
    eos_token_id: int,
    pad_token_id: int,
):
    b, t = input_ids.shape
    lm = model.model.language_model
    cache = KVCache.init(model.config.text, b, t + max_new_tokens, model.dtype)
    embeds = model.embed(input_ids, pixel_values, vision_index)
    hidden, cache = lm(embeds, position_ids, attention_mask, cache)
    logits = model.logits(hidden[:, -1:])[:, 0]
    next_position = position_ids.max(axis=(0, 2)) + 1  # [B]
    tokens = jnp.full((b, max_new_tokens), pad_token_id, jnp.int32)
    finished = jnp.zeros((b,), bool)

    def cond(carry):
        step, _, _, finished, _, _ = carry
        return (step < max_new_tokens) & ~jnp.all(finished)

    def body(carry):
        step, logits, cache, finished, tokens, key = carry
        key, subkey = jax.random.split(key)
        token = sample_token(logits, subkey, temperature, top_p, top_k)
        token = jnp.where(finished, pad_token_id, token)
        tokens = tokens.at[:, step].set(token)
        finished = finished | (token == eos_token_id)
        positions = jnp.broadcast_to((next_position + step)[None, :, None], (3, b, 1))
        hidden, cache = lm(lm.embed_tokens(token[:, None]), positions, jnp.ones((b, 1), jnp.int32), cache)
        return step + 1, model.logits(hidden)[:, 0], cache, finished, tokens, key

    carry = (jnp.zeros((), jnp.int32), logits, cache, finished, tokens, key)
    return jax.lax.while_loop(cond, body, carry)[4]


def generate(
    model: Qwen2_5_VLForConditionalGeneration,
    input_ids,
    attention_mask=None,
    pixel_values=None,
    image_grid_thw=None,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> jax.Array:
    """New token ids `[B, max_new_tokens]` for left-padded prompts; rows stop at EOS, then pad.

    Images use M-RoPE positions (the `mm_token_type_ids` the processor would give are derived
    from the image-pad tokens). eos/pad default to the config's (pad falls back to eos, as HF).
    """
    config = model.config
    ids = np.asarray(input_ids, dtype=np.int32)
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int32)
    if image_grid_thw is not None:
        token_types = (ids == config.image_token_id).astype(np.int32)
        prepared = prepare_inputs(config, ids, mask, image_grid_thw, token_types, np.shape(pixel_values)[0])
        position_ids = prepared["position_ids"]
        pixel_values = jnp.asarray(pixel_values, model.dtype)
    else:
        prepare_inputs(config, ids, mask)  # validates: no stray image-pad tokens
        text_positions = np.maximum(np.cumsum(mask, axis=-1) - 1, 0) * mask
        position_ids = np.broadcast_to(text_positions, (3, *ids.shape))
        prepared = {"vision_index": None}
    eos = config.text.eos_token_id if eos_token_id is None else eos_token_id
    pad = (
        pad_token_id
        if pad_token_id is not None
        else (config.text.pad_token_id if config.text.pad_token_id is not None else eos)
    )
    return _generate(
        model,
        jnp.asarray(ids),
        jnp.asarray(mask),
        pixel_values,
        prepared["vision_index"],
        jnp.asarray(position_ids, jnp.int32),
        jax.random.key(seed),
        max_new_tokens=max_new_tokens,
        temperature=float(temperature),
        top_p=float(top_p),
        top_k=int(top_k),
        eos_token_id=int(eos),
        pad_token_id=int(pad),
    )
