"""CLIP in Flax NNX, as `transformers.models.clip.modeling_clip.CLIPModel`.

Image tower: Conv2d patch embedding (as a matmul on flattened patches), class token, learned
positions, pre-LN transformer, `post_layernorm` of the class token, `visual_projection`.
Text tower: token + learned position embeddings, causal pre-LN transformer, `final_layer_norm`,
pooling at the end-of-text token, `text_projection`. Attention goes through
`pathor1_jax.kernels.attention.attention`. Each tower's layers are stacked and scanned by default
(`scan_layers`, `remat`: see `models/scan.py`); checkpoints keep HF's per-layer names.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pathor1_jax.kernels.attention import attention
from pathor1_jax.models.layers import Embed, LayerNorm, Linear, param
from pathor1_jax.models.scan import check_remat, run_layers, stack_layers

from .config import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


class CLIPAttention(nnx.Module):
    def __init__(
        self, dim: int, heads: int, axes: tuple[str, str], *, causal: bool, rngs, dtype, attention_impl
    ):
        embed, head_axis = axes
        kw = dict(use_bias=True, rngs=rngs, dtype=dtype)
        self.num_heads, self.causal, self.attention_impl = heads, causal, attention_impl
        self.q_proj = Linear(dim, dim, axes=(embed, head_axis), **kw)
        self.k_proj = Linear(dim, dim, axes=(embed, head_axis), **kw)
        self.v_proj = Linear(dim, dim, axes=(embed, head_axis), **kw)
        self.out_proj = Linear(dim, dim, axes=(head_axis, embed), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, d = x.shape
        q, k, v = (p(x).reshape(b, t, self.num_heads, -1) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = attention(q, k, v, causal=self.causal, impl=self.attention_impl)  # [B, T, H, Dh]
        return self.out_proj(out.reshape(b, t, d))


class CLIPEncoderLayer(nnx.Module):
    def __init__(self, config, axes: tuple[str, str, str], *, causal: bool, rngs, dtype, attention_impl):
        embed, heads, mlp = axes
        d, eps = config.hidden_size, config.layer_norm_eps
        self.act = ACTIVATIONS[config.hidden_act]
        self.layer_norm1 = LayerNorm(d, eps=eps, axis=embed, rngs=rngs)
        self.self_attn = CLIPAttention(
            d,
            config.num_attention_heads,
            (embed, heads),
            causal=causal,
            rngs=rngs,
            dtype=dtype,
            attention_impl=attention_impl,
        )
        self.layer_norm2 = LayerNorm(d, eps=eps, axis=embed, rngs=rngs)
        self.fc1 = Linear(
            d, config.intermediate_size, use_bias=True, axes=(embed, mlp), rngs=rngs, dtype=dtype
        )
        self.fc2 = Linear(
            config.intermediate_size, d, use_bias=True, axes=(mlp, embed), rngs=rngs, dtype=dtype
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.fc2(self.act(self.fc1(self.layer_norm2(x))))


def _encoder(config, axes, *, causal, rngs, dtype, attention_impl, scan_layers: bool) -> nnx.Module:
    layers = [
        CLIPEncoderLayer(config, axes, causal=causal, rngs=rngs, dtype=dtype, attention_impl=attention_impl)
        for _ in range(config.num_hidden_layers)
    ]
    return stack_layers(layers) if scan_layers else nnx.List(layers)


def _run_encoder(layers: nnx.Module, x: jax.Array, remat: str) -> jax.Array:
    return run_layers(layers, lambda layer, x, _: (layer(x), None), x, remat=remat)[0]


class CLIPVisionTransformer(nnx.Module):
    AXES = ("vision_embed", "vision_heads", "vision_mlp")

    def __init__(
        self, config: CLIPVisionConfig, *, rngs, dtype, attention_impl, scan_layers: bool, remat: str
    ):
        self.config, self.dtype, self.remat = config, dtype, check_remat(remat)
        d, p = config.hidden_size, config.patch_size
        self.patch_embedding = Linear(
            config.num_channels * p * p,
            d,
            use_bias=False,
            axes=("vision_patch", "vision_embed"),
            rngs=rngs,
            dtype=dtype,
        )
        self.class_embedding = param(rngs, nnx.initializers.normal(d**-0.5), (d,), ("vision_embed",))
        self.position_embedding = param(
            rngs, nnx.initializers.normal(0.02), (config.num_patches + 1, d), (None, "vision_embed")
        )
        self.pre_layrnorm = LayerNorm(d, eps=config.layer_norm_eps, axis="vision_embed", rngs=rngs)
        self.layers = _encoder(
            config,
            self.AXES,
            causal=False,
            rngs=rngs,
            dtype=dtype,
            attention_impl=attention_impl,
            scan_layers=scan_layers,
        )
        self.post_layernorm = LayerNorm(d, eps=config.layer_norm_eps, axis="vision_embed", rngs=rngs)

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """pixel_values `[B, H, W, C]` (normalised) → pooled class token `[B, D]`."""
        b, h, w, c = pixel_values.shape
        p = self.config.patch_size
        if h != self.config.image_size or w != self.config.image_size:
            raise ValueError(f"image size {h}×{w} does not match the model's {self.config.image_size}")
        patches = pixel_values.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 5, 2, 4)
        x = self.patch_embedding(patches.reshape(b, (h // p) * (w // p), c * p * p))  # [B, N, D]
        cls = jnp.broadcast_to(self.class_embedding[...].astype(x.dtype), (b, 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1) + self.position_embedding[...].astype(x.dtype)
        x = _run_encoder(self.layers, self.pre_layrnorm(x), self.remat)
        return self.post_layernorm(x[:, 0])


class CLIPTextTransformer(nnx.Module):
    AXES = ("embed", "heads", "mlp")

    def __init__(self, config: CLIPTextConfig, *, rngs, dtype, attention_impl, scan_layers: bool, remat: str):
        self.config, self.remat = config, check_remat(remat)
        d = config.hidden_size
        self.token_embedding = Embed(config.vocab_size, d, rngs=rngs, dtype=dtype)
        self.position_embedding = param(
            rngs, nnx.initializers.normal(0.01), (config.max_position_embeddings, d), (None, "embed")
        )
        self.layers = _encoder(
            config,
            self.AXES,
            causal=True,
            rngs=rngs,
            dtype=dtype,
            attention_impl=attention_impl,
            scan_layers=scan_layers,
        )
        self.final_layer_norm = LayerNorm(d, eps=config.layer_norm_eps, axis="embed", rngs=rngs)

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        """input_ids `[B, L]` → the final-normed state at the end-of-text token `[B, D]`.

        Pooling as HF: with the legacy `eos_token_id == 2` (and open_clip) at the largest id
        (EOT is the largest id in the vocabulary), else at the first `eos_token_id`. Tokens after
        EOT (padding) cannot change it: attention is causal.
        """
        t = input_ids.shape[1]
        if t > self.config.max_position_embeddings:
            raise ValueError(
                f"text length {t} exceeds max_position_embeddings {self.config.max_position_embeddings}"
            )
        x = self.token_embedding(input_ids) + self.position_embedding[:t].astype(self.token_embedding.dtype)
        x = self.final_layer_norm(_run_encoder(self.layers, x, self.remat))
        if self.config.eos_token_id == 2:
            pool = jnp.argmax(input_ids, axis=-1)
        else:
            pool = jnp.argmax(input_ids == self.config.eos_token_id, axis=-1)
        return x[jnp.arange(x.shape[0]), pool]


class CLIPModel(nnx.Module):
    def __init__(
        self,
        config: CLIPConfig,
        *,
        rngs: nnx.Rngs | None = None,
        dtype=jnp.float32,
        attention_impl: str = "auto",
        scan_layers: bool = True,
        remat: str = "none",
    ):
        """scan_layers: each tower's layers stacked and scanned (default) or unrolled; remat: the
        per-layer rematerialisation policy (`models.scan.REMAT_POLICIES`)."""
        rngs = nnx.Rngs(0) if rngs is None else rngs
        self.config = config
        self.scan_layers = scan_layers
        kw = dict(rngs=rngs, dtype=dtype, attention_impl=attention_impl, scan_layers=scan_layers, remat=remat)
        self.text_model = CLIPTextTransformer(config.text, **kw)
        self.vision_model = CLIPVisionTransformer(config.vision, **kw)
        proj = dict(use_bias=False, rngs=rngs, dtype=dtype)
        self.visual_projection = Linear(
            config.vision.hidden_size, config.projection_dim, axes=("vision_embed", "clip_proj"), **proj
        )
        self.text_projection = Linear(
            config.text.hidden_size, config.projection_dim, axes=("embed", "clip_proj"), **proj
        )
        self.logit_scale = param(rngs, nnx.initializers.constant(config.logit_scale_init_value), (), ())

    def layer_stacks(self) -> dict[tuple, int]:
        """Path → depth of each stacked layer stack (none when unrolled), for the checkpoint names."""
        if not self.scan_layers:
            return {}
        return {
            ("text_model", "layers"): self.config.text.num_hidden_layers,
            ("vision_model", "layers"): self.config.vision.num_hidden_layers,
        }

    def encode_image(self, pixel_values: jax.Array) -> jax.Array:
        """`[B, H, W, 3]` normalised pixels → projected image features `[B, P]` (not normalised)."""
        return self.visual_projection(self.vision_model(jnp.asarray(pixel_values)))

    def encode_text(self, input_ids: jax.Array) -> jax.Array:
        """`[B, L]` token ids → projected text features `[B, P]` (not normalised)."""
        return self.text_projection(self.text_model(jnp.asarray(input_ids)))
