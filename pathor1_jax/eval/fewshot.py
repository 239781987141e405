"""Few-shot linear probing on frozen features: the paper's Figure 3 protocol, as the authors' script
(`clip/val/few_shot_evaluation.py` of the Patho-R1 repository) runs it.

For each shot count, `trials` subsets of `shots` training images per class are drawn as the script
draws them: subset t (1..trials) seeds numpy's legacy generator with `seed + t` (seed 42), then for
each class in label order picks `min(shots, n_class)` of that class's indices (in dataset order)
without replacement. So the subsets equal the script's when the records are listed in its
`ImageFolder` order (class folders sorted, files sorted) and labels number the classes in that order.
Note the seed does not depend on the shot count, as in the script.

On each subset a multinomial logistic regression is fitted to the raw (unnormalised) image features,
as scikit-learn's `LogisticRegression(C=1, solver="lbfgs", max_iter=1000, multi_class="multinomial")`
fits it: minimise Σ_i CE_i + ½/C · ‖W‖² (the bias not penalised; one weight row per class, also for
two classes), here as the equivalent mean CE + ‖W‖² / (2Cn) (scikit-learn's own scaling) with optax
L-BFGS in float32 from zero weights, at most `max_iter` iterations, stopping once max |∇| ≤ `tol`
= 1e-4 (scikit-learn's default rule, so the fit stops where the script's does: same iteration counts
and coefficients within 1e-3 in our tests). Test accuracy is reported per trial, with mean ± std
(population, as the script), and drawn as a box plot.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

SHOTS = (2, 8, 16, 32, 64, 128)
SEED = 42  # the official script's --global_seed


@functools.partial(jax.jit, static_argnames=("num_classes", "max_iter"))
def fit_logistic_regression(
    x: jax.Array, y: jax.Array, num_classes: int, C: float = 1.0, max_iter: int = 1000, tol: float = 1e-4
) -> tuple[tuple[jax.Array, jax.Array], jax.Array]:
    """((W `[P, C]`, b `[C]`), iterations) minimising mean CE + ‖W‖² / (2·C·n) over x `[n, P]`,
    y `[n]` (scikit-learn's C-regularised multinomial objective divided by n)."""
    n = x.shape[0]

    def objective(params):
        w, b = params
        ce = optax.softmax_cross_entropy_with_integer_labels(x @ w + b, y).mean()
        return ce + jnp.sum(w * w) / (2.0 * C * n)

    params = (jnp.zeros((x.shape[1], num_classes), x.dtype), jnp.zeros((num_classes,), x.dtype))
    solver = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(objective)

    def step(carry):
        params, state, k, _ = carry
        value, grad = value_and_grad(params, state=state)
        g_max = optax.tree.max(jax.tree.map(jnp.abs, grad))
        updates, state = solver.update(grad, state, params, value=value, grad=grad, value_fn=objective)
        updates = jax.tree.map(lambda u: jnp.where(g_max > tol, u, 0.0), updates)  # converged: stay
        return optax.apply_updates(params, updates), state, k + (g_max > tol), g_max

    def running(carry):
        return (carry[2] < max_iter) & (carry[3] > tol)

    carry = (params, solver.init(params), jnp.int32(0), jnp.asarray(jnp.inf, x.dtype))
    params, _, iterations, _ = jax.lax.while_loop(running, step, carry)
    return params, iterations


def sample_subset(labels: np.ndarray, shots: int, subset: int, seed: int = SEED) -> np.ndarray:
    """Indices of `shots` training examples per class (all of a smaller class) for subset number
    `subset` (1-based), drawn as the official script draws them (see the module doc)."""
    rng = np.random.RandomState(seed + subset)
    picked = []
    for c in range(int(labels.max()) + 1):
        idxs = np.flatnonzero(labels == c)
        if len(idxs):
            picked.extend(rng.choice(idxs, size=min(shots, len(idxs)), replace=False).tolist())
    return np.asarray(picked, np.int64)


def few_shot(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    shots: Sequence[int] = SHOTS,
    trials: int = 10,
    seed: int = SEED,
    C: float = 1.0,
    max_iter: int = 1000,
) -> dict[int, list[float]]:
    """Test accuracy of each trial, per shot count, on raw features (see the module doc)."""
    train_x, test_x = np.asarray(train_features, np.float32), np.asarray(test_features, np.float32)
    train_y, test_y = np.asarray(train_labels), np.asarray(test_labels)
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    results: dict[int, list[float]] = {}
    for s in shots:
        accuracies = []
        for t in range(1, trials + 1):
            idx = sample_subset(train_y, s, t, seed)
            (w, b), _ = fit_logistic_regression(
                jnp.asarray(train_x[idx]), jnp.asarray(train_y[idx]), num_classes, C=C, max_iter=max_iter
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
