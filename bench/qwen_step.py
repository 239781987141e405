"""Forward and forward+backward throughput: pathor1_jax (jit) vs Hugging Face PyTorch (eager).

Same random weights (ours are loaded from the HF checkpoint), same inputs, same process.
Config: hidden 256, 4 text layers, vision depth 4, one 224² image, 512 tokens, batch 2.
Usage: python bench/qwen_step.py [--steps 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from qwen_reference import image_prompt, random_hf_model, random_pixels  # noqa: E402

from pathor1_jax.models import qwen2_5_vl  # noqa: E402

SEQ, BATCH, GRID = 512, 2, (1, 16, 16)


def bench_config() -> qwen2_5_vl.Qwen2_5_VLConfig:
    tiny = qwen2_5_vl.tiny_config(
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        mrope_section=(4, 6, 6),
    )
    vision = dataclasses.replace(
        tiny.vision,
        depth=4,
        hidden_size=256,
        intermediate_size=512,
        num_heads=4,
        out_hidden_size=256,
        window_size=112,
        fullatt_block_indexes=(3,),
    )
    return qwen2_5_vl.Qwen2_5_VLConfig(text=tiny.text, vision=vision, tie_word_embeddings=True)


def timed(fn, steps: int) -> float:
    fn()  # warm-up / compile
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
    jax.config.update("jax_default_matmul_precision", "highest")
    config = bench_config()
    hf = random_hf_model(config)
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        model = qwen2_5_vl.load_pretrained(tmp)

    prompt = image_prompt([GRID], [])
    ids = np.array([prompt + list(range(1000, 1000 + SEQ - len(prompt)))] * BATCH)
    grids = np.array([GRID] * BATCH)
    pixels = np.concatenate([random_pixels([GRID], seed=i) for i in range(BATCH)])
    mm = (ids == config.image_token_id).astype(np.int64)
    prepared = model.prepare_inputs(ids, None, grids, mm, pixels.shape[0])
    labels = jnp.asarray(np.roll(ids, -1, axis=1))
    batch = dict(
        input_ids=jnp.asarray(ids),
        pixel_values=jnp.asarray(pixels),
        position_ids=jnp.asarray(prepared["position_ids"]),
        vision_index=prepared["vision_index"],
    )

    @nnx.jit
    def forward(model, batch):
        return model(**batch)

    def loss_fn(model, batch):
        logits = model(**batch)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    grad_fn = nnx.jit(nnx.value_and_grad(loss_fn))

    ours_fwd = timed(lambda: jax.block_until_ready(forward(model, batch)), args.steps)
    ours_bwd = timed(lambda: jax.block_until_ready(grad_fn(model, batch)), args.steps)

    t_inputs = dict(
        input_ids=torch.as_tensor(ids),
        pixel_values=torch.as_tensor(pixels),
        image_grid_thw=torch.as_tensor(grids),
        mm_token_type_ids=torch.as_tensor(mm),
    )
    t_labels = torch.from_numpy(np.array(labels)).long()

    def hf_forward():
        with torch.no_grad():
            hf(**t_inputs)

    def hf_forward_backward():
        hf.zero_grad(set_to_none=True)
        logits = hf(**t_inputs).logits
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), t_labels.flatten()).backward()

    hf.train(False)
    hf_fwd = timed(hf_forward, args.steps)
    hf_bwd = timed(hf_forward_backward, args.steps)

    tokens = BATCH * SEQ
    print(
        f"Qwen2.5-VL step, batch {BATCH} × {SEQ} tokens, one 224² image per row, {jax.devices()[0].platform}"
    )
    print(f"{'pass':<18}{'pathor1_jax tok/s':>20}{'HF torch tok/s':>18}{'ratio':>8}")
    for name, ours, ref in (("forward", ours_fwd, hf_fwd), ("forward+backward", ours_bwd, hf_bwd)):
        print(f"{name:<18}{tokens / ours:>20.0f}{tokens / ref:>18.0f}{ref / ours:>8.2f}")


if __name__ == "__main__":
    main()
