"""Cost of the CPT/SFT loss's LM head: every position vs only the labelled ones, by chunk size.

The demo SFT step (tiny Qwen2.5-VL with the real 151,936-token vocabulary, a packed batch of embedded
demo chats as `configs/demo_sft.py` builds it, vision tower frozen, AdamW) with `per_token_nll`
computing the LM head at every position (`valid=None`, before) or only at labelled positions
(`valid=...`, what `lm_nll` does), for several chunk sizes. Prints the median step time, the process
CPU time per step (user + system, all threads: on a loaded machine the steadier number), and the
loss, which must be the same in every row.

Usage: python bench/lm_loss.py [--steps 5] [--config configs/demo_sft.py] [--chunks 256,64,32]
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def nll_fn(model, micro: dict, chunk: int, labelled: bool):
    from pathor1_jax.train.losses import per_token_nll, shifted_targets

    hidden = model.hidden_states(
        micro["input_ids"],
        pixel_values=micro["pixel_values"],
        position_ids=micro["position_ids"],
        segment_ids=micro["segment_ids"],
        vision_index=micro["vision_index"],
        image_feature_index=micro["image_feature_index"],
    )
    targets, valid = shifted_targets(micro["labels"], micro["segment_ids"])
    return per_token_nll(hidden, model.logits, targets, chunk, valid if labelled else None), valid


def main() -> None:
    from pathor1_jax.data.pipeline import batch_iterator_from_config
    from pathor1_jax.sharding.mesh import make_mesh
    from pathor1_jax.train.config import load_config
    from pathor1_jax.train.lm import prepare_batch
    from pathor1_jax.train.optim import make_optimizer
    from pathor1_jax.train.run import model_config, model_factory
    from pathor1_jax.train.step import StepSpec, init_state, jit_step
    from pathor1_jax.train.trainer import on_mesh, put_batch, stack_micro_batches

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo_sft.py"))
    parser.add_argument("--chunks", default="256,64,32")
    args = parser.parse_args()
    config = load_config(args.config, [])
    cfg = model_config(config.model)
    batch = next(iter(batch_iterator_from_config(config.data, cfg)))
    labels = np.asarray(batch["labels"])
    mesh = make_mesh(dict(config.mesh))
    tx, _ = make_optimizer(config.optim, int(config.train.steps), tuple(config.freeze))
    graphdef, state0 = init_state(model_factory(config.model, cfg)(), tx, seed=0)
    spec = StepSpec(graphdef=graphdef, tx=tx, freeze=tuple(config.freeze))
    device_batch = put_batch(stack_micro_batches([prepare_batch(batch, cfg)]), mesh, [])
    b, t = labels.shape
    per_row = (labels != -100).sum(axis=1)
    print(
        f"{config.stage} step, {Path(args.config).name}: batch {b} × {t}, labelled positions per row "
        f"{per_row.tolist()} ({per_row.sum() / (b * t):.0%}), vocab {cfg.text.vocab_size}, hidden "
        f"{cfg.text.hidden_size}, CPU, median of {args.steps} steps"
    )
    print(f"{'LM head at':<12}{'chunk':>6}{'step s':>9}{'CPU s':>8}{'1st s':>8}{'loss':>12}")
    for labelled in (False, True):
        for chunk in map(int, args.chunks.split(",")):
            step = jit_step(partial(nll_fn, chunk=chunk, labelled=labelled))
            state = on_mesh(jax.tree.map(jnp.copy, state0), mesh)  # the step donates its state
            walls, cpus, loss = [], [], None
            for i in range(args.steps + 1):
                w, c = time.perf_counter(), time.process_time()
                state, metrics = step(spec, state, device_batch)
                loss = float(jax.device_get(metrics["loss"]))
                if i:  # the first call compiles
                    walls.append(time.perf_counter() - w)
                    cpus.append(time.process_time() - c)
                else:
                    first, first_loss = time.perf_counter() - w, loss
            name = "labelled" if labelled else "every pos."
            print(
                f"{name:<12}{chunk:>6}{statistics.median(walls):>9.3f}{statistics.median(cpus):>8.3f}"
                f"{first:>8.1f}{first_loss:>12.6f}"
            )


if __name__ == "__main__":
    main()
