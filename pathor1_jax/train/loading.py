"""A trained model and its processor for inference, from an HF checkpoint or a training run directory:
the one loader of `pathor1 eval`, `pathor1 serve`, `pathor1 generate` and the demo's held-out
evaluation (they sit above `train`, beside each other, and none imports another to load a model)."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import jax
import ml_collections
from flax import nnx

from pathor1_jax.data.processing import QwenVLProcessor
from pathor1_jax.errors import UserError
from pathor1_jax.models import qwen2_5_vl
from pathor1_jax.train.rundir import RUN_CONFIG

# An HF checkpoint folder's tokenizer: the fast tokenizer file, or the BPE vocabulary and merges.
TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))


def _check_hf_checkpoint(path: Path) -> None:
    """`path` has config.json and its own tokenizer files; else a `UserError` saying what is missing
    (before any weights are read)."""
    if not (path / "config.json").is_file():
        raise UserError(
            f"--model {path}: neither an HF checkpoint (config.json) nor a run directory "
            f"({RUN_CONFIG} + checkpoints/)"
        )
    if not any(all((path / f).is_file() for f in files) for files in TOKENIZER_FILES):
        raise UserError(
            f"--model {path}: no tokenizer files (tokenizer.json, or vocab.json + merges.txt); "
            "copy them from the base model's folder"
        )


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
    if not ((path / "checkpoints").is_dir() and (path / RUN_CONFIG).exists()):
        _check_hf_checkpoint(path)
        kwargs = {} if dtype is None else {"dtype": dtype}
        if mesh is not None:
            kwargs["shardings"] = partial(state_shardings, mesh=mesh, rules=rules)
        model = qwen2_5_vl.load_pretrained(path, **kwargs)
        return model, QwenVLProcessor(path, path, rope_config=model.config)
    config = ml_collections.ConfigDict(json.loads((path / RUN_CONFIG).read_text()))
    cfg = model_config(config.model)
    # the checkpoint's params into a model of abstract shapes: no random init to throw away
    graphdef, params = nnx.split(nnx.eval_shape(model_factory(config.model, cfg)), nnx.Param)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    like = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), nnx.to_pure_dict(params)
    )
    restored = restore_params(path / "checkpoints", like)
    model = nnx.merge(graphdef, restored)
    if mesh is not None:
        shard_model(model, mesh, rules)
    return model, get_processor(processor_spec_from_config(config.data, cfg))
