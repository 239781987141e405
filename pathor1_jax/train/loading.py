"""A trained model and its processor for inference, from an HF checkpoint or a training run directory:
the one loader of `pathor1 eval`, `pathor1 serve` and the demo's held-out evaluation (they sit above
`train`, beside each other, and none imports another to load a model)."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import ml_collections
from flax import nnx

from pathor1_jax.data.processing import QwenVLProcessor
from pathor1_jax.errors import UserError
from pathor1_jax.models import qwen2_5_vl

RUN_CONFIG = "run_config.json"  # the training config a run directory holds (pathor1_jax.train.run)


def load_for_inference(
    model_dir: str | Path, *, mesh=None, rules=None, dtype=None
) -> tuple[qwen2_5_vl.Qwen2_5_VLForConditionalGeneration, QwenVLProcessor]:
    """A model and its processor from an HF checkpoint (config.json + safetensors + tokenizer files)
    or from a training run directory (run_config.json + checkpoints/: the latest step's params, and
    the run's own tokenizer / image-processor settings).

    mesh, rules: place the parameters by the sharding rules (an HF checkpoint is read slice by
    slice, each device reading its own). dtype: compute dtype of an HF checkpoint (default float32;
    a run keeps its config's).
    """
    from pathor1_jax.data.pipeline import get_processor, processor_spec_from_config
    from pathor1_jax.sharding.params import shard_model, state_shardings
    from pathor1_jax.train.checkpoint import restore_params
    from pathor1_jax.train.run import model_config, model_factory

    path = Path(model_dir)
    if (path / "checkpoints").is_dir() and (path / RUN_CONFIG).exists():
        config = ml_collections.ConfigDict(json.loads((path / RUN_CONFIG).read_text()))
    elif (path / "config.json").exists():
        kwargs = {} if dtype is None else {"dtype": dtype}
        if mesh is not None:
            kwargs["shardings"] = partial(state_shardings, mesh=mesh, rules=rules)
        model = qwen2_5_vl.load_pretrained(path, **kwargs)
        return model, QwenVLProcessor(path, path, rope_config=model.config)
    else:
        raise UserError(
            f"--model {model_dir}: neither an HF checkpoint (config.json) nor a run directory "
            f"({RUN_CONFIG} + checkpoints/)"
        )
    cfg = model_config(config.model)
    graphdef, params = nnx.split(model_factory(config.model, cfg)(), nnx.Param)
    restored = restore_params(path / "checkpoints", nnx.to_pure_dict(params))
    model = nnx.merge(graphdef, restored)
    if mesh is not None:
        shard_model(model, mesh, rules)
    return model, get_processor(processor_spec_from_config(config.data, cfg))
