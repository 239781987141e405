"""Contrastive train-step throughput (images/s): pathor1_jax (jit) vs Hugging Face CLIPModel (eager).

Same weights (ours loaded from the HF checkpoint), same batch, AdamW on both sides, same process.
Config: ViT (hidden 256, 4 layers, 112 px, patch 16) + text tower (hidden 256, 4 layers), batch 32.
Usage: python bench/clip_step.py [--steps 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time

import jax
import numpy as np
import optax
import torch
from flax import nnx
from transformers import CLIPConfig as HFConfig
from transformers import CLIPModel as HFModel

from pathor1_jax.models import clip
from pathor1_jax.train.contrastive import clip_loss

BATCH = 32


def bench_config() -> clip.CLIPConfig:
    tiny = clip.tiny_config()
    width = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4)
    return clip.CLIPConfig(
        text=dataclasses.replace(tiny.text, **width),
        vision=dataclasses.replace(tiny.vision, image_size=112, patch_size=16, **width),
        projection_dim=128,
    )


def timed(fn, steps: int) -> float:
    fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    config = bench_config()
    torch.manual_seed(0)
    hf = HFModel(HFConfig(**config.to_hf_dict()))
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        model = clip.load_pretrained(tmp)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(BATCH, 112, 112, 3)).astype(np.float32)
    ids = rng.integers(1, 49000, size=(BATCH, 77)).astype(np.int32)
    ids[:, 0], ids[:, 20] = 49406, 49407

    tx = optax.adamw(1e-4)
    graphdef, params = nnx.split(model, nnx.Param)
    state = (params, tx.init(params))

    @jax.jit
    def step(state, images, ids):
        params, opt_state = state

        def loss_fn(p):
            m = nnx.merge(graphdef, p)
            return clip_loss(m.encode_image(images), m.encode_text(ids), m.logit_scale[...])

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    def ours():
        nonlocal state
        state, loss = step(state, images, ids)
        jax.block_until_ready(loss)

    optimizer = torch.optim.AdamW(hf.parameters(), lr=1e-4)
    t_images, t_ids = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(ids).long()

    def reference():
        optimizer.zero_grad(set_to_none=True)
        hf(input_ids=t_ids, pixel_values=t_images, return_loss=True).loss.backward()
        optimizer.step()

    t_ours, t_ref = timed(ours, args.steps), timed(reference, args.steps)
    print(f"CLIP contrastive train step, batch {BATCH}, 112 px, {jax.devices()[0].platform}")
    print(f"{'':<14}{'pathor1_jax':>14}{'HF torch':>12}{'ratio':>8}")
    print(f"{'images/s':<14}{BATCH / t_ours:>14.1f}{BATCH / t_ref:>12.1f}{t_ref / t_ours:>8.2f}")


if __name__ == "__main__":
    main()
