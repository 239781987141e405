"""Load safetensors checkpoints shard by shard into sharded arrays.

Each parameter is built with `jax.make_array_from_callback`: for every local device the callback
reads only that device's slice from the checkpoint (`safe_open(...).get_slice(name)[index]`), so a
7B checkpoint never sits whole in host or device memory on any process.

The model side supplies a mapping from our parameter paths (`"model.layers.0.mlp.up_proj.kernel"`)
to a `Source`: the checkpoint tensor name, plus either a permutation (`perm`, slice-friendly: our
array is `tensor.transpose(perm)`, e.g. `(1, 0)` for PyTorch `[out, in]` → `[in, out]`) or a general
`transform` of the whole tensor (reshapes, splits of fused weights), which reads the full tensor once.
A `Source` naming several tensors is a stack of layers (`models/scan.py`): our array is those tensors,
each laid out as above, stacked on a new leading axis; a device reads only its layers' slices.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from safetensors import safe_open

from pathor1_jax.errors import UserError
from pathor1_jax.models.layers import path_str


@dataclass(frozen=True)
class Source:
    """Where one parameter comes from: `transform(tensor)` or `tensor.transpose(perm)`; with a tuple
    of names, those tensors (one per layer, each so transformed) stacked on a new leading axis."""

    name: str | tuple[str, ...]
    perm: tuple[int, ...] | None = None
    transform: Callable[[np.ndarray], np.ndarray] | None = None

    @property
    def names(self) -> tuple[str, ...]:
        return self.name if isinstance(self.name, tuple) else (self.name,)

    @property
    def stacked(self) -> bool:
        return isinstance(self.name, tuple)


def tensor_files(path: str | Path) -> dict[str, Path]:
    """Tensor name → safetensors file, for a file, a `*.index.json`, or a checkpoint folder."""
    path = Path(path)
    if path.is_dir():
        index = sorted(path.glob("*.safetensors.index.json"))
        files = sorted(path.glob("*.safetensors"))
        if index:
            path = index[0]
        elif len(files) == 1:
            path = files[0]
        elif files:
            return {name: f for f in files for name in _names(f)}
        else:
            raise FileNotFoundError(f"{path}: no *.safetensors or *.safetensors.index.json file")
    if path.name.endswith(".index.json"):
        weight_map = json.loads(path.read_text())["weight_map"]
        return {name: path.parent / file for name, file in weight_map.items()}
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    return {name: path for name in _names(path)}


def _names(file: Path) -> list[str]:
    with safe_open(file, "np") as f:
        return list(f.keys())


class CheckpointReader:
    """Keeps one open handle per safetensors file and reads slices of named tensors.

    `rename` maps the names stored in the files to the names callers use (e.g. one checkpoint
    layout onto another); by default names are used as stored.
    """

    def __init__(self, path: str | Path, rename: Callable[[str], str] | None = None):
        self.path = Path(path)
        rename = rename or (lambda name: name)
        self.files = {rename(name): (file, name) for name, file in tensor_files(path).items()}
        self._handles: dict[Path, object] = {}

    def _slice(self, name: str):
        if name not in self.files:
            raise UserError(f"{self.path}: tensor {name!r} is not in the checkpoint")
        file, stored = self.files[name]
        if not file.exists():
            raise FileNotFoundError(f"{self.path}: file {file.name} holding tensor {name!r} is missing")
        if file not in self._handles:
            self._handles[file] = safe_open(file, "np")
        return self._handles[file].get_slice(stored)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def read(self, name: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
        tensor = self._slice(name)
        if index is None:
            return tensor[:]
        return tensor[tuple(slice(s.start, s.stop) for s in index)]


def _global_shape(reader: CheckpointReader, name: str, source: Source) -> tuple[int, ...] | None:
    if source.transform is not None:
        return None
    shape = reader.shape(name)
    return tuple(shape[p] for p in source.perm) if source.perm else shape


def load_array(
    reader: CheckpointReader, source: Source, path: str, shape: tuple[int, ...], dtype, sharding
) -> jax.Array:
    """One parameter as a global `jax.Array` in `sharding`, each device reading only its slice."""
    shape = tuple(shape)
    if source.stacked and shape[:1] != (len(source.names),):
        raise UserError(
            f"parameter {path}: {len(source.names)} stacked checkpoint tensors, model expects shape {shape}"
        )
    tensor_shape = shape[1:] if source.stacked else shape  # of one (transformed) checkpoint tensor
    for name in source.names:
        found = _global_shape(reader, name, source)
        if found is not None and found != tensor_shape:
            raise UserError(
                f"parameter {path}: checkpoint tensor {name!r} gives shape {found}, "
                f"model expects {tensor_shape}"
            )
    full: dict[str, np.ndarray] = {}

    def read(name: str, index: tuple[slice, ...]) -> np.ndarray:
        if source.transform is not None:
            if name not in full:
                value = np.asarray(source.transform(reader.read(name)))
                if value.shape != tensor_shape:
                    raise UserError(
                        f"parameter {path}: transformed tensor {name!r} has shape {value.shape}, "
                        f"model expects {tensor_shape}"
                    )
                full[name] = value
            return full[name][index].astype(dtype)
        if source.perm is None:
            return reader.read(name, index).astype(dtype)
        src_index = [slice(None)] * len(index)
        for ours, theirs in enumerate(source.perm):
            src_index[theirs] = index[ours]
        return reader.read(name, tuple(src_index)).transpose(source.perm).astype(dtype)

    def callback(index: tuple[slice, ...]) -> np.ndarray:
        index = tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape, strict=False))
        if not source.stacked:
            return read(source.name, index)
        layers = range(*index[0].indices(shape[0]))
        return np.stack([read(source.names[i], index[1:]) for i in layers])

    return jax.make_array_from_callback(shape, sharding, callback)


def load_sharded(
    make_model: Callable[[], nnx.Module],
    checkpoint: str | Path,
    sources: Mapping[str, Source | str],
    shardings: Callable[[nnx.State], nnx.State],
    rename: Callable[[str], str] | None = None,
) -> nnx.Module:
    """A model whose every parameter is read, slice by slice, from `checkpoint` via `sources`.

    `sources` maps each `nnx.Param` path (dots) to a `Source` or a tensor name; a parameter that it
    does not cover is an error naming that path. `shardings` says where every variable goes: the
    model's abstract state → a tree like it of `Sharding`s (`sharding.params.state_shardings` with
    the run's mesh and rules). Other variables (RNG state, statistics) not in `sources` are
    initialised by `make_model`, directly sharded. `rename`: see `CheckpointReader`.
    """
    reader = CheckpointReader(checkpoint, rename)
    graphdef, abstract_state = nnx.split(nnx.eval_shape(make_model))
    shardings = shardings(abstract_state)
    sharding_of = {path_str(p): v.get_value() for p, v in nnx.to_flat_state(shardings)}
    flat, initialised = [], []
    for path, var in nnx.to_flat_state(abstract_state):
        name = path_str(path)
        if name not in sources:
            if isinstance(var, nnx.Param):
                raise KeyError(f"parameter {name}: no checkpoint tensor is mapped to it")
            initialised.append(name)
            continue
        source = sources[name]
        source = Source(source) if isinstance(source, str) else source
        value = var.get_value()
        array = load_array(reader, source, name, value.shape, value.dtype, sharding_of[name])
        flat.append((path, var.replace(array)))
    if initialised:
        keep = lambda path, _: path_str(path) in initialised  # noqa: E731
        init = jax.jit(lambda: nnx.state(make_model(), keep), out_shardings=nnx.state(shardings, keep))
        flat.extend(nnx.to_flat_state(init()))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))
