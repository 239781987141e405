"""Qwen2.5-VL in Flax NNX, part by part as `transformers.models.qwen2_5_vl.modeling_qwen2_5_vl`.

Vision tower: Conv3d patch embedding (as a matmul on flattened 1176-value patches) → window
reordering → blocks (RMSNorm, fused-qkv attention with 2D RoPE, gated SiLU MLP) attending within
windows, or within whole frames in `fullatt_block_indexes` → patch merger (RMSNorm, 2×2 merge,
Linear, GELU, Linear) → inverse reordering.
Text decoder: Qwen2 blocks (RMSNorm, GQA with qkv bias and M-RoPE, SwiGLU), image features
scattered at the `<|image_pad|>` tokens, tied or untied LM head.
All attention goes through `pathor1_jax.kernels.attention.attention` with segment ids.

Decoder layers and vision blocks are stacked and scanned by default (`scan_layers=True`: one traced
body, parameters with a leading `"layers"` axis, see `models/scan.py`); `scan_layers=False` keeps
them as per-layer modules (`layers.0`, `layers.1`, ...) for parity debugging. Checkpoints use the
per-layer Hugging Face names either way. `remat` is the per-layer rematerialisation policy.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pathor1_jax.kernels.attention import attention
from pathor1_jax.logical import constrain
from pathor1_jax.models.layers import Embed, Linear, RMSNorm
from pathor1_jax.models.scan import check_remat, run_layers, stack_layers

from .config import Qwen2_5_VLConfig, TextConfig, VisionConfig
from .rope import apply_rope, apply_vision_rope, get_rope_index, text_rope, vision_rope
from .vision_index import VisionIndex, num_image_tokens, vision_index

ACTIVATIONS = {"silu": jax.nn.silu, "gelu": lambda x: jax.nn.gelu(x, approximate=False)}


class GatedMLP(nnx.Module):
    """`down(act(gate(x)) * up(x))`: SwiGLU in the decoder (no bias), with bias in the vision tower."""

    def __init__(
        self, dim: int, hidden: int, act: str, *, bias: bool, axes: tuple[str, str], rngs, dtype, param_dtype
    ):
        embed, mlp = axes
        kw = dict(use_bias=bias, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.act = ACTIVATIONS[act]
        self.gate_proj = Linear(dim, hidden, axes=(embed, mlp), **kw)
        self.up_proj = Linear(dim, hidden, axes=(embed, mlp), **kw)
        self.down_proj = Linear(hidden, dim, axes=(mlp, embed), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


# ----------------------------------------------------------------------------- vision tower


class VisionAttention(nnx.Module):
    def __init__(self, config: VisionConfig, *, rngs, dtype, param_dtype, attention_impl: str):
        self.num_heads = config.num_heads
        self.attention_impl = attention_impl
        kw = dict(use_bias=True, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        d = config.hidden_size
        self.qkv = Linear(d, 3 * d, axes=("vision_embed", "vision_heads"), **kw)
        self.proj = Linear(d, d, axes=("vision_heads", "vision_embed"), **kw)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, segment_ids: jax.Array) -> jax.Array:
        n = x.shape[0]
        q, k, v = jnp.split(self.qkv(x).reshape(n, 3, self.num_heads, -1), 3, axis=1)  # 3 × [N, 1, H, Dh]
        q, k, v = q[:, 0], k[:, 0], v[:, 0]
        q, k = apply_vision_rope(q, cos, sin), apply_vision_rope(k, cos, sin)
        out = attention(  # windows / images are short contiguous runs: only their blocks are visited
            q[None],
            k[None],
            v[None],
            segment_ids=segment_ids[None],
            impl=self.attention_impl,
            block_sparse=True,
        )
        return self.proj(out[0].reshape(n, -1))


class VisionBlock(nnx.Module):
    def __init__(self, config: VisionConfig, *, rngs, dtype, param_dtype, attention_impl: str):
        d = config.hidden_size
        self.norm1 = RMSNorm(d, eps=1e-6, axis="vision_embed", rngs=rngs, param_dtype=param_dtype)
        self.norm2 = RMSNorm(d, eps=1e-6, axis="vision_embed", rngs=rngs, param_dtype=param_dtype)
        self.attn = VisionAttention(
            config, rngs=rngs, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl
        )
        self.mlp = GatedMLP(
            d,
            config.intermediate_size,
            config.hidden_act,
            bias=True,
            axes=("vision_embed", "vision_mlp"),
            rngs=rngs,
            dtype=dtype,
            param_dtype=param_dtype,
        )

    def __call__(self, x, cos, sin, segment_ids):
        x = x + self.attn(self.norm1(x), cos, sin, segment_ids)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
    """RMSNorm → concatenate each 2×2 group → Linear → GELU → Linear to the text width."""

    def __init__(self, config: VisionConfig, *, rngs, dtype, param_dtype):
        self.merged = config.hidden_size * config.spatial_merge_size**2
        kw = dict(use_bias=True, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.ln_q = RMSNorm(
            config.hidden_size, eps=1e-6, axis="vision_embed", rngs=rngs, param_dtype=param_dtype
        )
        self.mlp_0 = Linear(self.merged, self.merged, axes=("vision_merge", "vision_mlp"), **kw)
        self.mlp_2 = Linear(self.merged, config.out_hidden_size, axes=("vision_mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.ln_q(x).reshape(-1, self.merged)  # [N / merge², merge² · D]
        return self.mlp_2(jax.nn.gelu(self.mlp_0(x), approximate=False))


def segment_runs(segment_ids: jax.Array) -> jax.Array:
    """`[N]` ids → each contiguous run numbered 1, 2, ... in order. Windows and frames are contiguous
    already; padding (id 0, after each process's patches) splits into runs that attend only within
    themselves, so block-sparse attention never pairs distant padding blocks (real patches unchanged)."""
    starts = jnp.concatenate(
        [jnp.ones((1,), jnp.int32), (segment_ids[1:] != segment_ids[:-1]).astype(jnp.int32)]
    )
    return jnp.cumsum(starts)


class VisionTransformer(nnx.Module):
    def __init__(
        self,
        config: VisionConfig,
        *,
        rngs,
        dtype,
        param_dtype,
        attention_impl: str,
        scan_layers: bool,
        remat: str,
    ):
        self.config = config
        self.dtype = dtype
        self.remat = check_remat(remat)
        self.patch_embed = Linear(
            config.patch_dim,
            config.hidden_size,
            use_bias=False,
            axes=("vision_patch", "vision_embed"),
            rngs=rngs,
            dtype=dtype,
            param_dtype=param_dtype,
        )
        blocks = [
            VisionBlock(
                config, rngs=rngs, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl
            )
            for _ in range(config.depth)
        ]
        self.blocks = stack_layers(blocks) if scan_layers else nnx.List(blocks)
        self.merger = PatchMerger(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, pixel_values: jax.Array, index: VisionIndex) -> jax.Array:
        """pixel_values `[N, C·T·P·P]` → merged image features `[N / merge², D_text]` in image order."""
        unit = self.config.spatial_merge_size**2
        n = pixel_values.shape[0]

        def to_window_order(x):  # [N, ...] → [N, ...], permuting merge groups
            return x.reshape(n // unit, unit, *x.shape[1:])[index.window_index].reshape(x.shape)

        x = to_window_order(self.patch_embed(pixel_values))  # [N, D]
        cos, sin = vision_rope(index.rotary_pos_ids, self.config.head_dim, self.config.rope_theta)
        cos, sin = to_window_order(cos), to_window_order(sin)  # [N, Dh]
        # blocks differ only in their segment ids: whole frames in `fullatt_block_indexes`, else windows
        full = jnp.asarray(np.isin(np.arange(self.config.depth), self.config.fullatt_block_indexes))
        frames, windows = segment_runs(index.frame_segment_ids), segment_runs(index.window_segment_ids)

        def block_fn(block, x, full):  # [N, D], full: scalar bool
            return block(x, cos, sin, jnp.where(full, frames, windows)), None

        x, _ = run_layers(self.blocks, block_fn, x, full, remat=self.remat)
        merged = self.merger(x)  # [N / merge², D_text], window order
        return merged[jnp.argsort(index.window_index)]


# ----------------------------------------------------------------------------- text decoder


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Static-shape key/value cache of all layers `[L, B, S_max, K, Dh]`, segment ids `[B, S_max]`."""

    keys: jax.Array
    values: jax.Array
    segment_ids: jax.Array
    index: jax.Array  # scalar int32: next slot to write

    @classmethod
    def init(cls, config: TextConfig, batch: int, max_len: int, dtype) -> KVCache:
        shape = (config.num_hidden_layers, batch, max_len, config.num_key_value_heads, config.head_dim)
        keys, values = jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)  # two buffers: each may be donated
        return cls(keys, values, jnp.zeros((batch, max_len), jnp.int32), jnp.zeros((), jnp.int32))


class TextAttention(nnx.Module):
    def __init__(self, config: TextConfig, *, rngs, dtype, param_dtype, attention_impl: str):
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.attention_impl = attention_impl
        d = config.hidden_size
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.q_proj = Linear(d, self.num_heads * self.head_dim, use_bias=True, axes=("embed", "heads"), **kw)
        self.k_proj = Linear(
            d, self.num_kv_heads * self.head_dim, use_bias=True, axes=("embed", "kv_heads"), **kw
        )
        self.v_proj = Linear(
            d, self.num_kv_heads * self.head_dim, use_bias=True, axes=("embed", "kv_heads"), **kw
        )
        self.o_proj = Linear(self.num_heads * self.head_dim, d, use_bias=False, axes=("heads", "embed"), **kw)

    def __call__(self, x, cos, sin, segment_ids, cache_kv=None, cache_segment_ids=None, cache_index=None):
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        q = constrain(apply_rope(q, cos, sin), ("batch", "length", "heads", None))
        k = constrain(apply_rope(k, cos, sin), ("batch", "length", "kv_heads", None))
        if cache_kv is None:
            out = attention(q, k, v, segment_ids=segment_ids, causal=True, impl=self.attention_impl)
            new_kv = None
        else:
            # all layers' cache `[L, B, S_max, K, Dh]` and this layer's index: only the t new slots are
            # written (in place in the decode loop's carry), never a layer's whole cache
            keys, values, layer = cache_kv
            start = (layer, 0, cache_index, 0, 0)
            keys = jax.lax.dynamic_update_slice(keys, k[None].astype(keys.dtype), start)
            values = jax.lax.dynamic_update_slice(values, v[None].astype(values.dtype), start)
            if t > 1:  # prefill from an empty cache: causal attention within the prompt
                out = attention(q, k, v, segment_ids=segment_ids, causal=True, impl=self.attention_impl)
            else:  # one decode step: the cache's segment ids mask padding and unwritten slots
                out = attention(
                    q,
                    keys[layer],
                    values[layer],
                    segment_ids=(segment_ids, cache_segment_ids),
                    impl=self.attention_impl,
                )
            new_kv = (keys, values)
        return self.o_proj(out.reshape(b, t, -1)), new_kv


class DecoderLayer(nnx.Module):
    def __init__(self, config: TextConfig, *, rngs, dtype, param_dtype, attention_impl: str):
        d, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(d, eps=eps, axis="embed", rngs=rngs, param_dtype=param_dtype)
        self.self_attn = TextAttention(
            config, rngs=rngs, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl
        )
        self.post_attention_layernorm = RMSNorm(d, eps=eps, axis="embed", rngs=rngs, param_dtype=param_dtype)
        self.mlp = GatedMLP(
            d,
            config.intermediate_size,
            config.hidden_act,
            bias=False,
            axes=("embed", "mlp"),
            rngs=rngs,
            dtype=dtype,
            param_dtype=param_dtype,
        )

    def __call__(self, x, cos, sin, segment_ids, **cache):
        h, new_kv = self.self_attn(self.input_layernorm(x), cos, sin, segment_ids, **cache)
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x))
        return constrain(x, ("batch", "length", "embed")), new_kv


class TextModel(nnx.Module):
    def __init__(
        self,
        config: TextConfig,
        *,
        rngs,
        dtype,
        param_dtype,
        attention_impl: str,
        scan_layers: bool,
        remat: str,
    ):
        self.config = config
        self.remat = check_remat(remat)
        self.embed_tokens = Embed(
            config.vocab_size, config.hidden_size, rngs=rngs, dtype=dtype, param_dtype=param_dtype
        )
        layers = [
            DecoderLayer(
                config, rngs=rngs, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl
            )
            for _ in range(config.num_hidden_layers)
        ]
        self.layers = stack_layers(layers) if scan_layers else nnx.List(layers)
        self.norm = RMSNorm(
            config.hidden_size, eps=config.rms_norm_eps, axis="embed", rngs=rngs, param_dtype=param_dtype
        )

    def __call__(
        self,
        inputs_embeds: jax.Array,
        position_ids: jax.Array,
        segment_ids: jax.Array,
        cache: KVCache | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """inputs_embeds `[B, T, D]`, position_ids `[3, B, T]`, segment_ids `[B, T]` → `[B, T, D]`."""
        c = self.config
        cos, sin = text_rope(position_ids, c.head_dim, c.rope_theta, c.mrope_section)
        x = constrain(inputs_embeds, ("batch", "length", "embed"))
        if cache is None:
            x, _ = run_layers(
                self.layers,
                lambda layer, x, _: (layer(x, cos, sin, segment_ids)[0], None),
                x,
                remat=self.remat,
            )
            return self.norm(x), None
        t = x.shape[1]
        cache_segment_ids = jax.lax.dynamic_update_slice_in_dim(
            cache.segment_ids, segment_ids, cache.index, axis=1
        )

        def layer_fn(layer, carry, i):  # the whole cache rides in the carry: each layer writes its slots
            x, keys, values = carry
            x, (keys, values) = layer(
                x,
                cos,
                sin,
                segment_ids,
                cache_kv=(keys, values, i),
                cache_segment_ids=cache_segment_ids,
                cache_index=cache.index,
            )
            return (x, keys, values), None

        layer_ids = jnp.arange(c.num_hidden_layers, dtype=jnp.int32)
        (x, keys, values), _ = run_layers(self.layers, layer_fn, (x, cache.keys, cache.values), layer_ids)
        return self.norm(x), KVCache(keys, values, cache_segment_ids, cache.index + t)


# ----------------------------------------------------------------------------- full model


class Qwen2_5_VLModel(nnx.Module):
    """Vision tower + text decoder (HF `Qwen2_5_VLModel`: `visual` and `language_model`)."""

    def __init__(
        self,
        config: Qwen2_5_VLConfig,
        *,
        rngs,
        dtype,
        param_dtype,
        attention_impl: str,
        scan_layers: bool,
        remat: str,
    ):
        kw = dict(
            rngs=rngs,
            dtype=dtype,
            param_dtype=param_dtype,
            attention_impl=attention_impl,
            scan_layers=scan_layers,
            remat=remat,
        )
        self.visual = VisionTransformer(config.vision, **kw)
        self.language_model = TextModel(config.text, **kw)


def _is_concrete(x) -> bool:
    return x is not None and not isinstance(x, jax.core.Tracer)


class Qwen2_5_VLForConditionalGeneration(nnx.Module):
    """Qwen2.5-VL with its LM head; `__call__` takes HF's inputs and returns logits `[B, T, V]`.

    Host-side bookkeeping (M-RoPE positions, vision window order) is computed from concrete inputs
    when not given; under `jax.jit` pass `position_ids` and `vision_index` (see `prepare_inputs`).

    scan_layers: decoder layers and vision blocks stacked and scanned (default) or unrolled;
    remat: per-layer rematerialisation policy, one of `models.scan.REMAT_POLICIES`.
    """

    def __init__(
        self,
        config: Qwen2_5_VLConfig,
        *,
        rngs: nnx.Rngs | None = None,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        attention_impl: str = "auto",
        scan_layers: bool = True,
        remat: str = "none",
    ):
        rngs = nnx.Rngs(0) if rngs is None else rngs
        self.config = config
        self.dtype = dtype
        self.scan_layers = scan_layers
        self.model = Qwen2_5_VLModel(
            config,
            rngs=rngs,
            dtype=dtype,
            param_dtype=param_dtype,
            attention_impl=attention_impl,
            scan_layers=scan_layers,
            remat=remat,
        )
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else Linear(
                config.text.hidden_size,
                config.text.vocab_size,
                use_bias=False,
                axes=("embed", "vocab"),
                rngs=rngs,
                dtype=dtype,
                param_dtype=param_dtype,
            )
        )

    def layer_stacks(self) -> dict[tuple, int]:
        """Path → depth of each stacked layer stack (none when unrolled), for the checkpoint names."""
        if not self.scan_layers:
            return {}
        return {
            ("model", "language_model", "layers"): self.config.text.num_hidden_layers,
            ("model", "visual", "blocks"): self.config.vision.depth,
        }

    def prepare_inputs(
        self,
        input_ids,
        attention_mask=None,
        image_grid_thw=None,
        mm_token_type_ids=None,
        num_patches: int | None = None,
    ) -> dict:
        """Host-side `position_ids [3, B, T]`, `rope_deltas [B, 1]` and `vision_index` (numpy)."""
        return prepare_inputs(
            self.config, input_ids, attention_mask, image_grid_thw, mm_token_type_ids, num_patches
        )

    def embed(
        self,
        input_ids: jax.Array,
        pixel_values=None,
        vision_index: VisionIndex | None = None,
        image_feature_index=None,
    ) -> jax.Array:
        """Token embeddings `[B, T, D]` with image features placed at the image-pad tokens.

        image_feature_index `[B, T]`: the row of the vision tower's output each image-pad token takes
        (-1 elsewhere); default: the image-pad tokens of the flattened batch take the rows in order.
        """
        embeds = self.model.language_model.embed_tokens(input_ids)
        if pixel_values is None:
            return embeds
        features = self.model.visual(jnp.asarray(pixel_values, self.dtype), vision_index)  # [F, D]
        is_image = input_ids == self.config.image_token_id  # [B, T]
        if image_feature_index is None:
            order = (jnp.cumsum(is_image.reshape(-1)) - 1).reshape(is_image.shape)
        else:
            order = jnp.asarray(image_feature_index)
        gathered = features[jnp.clip(order, 0, features.shape[0] - 1)]  # [B, T, D]
        return jnp.where(is_image[..., None], gathered.astype(embeds.dtype), embeds)

    def hidden_states(
        self,
        input_ids,
        attention_mask=None,
        pixel_values=None,
        image_grid_thw=None,
        mm_token_type_ids=None,
        position_ids=None,
        segment_ids=None,
        vision_index: VisionIndex | None = None,
        image_feature_index=None,
    ) -> jax.Array:
        """Final (normed) hidden states `[B, T, D]` (see `embed` for `image_feature_index`)."""
        if position_ids is None or (pixel_values is not None and vision_index is None):
            num_patches = None if pixel_values is None else pixel_values.shape[0]
            prepared = prepare_inputs(
                self.config, input_ids, attention_mask, image_grid_thw, mm_token_type_ids, num_patches
            )
            position_ids = prepared["position_ids"] if position_ids is None else position_ids
            vision_index = prepared["vision_index"] if vision_index is None else vision_index
        input_ids = jnp.asarray(input_ids)
        if segment_ids is None:
            segment_ids = jnp.ones_like(input_ids) if attention_mask is None else jnp.asarray(attention_mask)
        embeds = self.embed(input_ids, pixel_values, vision_index, image_feature_index)
        hidden, _ = self.model.language_model(
            embeds, jnp.asarray(position_ids), jnp.asarray(segment_ids, jnp.int32)
        )
        return hidden

    def lm_head_kernel(self) -> jax.Array:
        """The LM head as `[D, V]` (the embedding table transposed when tied)."""
        if self.lm_head is None:
            return self.model.language_model.embed_tokens.embedding[...].T
        return self.lm_head.kernel[...]

    def logits(self, hidden: jax.Array) -> jax.Array:
        """`[B, T, D]` → float32 logits `[B, T, V]` (computed in the model dtype)."""
        head = self.lm_head_kernel().astype(self.dtype)
        return constrain(
            jnp.dot(hidden.astype(self.dtype), head).astype(jnp.float32), ("batch", "length", "vocab")
        )

    def __call__(
        self,
        input_ids,
        attention_mask=None,
        pixel_values=None,
        image_grid_thw=None,
        mm_token_type_ids=None,
        position_ids=None,
        segment_ids=None,
        vision_index: VisionIndex | None = None,
        image_feature_index=None,
    ) -> jax.Array:
        return self.logits(
            self.hidden_states(
                input_ids,
                attention_mask,
                pixel_values,
                image_grid_thw,
                mm_token_type_ids,
                position_ids,
                segment_ids,
                vision_index,
                image_feature_index,
            )
        )


def prepare_inputs(
    config: Qwen2_5_VLConfig,
    input_ids,
    attention_mask=None,
    image_grid_thw=None,
    mm_token_type_ids=None,
    num_patches: int | None = None,
) -> dict:
    """Validate concrete inputs and compute the host-side bookkeeping of a forward pass."""
    if not _is_concrete(input_ids):
        raise ValueError(
            "Qwen2.5-VL under jit needs `position_ids` (and `vision_index` with images) computed on the "
            "host: call `model.prepare_inputs(...)` outside jit and pass them in"
        )
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [B, T], got shape {ids.shape}")
    mask = None if attention_mask is None else np.asarray(attention_mask)
    grid = None if image_grid_thw is None else np.asarray(image_grid_thw).reshape(-1, 3)
    n_tokens = int(((ids == config.image_token_id) & (mask.astype(bool) if mask is not None else True)).sum())
    expected = 0 if grid is None else int(num_image_tokens(grid, config.vision.spatial_merge_size).sum())
    if (grid is not None or n_tokens) and n_tokens != expected:
        raise ValueError(
            f"input_ids hold {n_tokens} image-pad tokens (id {config.image_token_id}) but image_grid_thw "
            f"{None if grid is None else grid.tolist()} needs prod(grid_thw)/merge² = {expected}"
        )
    position_ids, rope_deltas = get_rope_index(
        ids, grid, mask, None if mm_token_type_ids is None else np.asarray(mm_token_type_ids), config
    )
    index = None
    if grid is not None:
        real = int(grid.prod(-1).sum())
        if num_patches is not None and num_patches < real:
            raise ValueError(f"pixel_values has {num_patches} patches but image_grid_thw needs {real}")
        index = vision_index(grid, config.vision, num_patches)
    return {"position_ids": position_ids, "rope_deltas": rope_deltas, "vision_index": index}
