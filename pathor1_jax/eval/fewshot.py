"""Few-shot linear probing on frozen features (the paper's Figure 3 protocol).

For each shot count, `trials` random subsets of `shots` training examples per class (seeded:
subset t of shot count s uses `numpy.random.default_rng([seed, s, t])`) train a multinomial
logistic regression (full-batch, optax L-BFGS, L2-regularised) on L2-normalised features; test
accuracy is reported per trial, with mean ± std, and drawn as a box plot.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .zeroshot import normalize

SHOTS = (2, 8, 16, 32, 64, 128)


@functools.partial(jax.jit, static_argnames=("num_classes", "steps"))
def fit_logistic_regression(x: jax.Array, y: jax.Array, num_classes: int, l2: float = 1e-3, steps: int = 100):
    """Weights `[P, C]` and bias `[C]` minimising mean cross-entropy + l2·|W|² (L-BFGS, full batch)."""

    def loss(params):
        w, b = params
        return optax.softmax_cross_entropy_with_integer_labels(x @ w + b, y).mean() + l2 * jnp.sum(w * w)

    params = (jnp.zeros((x.shape[1], num_classes), x.dtype), jnp.zeros((num_classes,), x.dtype))
    solver = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(loss)

    def step(_, carry):
        params, state = carry
        value, grad = value_and_grad(params, state=state)
        updates, state = solver.update(grad, state, params, value=value, grad=grad, value_fn=loss)
        return optax.apply_updates(params, updates), state

    return jax.lax.fori_loop(0, steps, step, (params, solver.init(params)))[0]


def sample_subset(labels: np.ndarray, shots: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of `shots` examples of every class (all of a class that has fewer)."""
    picked = [rng.permutation(np.flatnonzero(labels == c))[:shots] for c in np.unique(labels)]
    return np.sort(np.concatenate(picked))


def few_shot(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    shots: Sequence[int] = SHOTS,
    trials: int = 10,
    seed: int = 0,
) -> dict[int, list[float]]:
    """Test accuracy of each trial, per shot count."""
    train_x, test_x = normalize(train_features), normalize(test_features)
    train_y, test_y = np.asarray(train_labels), np.asarray(test_labels)
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    results: dict[int, list[float]] = {}
    for s in shots:
        accuracies = []
        for t in range(trials):
            idx = sample_subset(train_y, s, np.random.default_rng([seed, s, t]))
            w, b = fit_logistic_regression(
                jnp.asarray(train_x[idx], jnp.float32), jnp.asarray(train_y[idx]), num_classes
            )
            predictions = np.argmax(test_x @ np.asarray(w) + np.asarray(b), axis=-1)
            accuracies.append(float((predictions == test_y).mean()))
        results[s] = accuracies
    return results


def plot_few_shot(
    results: dict[int, list[float]], path: str | os.PathLike, zero_shot: float | None = None
) -> None:
    """Box plot of accuracy (%) per shot count, with the zero-shot accuracy as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    shots = sorted(results)
    ax.boxplot([np.asarray(results[s]) * 100 for s in shots], tick_labels=[str(s) for s in shots])
    if zero_shot is not None:
        ax.axhline(zero_shot * 100, linestyle="--", color="gray", label="zero-shot")
        ax.legend()
    ax.set_xlabel("training examples per class")
    ax.set_ylabel("accuracy (%)")
    fig.tight_layout()
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
