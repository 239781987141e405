"""The two learned pieces of curation as jitted JAX on a device mesh: a softmax classifier head
(subfields) and K-means with k-means++ seeding and restarts (difficulty clusters).

Rows are sharded over the mesh's `data` and `fsdp` axes (padded to a multiple of the device count,
padding rows carry weight 0); parameters and centroids are replicated, so XLA inserts the
cross-device sums of the gradients and of the per-cluster sums.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

ROWS = P(("data", "fsdp"))


def default_mesh() -> Mesh:
    from pathor1_jax.sharding.mesh import make_mesh

    return make_mesh({"data": -1, "fsdp": 1, "tensor": 1})


def shard_rows(x: np.ndarray, mesh: Mesh, *arrays: np.ndarray) -> tuple[jax.Array, ...]:
    """`x` and `arrays` (same leading size) padded to the device count and sharded by rows, plus
    the row weights (1 real, 0 padding) as the last output."""
    n = x.shape[0]
    m = mesh.devices.size
    pad = (-n) % m
    weight = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
    out = []
    for a in (x, *arrays, weight):
        a = np.asarray(a)
        if a.shape[0] == n:
            a = np.concatenate([a, np.zeros((pad, *a.shape[1:]), a.dtype)])
        out.append(jax.device_put(a, NamedSharding(mesh, P(ROWS[0], *([None] * (a.ndim - 1))))))
    return tuple(out)


# ---------------------------------------------------------------------------------------------------
# Softmax head


@dataclasses.dataclass(frozen=True)
class HeadConfig:
    steps: int = 300
    learning_rate: float = 0.05
    l2: float = 1e-4
    seed: int = 0


@partial(jax.jit, static_argnames=("num_classes", "steps", "learning_rate", "l2"))
def _train_head(seed, xs, ys, w, *, num_classes: int, steps: int, learning_rate: float, l2: float):
    """Initialise the head and run all `steps` full-batch Adam steps in one program (the step
    scanned); the data are arguments, not constants, so a second call with the same shapes reuses it."""
    key = jax.random.key(seed)
    params = {"W": 0.01 * jax.random.normal(key, (xs.shape[1], num_classes)), "b": jnp.zeros(num_classes)}
    opt = optax.adam(learning_rate)

    def loss_fn(p):
        logits = xs @ p["W"] + p["b"]  # [N, C]
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, ys)
        return jnp.sum(w * nll) / jnp.maximum(jnp.sum(w), 1.0) + l2 * jnp.sum(p["W"] ** 2)

    def step(carry, _):
        p, s = carry
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, s = opt.update(grads, s, p)
        return (optax.apply_updates(p, updates), s), loss

    (params, _), losses = jax.lax.scan(step, (params, opt.init(params)), None, length=steps)
    return params, losses


def train_head(
    x: np.ndarray, y: np.ndarray, num_classes: int, mesh: Mesh, cfg: HeadConfig = HeadConfig()
) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """A linear softmax head on features `x` [N, D] for integer labels `y` [N] (−1: unlabelled, ignored).

    Full-batch Adam on the mesh, the jitted step scanned over `cfg.steps`. Returns (W [D, C], b [C],
    the loss of each step).
    """
    labelled = y >= 0
    targets = np.where(labelled, y, 0).astype(np.int32)
    # row weights w: 1 for labelled rows, 0 for unlabelled and padding rows
    xs, ys, w, _ = shard_rows(x.astype(np.float32), mesh, targets, labelled.astype(np.float32))
    params, losses = _train_head(
        cfg.seed, xs, ys, w, num_classes=num_classes, steps=cfg.steps, learning_rate=cfg.learning_rate,
        l2=cfg.l2,
    )  # fmt: skip
    return np.asarray(params["W"]), np.asarray(params["b"]), np.asarray(losses).tolist()


def predict_head(x: np.ndarray, W: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Class probabilities [N, C]."""
    logits = x @ W + b
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True)


# ---------------------------------------------------------------------------------------------------
# K-means


def _sq_dists(x: jax.Array, c: jax.Array) -> jax.Array:
    """[N, K] squared distances."""
    return jnp.sum(x * x, 1, keepdims=True) - 2.0 * x @ c.T + jnp.sum(c * c, 1)[None, :]


def _kmeanspp(key: jax.Array, x: jax.Array, w: jax.Array, k: int) -> jax.Array:
    """k-means++ seeding: each next centre drawn with probability ∝ weight · D(x)²."""
    keys = jax.random.split(key, k)
    first = jax.random.categorical(keys[0], jnp.log(w))
    centres = jnp.zeros((k, x.shape[1]), x.dtype).at[0].set(x[first])
    d2 = jnp.sum((x - x[first]) ** 2, axis=1)
    for i in range(1, k):
        idx = jax.random.categorical(keys[i], jnp.log(jnp.maximum(w * d2, 1e-30)))
        centres = centres.at[i].set(x[idx])
        d2 = jnp.minimum(d2, jnp.sum((x - x[idx]) ** 2, axis=1))
    return centres


def _lloyd(centres: jax.Array, x: jax.Array, w: jax.Array, iters: int) -> tuple[jax.Array, jax.Array]:
    k = centres.shape[0]

    def body(_, c):
        onehot = jax.nn.one_hot(jnp.argmin(_sq_dists(x, c), axis=1), k, dtype=x.dtype) * w[:, None]
        counts = onehot.sum(0)  # [K]
        sums = onehot.T @ x  # [K, D]
        return jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1.0)[:, None], c)

    centres = jax.lax.fori_loop(0, iters, body, centres)
    inertia = jnp.sum(w * jnp.min(_sq_dists(x, centres), axis=1))
    return centres, inertia


@partial(jax.jit, static_argnames=("k", "n_init", "iters"))
def _kmeans(seed: jax.Array, x: jax.Array, w: jax.Array, k: int, n_init: int, iters: int):
    keys = jax.random.split(jax.random.key(seed), n_init)
    seeds = jax.vmap(lambda kk: _kmeanspp(kk, x, w, k))(keys)  # [R, K, D]
    centres, inertia = jax.vmap(lambda c: _lloyd(c, x, w, iters))(seeds)
    best = jnp.argmin(inertia)
    return centres[best], inertia[best], inertia


def kmeans(
    x: np.ndarray, k: int, mesh: Mesh, *, n_init: int = 10, iters: int = 100, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, float]:
    """(centres [k, D], labels [N], inertia) of the best of `n_init` k-means++-seeded Lloyd runs."""
    if x.shape[0] < k:
        raise ValueError(f"k-means needs at least k={k} points, got {x.shape[0]}")
    xs, w = shard_rows(x.astype(np.float32), mesh)
    centres, inertia, _ = _kmeans(seed, xs, w, k, n_init, iters)
    centres = np.asarray(centres)
    labels = np.argmin(((x[:, None, :] - centres[None]) ** 2).sum(-1), axis=1)
    return centres, labels, float(inertia)
