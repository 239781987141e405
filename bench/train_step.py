"""SFT optimizer-step throughput: pathor1_jax `sft_step` (jit) vs Hugging Face PyTorch eager.

Both sides train the same Qwen2.5-VL (same config, same initial weights: ours are loaded from the HF
model's safetensors) on the same batch of embedded demo chats with their images (one row per chat,
padded to the sequence length; labels on the assistant turns), with the same update: AdamW,
warmup+cosine, global-norm clipping at 1.0, vision tower frozen (as in `configs/sft_*.py`), float32.
Each side runs in its own subprocess so that its peak host memory (`ru_maxrss`) is its own.
Tokens/s counts the non-padding tokens of the batch over the median step time.

Usage: python bench/train_step.py [--steps 5] [--batch 4] [--seq 256] [--size tiny|small]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def bench_config(size: str):
    from pathor1_jax.models import qwen2_5_vl

    tiny = qwen2_5_vl.tiny_config()
    if size == "tiny":  # the demo's model
        return tiny
    text = dataclasses.replace(
        tiny.text,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        mrope_section=(4, 6, 6),
    )
    vision = dataclasses.replace(tiny.vision, depth=4, hidden_size=128, num_heads=4, out_hidden_size=256)
    return qwen2_5_vl.Qwen2_5_VLConfig(text=text, vision=vision, tie_word_embeddings=True)


def demo_batch(config, batch: int, seq: int) -> dict:
    """`batch` demo chats, one per row, padded to `seq` (no padding patches: HF sees the same pixels)."""
    from pathor1_jax.data.demo import demo_records
    from pathor1_jax.data.packing import pack_examples
    from pathor1_jax.data.pipeline import ProcessorSpec, default_tokenizer_path, get_processor

    spec = ProcessorSpec(default_tokenizer_path(), min_pixels=56 * 56, max_pixels=56 * 56, rope_config=config)
    processor = get_processor(spec)
    examples = [processor.encode(r) for r in demo_records("chat")[:batch]]
    (packed,) = pack_examples(
        examples, batch_size=batch, max_len=seq, pad_token_id=processor.pad_token_id, packing=False
    )
    return packed


def optim_config(steps: int) -> dict:
    return dict(lr=1e-4, warmup_steps=1, min_lr_ratio=0.1, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
                clip_norm=1.0, total=steps + 2)  # fmt: skip


def timed(step, steps: int) -> tuple[float, float]:
    """(first call incl. compilation, median of the next `steps`) in seconds."""
    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def run_ours(config, batch: dict, hf_dir: str, steps: int) -> dict:
    import jax
    from flax import nnx

    from pathor1_jax.models import qwen2_5_vl
    from pathor1_jax.sharding.mesh import make_mesh
    from pathor1_jax.train.lm import prepare_batch
    from pathor1_jax.train.optim import make_optimizer
    from pathor1_jax.train.sft import sft_step
    from pathor1_jax.train.step import StepSpec, init_state
    from pathor1_jax.train.trainer import on_mesh, put_batch, stack_micro_batches

    model = qwen2_5_vl.load_pretrained(hf_dir)
    opt = optim_config(steps)
    freeze = (r"^model\.visual\.",)
    tx, _ = make_optimizer(opt, opt["total"], freeze)
    mesh = make_mesh({"fsdp": -1})
    graphdef, state = init_state(model, tx, seed=0)
    state = on_mesh(state, mesh)
    spec = StepSpec(graphdef=graphdef, tx=tx, freeze=freeze)
    device_batch = put_batch(stack_micro_batches([prepare_batch(batch, config)]), mesh, [])
    holder = {"state": state}

    def step():
        holder["state"], metrics = sft_step(spec, holder["state"], device_batch)
        holder["loss"] = float(jax.device_get(metrics["loss"]))

    first, median = timed(step, steps)
    del nnx
    return {"first_s": first, "step_s": median, "loss": holder["loss"]}


def run_hf(config, batch: dict, hf_dir: str, steps: int) -> dict:
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir, attn_implementation="eager").float()
    model.train()
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith("model.visual."))
    opt = optim_config(steps)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": opt["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=opt["lr"], betas=(opt["b1"], opt["b2"]), eps=opt["eps"],
    )  # fmt: skip
    total, warmup = opt["total"], opt["warmup_steps"]

    def lr_lambda(i):
        if i < warmup:
            return i / warmup
        progress = (i - warmup) / (total - warmup)
        return opt["min_lr_ratio"] + (1 - opt["min_lr_ratio"]) * 0.5 * (1 + np.cos(np.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    grid = batch["image_grid_thw"]
    inputs = dict(
        input_ids=torch.as_tensor(batch["input_ids"]).long(),
        attention_mask=torch.as_tensor(batch["segment_ids"] > 0).long(),
        pixel_values=torch.as_tensor(batch["pixel_values"]),
        image_grid_thw=torch.as_tensor(grid[grid.prod(-1) > 0]).long(),
        mm_token_type_ids=torch.as_tensor(batch["mm_token_type_ids"]).long(),
        labels=torch.as_tensor(batch["labels"]).long(),
    )
    holder = {}

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = model(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, opt["clip_norm"])
        optimizer.step()
        scheduler.step()
        holder["loss"] = float(loss)

    first, median = timed(step, steps)
    return {"first_s": first, "step_s": median, "loss": holder["loss"]}


def worker(args) -> None:
    config = bench_config(args.size)
    batch = demo_batch(config, args.batch, args.seq)
    run = run_ours if args.impl == "ours" else run_hf
    result = run(config, batch, args.hf_dir, args.steps)
    result["tokens"] = int((batch["segment_ids"] > 0).sum())
    result["loss_tokens"] = int((batch["labels"] != -100).sum())
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--size", choices=("tiny", "small"), default="tiny")
    parser.add_argument("--impl", choices=("ours", "hf"), help=argparse.SUPPRESS)
    parser.add_argument("--hf-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.impl:
        worker(args)
        return

    sys.path.insert(0, str(ROOT / "tests"))
    from qwen_reference import random_hf_model

    config = bench_config(args.size)
    results = {}
    with tempfile.TemporaryDirectory() as hf_dir:
        random_hf_model(config).save_pretrained(hf_dir)
        for impl in ("ours", "hf"):
            cmd = [sys.executable, __file__, "--impl", impl, "--hf-dir", hf_dir, "--steps", str(args.steps),
                   "--batch", str(args.batch), "--seq", str(args.seq), "--size", args.size]  # fmt: skip
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode or not lines:
                raise SystemExit(
                    f"{impl} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
                )
            results[impl] = json.loads(lines[-1][len("RESULT ") :])
    ours, hf = results["ours"], results["hf"]
    t = config.text
    print(
        f"SFT step, Qwen2.5-VL {args.size} (hidden {t.hidden_size}, {t.num_hidden_layers} layers, vocab "
        f"{t.vocab_size}), batch {args.batch} × {args.seq} ({ours['tokens']} real tokens, one 56² image per "
        f"row), AdamW, vision frozen, float32, CPU, median of {args.steps} steps"
    )
    print(f"{'':<14}{'tok/s':>10}{'step s':>10}{'1st step s':>12}{'peak RSS MiB':>14}{'loss@last':>11}")
    for name, r in (("pathor1_jax", ours), ("HF torch", hf)):
        print(
            f"{name:<14}{r['tokens'] / r['step_s']:>10.0f}{r['step_s']:>10.3f}{r['first_s']:>12.2f}"
            f"{r['peak_rss_mib']:>14.0f}{r['loss']:>11.4f}"
        )
    print(f"ratio (pathor1_jax / HF tok/s): {hf['step_s'] / ours['step_s']:.2f}")


if __name__ == "__main__":
    main()
