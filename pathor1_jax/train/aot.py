"""Ahead-of-time compilation of a stage's step for a TPU slice that is not here (as MaxText's
`train_compile.py`): the step is lowered with ShapeDtypeStructs carrying the run's shardings over
libtpu's abstract devices and compiled by the real XLA TPU and Mosaic compilers; the executable's
memory analysis, HLO and the step's analytic FLOPs give the report `pathor1 compile` prints.

    mesh = make_mesh(config.mesh, topology_devices(topo))
    step = stages.resolve(entry.compile)(config, mesh, rules, topo.num_hosts)   # an `AotStep`
    report = compile_step(step, mesh, rules, topo)                              # a `CompileReport`

A stage's `compile` hook builds its `AotStep` from its config: the same jitted function the trainer
calls, its static arguments, and abstract state and batch with the trainer's shardings. Nothing is
allocated: a 7B model on 32 chips compiles on a laptop.

FLOPs per step are analytic (`lm_flops`, `clip_flops`): the compiler's `cost_analysis()` counts a
scanned (`while`) body once, so with layers under `nnx.scan` and micro-batches under `lax.scan` its
number is per layer and micro-batch, and it omits Pallas kernels entirely.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from pathor1_jax.errors import UserError
from pathor1_jax.kernels.platform import recording_impls
from pathor1_jax.logical import Rules, use_rules
from pathor1_jax.sharding.topology import GIB, Topology

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
_COLLECTIVE = re.compile(r"\b(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
_KERNEL_NAME = re.compile(r"^\s*(?:ROOT\s+)?%([A-Za-z_][A-Za-z0-9_]*?)(?:\.\d+)?\s*=")  # the instruction
_OP_NAME = re.compile(r'op_name="([^"]+)"')  # the JAX op an HLO instruction came from
_INSTRUCTION = re.compile(r"%([A-Za-z_][\w.-]*) = ")
_FINDING = re.compile(r"\}\. (.+?\.)(?:\s|$)")  # the sentence after an instruction's text: what went wrong
_OOM = re.compile(r"HLO temporaries \(([\d.]+)([KMGT])\).*?available HBM \(([\d.]+)([KMGT])\)", re.S)
_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


@dataclasses.dataclass(frozen=True)
class AotStep:
    """A stage's step, ready to lower: `fn(*args)` with `fn` jitted (static arguments are values in
    `args`, at the jit's `static_argnums`), `flops` its analytic FLOPs per optimizer step summed
    over all devices, `shapes` what one step processes (printed, e.g. rows, tokens, patches)."""

    fn: Callable
    args: tuple
    flops: float
    shapes: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class CompileReport:
    """What the TPU compiler says about one step on one slice (per-device bytes)."""

    topology: Topology
    arguments: int
    outputs: int
    aliased: int
    temporaries: int
    flops_per_step: float
    attention: str
    policy_loss: str | None
    mosaic_kernels: Mapping[str, int]
    collectives: Mapping[str, int]
    compile_seconds: float
    shapes: Mapping[str, Any]
    cost_flops: float | None = None  # cost_analysis(): per device, scanned bodies counted once
    refused: str | None = None  # why there is no executable (too big to compile, compiler's OOM)

    @property
    def total(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temporaries

    @property
    def hbm_bytes(self) -> int:
        return self.topology.chip.hbm_bytes

    @property
    def fits(self) -> bool:
        return self.refused is None and self.total <= self.hbm_bytes

    @property
    def ideal_step_seconds(self) -> float:
        """The step at the chips' peak bf16 FLOP/s (compute bound, perfect overlap)."""
        return self.flops_per_step / (self.topology.num_devices * self.topology.chip.peak_bf16_flops)

    def verdict(self) -> str:
        """One line: fits, or why not."""
        usable = f"{self.topology.chip.name} chips have {_gib(self.hbm_bytes)} usable HBM"
        if self.fits:
            return f"fits: {_gib(self.total)} per device; {usable}"
        need = self.refused or f"the step needs {_gib(self.total)} per device"
        return f"does not fit: {need}; {usable}"

    def to_json(self) -> dict:
        return {
            "topology": self.topology.name,
            "devices": self.topology.num_devices,
            "per_device_bytes": {
                "arguments": self.arguments,
                "outputs": self.outputs,
                "temporaries": self.temporaries,
                "total": self.total,
            },
            "hbm_bytes": self.hbm_bytes,
            "fits": self.fits,
            "flops_per_step": self.flops_per_step,
            "attention": self.attention,
            "policy_loss": self.policy_loss,
            "compile_seconds": round(self.compile_seconds, 2),
        }

    def text(self) -> str:
        topo, chip = self.topology, self.topology.chip
        kernels = ", ".join(f"{k} x{n}" for k, n in sorted(self.mosaic_kernels.items())) or "none"
        collectives = ", ".join(f"{k} x{n}" for k, n in self.collectives.items() if n) or "none"
        shapes = ", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}" for k, v in self.shapes.items())
        temporaries = _gib(self.temporaries) + (f" ({self.refused})" if self.refused else "")
        lines = [
            f"topology: {topo.describe()}",
            f"step: {shapes}",
            "per device:",
            f"  arguments    {_gib(self.arguments)}",
            f"  outputs      {_gib(self.outputs)} ({_gib(self.aliased)} aliased to donated arguments)",
            f"  temporaries  {temporaries}",
            f"  total        {_gib(self.total)} of {_gib(self.hbm_bytes)} usable HBM per {chip.name} chip "
            f"({chip.published_hbm} published): {'fits' if self.fits else 'does NOT fit'}",
            f"FLOPs per step: {self.flops_per_step:.3e} (analytic, all chips; "
            f"{self.flops_per_step / topo.num_devices:.3e} per chip)",
            f"ideal step: {self.ideal_step_seconds:.3f} s at {chip.peak_bf16_flops / 1e12:.0f} TFLOP/s "
            "bf16 peak per chip (compute bound)",
            f"attention: {self.attention}; policy loss: {self.policy_loss or '-'}",
            f"Mosaic kernels (tpu_custom_call): {kernels}",
            f"collectives: {collectives}",
            f"compile: {self.compile_seconds:.1f} s",
        ]
        if self.cost_flops is not None:
            lines.insert(
                -4,
                f"compiler cost_analysis: {self.cost_flops:.3e} FLOPs per chip (counts each scanned "
                "body once and no Pallas kernel: not a per-step number)",
            )
        return "\n".join(lines)


def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


def sds(shape: tuple[int, ...], dtype, sharding: NamedSharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), np.dtype(dtype), sharding=sharding)


def per_device_bytes(tree: Any) -> int:
    """Bytes one device holds of the arrays / ShapeDtypeStructs (with shardings) in `tree`; other
    leaves (static arguments) count nothing."""
    total = 0
    for x in jax.tree.leaves(tree):
        if not (hasattr(x, "shape") and hasattr(x, "dtype")):
            continue
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
        total += math.prod(shape) * np.dtype(x.dtype).itemsize
    return total


def count_collectives(hlo: str) -> dict[str, int]:
    """Collective operations in an HLO module's text, by kind (async start/done pairs count once)."""
    counts = dict.fromkeys(COLLECTIVES, 0)
    for match in _COLLECTIVE.finditer(hlo):
        counts[match.group(1)] += 1
    return counts


def mosaic_kernels(hlo: str) -> dict[str, int]:
    """Mosaic (Pallas TPU) kernels of an HLO module's text: name (the pallas_call's, which names the
    custom-call instruction: `%token_logprobs_fwd.8 = ... custom_call_target="tpu_custom_call"`) →
    number of custom calls."""
    counts: dict[str, int] = {}
    for line in hlo.splitlines():
        if '"tpu_custom_call"' not in line:
            continue
        m = _KERNEL_NAME.search(line)
        name = m.group(1) if m else "unnamed"
        counts[name] = counts.get(name, 0) + 1
    return counts


def compiler_error(message: str) -> str:
    """One line from the TPU compiler's error message: its first line, the JAX op (kernel) of the
    instruction that failed, and what went wrong, without the instruction's HLO text, e.g.
    `RESOURCE_EXHAUSTED: E1001: CompileTimeScopedVmemOom in jit(step)/flash_attention_fwd/pallas_call:
    Scoped allocation with size 64.25M and limit 60.00M exceeded scoped vmem limit by 4.25M.`"""
    head, _, rest = message.strip().partition("\n")
    line = head.rstrip(": ")
    where = _OP_NAME.search(rest) or _INSTRUCTION.search(rest)
    if where:
        line += f" in {where.group(1)}"
    finding = _FINDING.search(rest)
    return f"{line}: {finding.group(1)}" if finding else line


def _bytes(value: str, unit: str) -> int:
    return int(float(value) * _UNITS[unit])


def _describe_impls(impls: Mapping[str, set[str]], op: str) -> str | None:
    found = sorted(impls.get(op, ()))
    return "+".join(found) if found else None


def compile_step(step: AotStep, mesh: Mesh, rules: Rules, topology: Topology) -> CompileReport:
    """Lower and compile `step` for `mesh` (over `topology`'s devices) with `rules` in context.

    Not fitting is reported, not raised (`refused` says why): arguments (state and batch, from their
    abstract shardings) that alone exceed the chip's usable HBM are not compiled at all; a program
    whose temporaries alone exceed it is refused by the compiler, which says how much it needed. A
    layout that does not lower (an indivisible dimension) is a `UserError`.
    """
    start = time.perf_counter()
    arguments = per_device_bytes(step.args)
    common = dict(topology=topology, flops_per_step=float(step.flops), shapes=dict(step.shapes))
    if arguments > topology.chip.hbm_bytes:  # nothing to compile: the state alone does not fit
        return CompileReport(
            arguments=arguments, outputs=0, aliased=0, temporaries=0, attention="not compiled",
            policy_loss=None, mosaic_kernels={}, collectives={},
            compile_seconds=time.perf_counter() - start,
            refused=f"the arguments alone (state and batch) need {_gib(arguments)} per device", **common,
        )  # fmt: skip
    compiled = refused = None
    with jax.set_mesh(mesh), use_rules(mesh, rules), recording_impls() as impls:
        try:
            lowered = step.fn.lower(*step.args)
        except ValueError as e:  # e.g. a sharded dimension that the mesh does not divide
            raise UserError(f"the step does not lower on this mesh: {str(e).splitlines()[0]}") from e
        try:
            compiled = lowered.compile()
        except jax.errors.JaxRuntimeError as e:
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            refused = _OOM.search(str(e))
            if refused is None:
                raise UserError(f"the TPU compiler refused the step: {compiler_error(str(e))}") from e
    common.update(
        attention=_describe_impls(impls, "attention") or "none",
        policy_loss=_describe_impls(impls, "policy_loss"),
        compile_seconds=time.perf_counter() - start,
    )
    if compiled is None:
        temporaries = _bytes(refused.group(1), refused.group(2))
        return CompileReport(
            arguments=arguments,
            outputs=arguments,  # the step returns its (donated) state: outputs alias arguments
            aliased=arguments,
            temporaries=temporaries,
            mosaic_kernels={},
            collectives={},
            refused=f"the compiler refused it: its temporaries alone need {_gib(temporaries)} per device",
            **common,
        )
    memory = compiled.memory_analysis()
    hlo = compiled.as_text()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return CompileReport(
        arguments=int(memory.argument_size_in_bytes),
        outputs=int(memory.output_size_in_bytes),
        aliased=int(memory.alias_size_in_bytes),
        temporaries=int(memory.temp_size_in_bytes),
        mosaic_kernels=mosaic_kernels(hlo),
        collectives=count_collectives(hlo),
        cost_flops=float(cost.get("flops", 0.0)) if cost else None,
        **common,
    )


# ---------------------------------------------------------------------------------- analytic FLOPs


def attention_flops(rows: int, q_len: int, kv_len: float, heads: int, head_dim: int) -> float:
    """Forward FLOPs of softmax attention (QKᵀ and PV): each of `rows × q_len` queries against
    `kv_len` keys on average (a causal row of T sees (T + 1) / 2)."""
    return 4.0 * rows * q_len * kv_len * heads * head_dim


def train_multiplier(trainable: bool, upstream_trainable: bool, remat: bool = False) -> float:
    """Forward passes' worth of FLOPs a part costs in a train step: 1 forward, + 1 for its weight
    gradients when it trains, + 1 for its input gradient when something before it trains, + 1 when
    its forward is rematerialised in the backward pass."""
    if not trainable and not upstream_trainable:
        return 1.0
    return 1.0 + float(trainable) + float(upstream_trainable) + float(remat)


def param_counts(params: Any, freeze: tuple[str, ...], prefixes: Mapping[str, tuple[str, ...]]) -> dict:
    """For each named part (a tuple of dotted path prefixes): `(parameters, trainable)`, from a train
    state's params (arrays or ShapeDtypeStructs) and the config's `freeze` regexes."""
    from pathor1_jax.train.optim import FROZEN, param_labels, path_name

    labels = param_labels(params, freeze)
    out = {name: [0, False] for name in prefixes}
    for (path, leaf), label in zip(
        jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(labels), strict=True
    ):
        name = path_name(path)
        for part, starts in prefixes.items():
            if name.startswith(starts):
                out[part][0] += math.prod(leaf.shape)
                out[part][1] |= label != FROZEN
    return {part: (n, trainable) for part, (n, trainable) in out.items()}


QWEN_PARTS = {
    "vision": ("model.visual.patch_embed", "model.visual.blocks"),
    "merger": ("model.visual.merger",),
    "embed": ("model.language_model.embed_tokens",),
    "decoder": ("model.language_model.layers",),
    "head": ("lm_head",),
}


def qwen_flops(
    cfg,
    params: Any,
    freeze: tuple[str, ...],
    *,
    rows: int,
    length: int,
    patches: int,
    image_patches: int,
    head_positions: int,
    remat: str = "none",
) -> float:
    """Analytic FLOPs of one Qwen2.5-VL train step (forward + backward over trainable parts).

    rows × length tokens through the decoder (causal attention within each row), `patches` pixel
    patches through the vision tower (window attention within (window/patch)² patches, full
    attention within an image of at most `image_patches`), `head_positions` positions through the LM
    head. Matmul FLOPs are 2 × parameters × positions; each part is multiplied by the passes a train
    step makes over it (`train_multiplier`): frozen parts before anything trainable run forward only,
    `remat="full"` recomputes the layers' forward, the chunked/fused LM-head losses recompute logits.
    """
    counts = param_counts(params, freeze, QWEN_PARTS)
    text, vision = cfg.text, cfg.vision
    if counts["head"][0] == 0:  # tied: the embedding table is the head
        counts["head"] = (text.vocab_size * text.hidden_size, counts["embed"][1])
    full = remat == "full"
    vis_n, vis_train = counts["vision"]
    merge_n, merge_train = counts["merger"]
    dec_n, dec_train = counts["decoder"]
    head_n, head_train = counts["head"]
    window = (vision.window_size // vision.patch_size) ** 2
    full_blocks = sum(i < vision.depth for i in vision.fullatt_block_indexes)
    heads, head_dim = vision.num_heads, vision.head_dim
    vision_attention = (vision.depth - full_blocks) * attention_flops(
        1, patches, min(window, patches), heads, head_dim
    ) + full_blocks * attention_flops(1, patches, min(image_patches, patches), heads, head_dim)
    vision_flops = 2.0 * vis_n * patches + vision_attention
    flops = vision_flops * train_multiplier(vis_train, False, full and vis_train)
    upstream = vis_train
    flops += 2.0 * merge_n * patches / vision.spatial_merge_size**2 * train_multiplier(merge_train, upstream)
    upstream = upstream or merge_train or counts["embed"][1]
    decoder = (
        2.0 * dec_n * rows * length
        + attention_flops(rows, length, (length + 1) / 2, text.num_attention_heads, text.head_dim)
        * text.num_hidden_layers
    )
    flops += decoder * train_multiplier(dec_train, upstream, full and (dec_train or upstream))
    upstream = upstream or dec_train
    flops += 2.0 * head_n * head_positions * train_multiplier(head_train, upstream, remat=True)
    return flops


CLIP_PARTS = {
    "vision": ("vision_model.", "visual_projection"),
    "text": ("text_model.", "text_projection"),
}


def clip_flops(cfg, params: Any, freeze: tuple[str, ...], *, rows: int, remat: str = "none") -> float:
    """Analytic FLOPs of one CLIP contrastive step on `rows` image–caption pairs: both towers
    forward + backward (full attention over the class token and patches, causal over the caption's
    tokens), and the global batch's `rows × rows` similarity matrix both ways."""
    counts = param_counts(params, freeze, CLIP_PARTS)
    full = remat == "full"
    vision, text = cfg.vision, cfg.text
    seq = vision.num_patches + 1
    vision_flops = 2.0 * counts["vision"][0] * rows * seq + vision.num_hidden_layers * attention_flops(
        rows, seq, seq, vision.num_attention_heads, vision.hidden_size // vision.num_attention_heads
    )
    length = text.max_position_embeddings
    text_flops = 2.0 * counts["text"][0] * rows * length + text.num_hidden_layers * attention_flops(
        rows, length, (length + 1) / 2, text.num_attention_heads, text.hidden_size // text.num_attention_heads
    )
    flops = vision_flops * train_multiplier(counts["vision"][1], False, full and counts["vision"][1])
    flops += text_flops * train_multiplier(counts["text"][1], False, full and counts["text"][1])
    return flops + 2.0 * rows * rows * cfg.projection_dim * 3  # logits: forward, d(image), d(text)
