"""The oracle and the baselines every evaluation reports, computed from an outcome table.

Oracle, per (sample, budget): the highest-scoring config whose latency fits the budget, ties to the
cheapest; when none fits, the config with the best reward under the penalty in use. Scores are the
sample's own (what evaluation reports), or expected scores averaged over similar requests
(`expected_scores`, what behaviour cloning imitates by default). Baselines: the best static config
(one config for all requests, chosen on the train split), the max config, and a random feasible config.
"""

from __future__ import annotations

import numpy as np

from envs.atomic import atomic_path
from envs.budgets import Penalty
from envs.outcomes import OutcomeTable


def oracle_configs(table: OutcomeTable, budgets: np.ndarray, penalty: Penalty | None = None) -> np.ndarray:
    """Config index per sample ([n]) for per-sample budgets ([n], ms)."""
    return oracle_from_arrays(table.score, table.latency, budgets, penalty)


def oracle_from_arrays(score: np.ndarray, latency: np.ndarray, budgets: np.ndarray,
                       penalty: Penalty | None = None) -> np.ndarray:  # fmt: skip
    """`oracle_configs` on raw [n, c] score and latency arrays.

    Where nothing fits, the cheapest config; or, given the `penalty`, the config with the highest
    reward (score - penalty): under the indicator penalty every config pays the same, so the best
    score, ties to the cheapest. That is the reward-maximising choice the environments reward.
    """
    budgets = np.asarray(budgets, dtype=np.float64).reshape(-1, 1)
    fits = latency <= budgets
    # lexicographic: fits first, then score, then lower latency
    key = np.where(fits, score.astype(np.float64) * 1e9 - latency, -np.inf)
    if penalty is None:
        fallback = latency.argmin(axis=1)
    else:
        fallback = ((score - penalty(latency, budgets)).astype(np.float64) * 1e9 - latency).argmax(axis=1)
    return np.where(fits.any(axis=1), key.argmax(axis=1), fallback)


def expected_scores(score: np.ndarray, features: np.ndarray, k: int = 32, rows: np.ndarray | None = None,
                    shrink: float = 1.0) -> np.ndarray:  # fmt: skip
    """Each sample's score per config averaged over its k nearest other samples ([n, c]).

    Distances are Euclidean on standardised `features` (what a controller observes of a request),
    the sample itself is left out, and only `rows` (default all) serve as neighbours. The result
    estimates E[score | observation]: an oracle that maximises it asks a controller for what it can
    learn, where the per-sample oracle asks it to guess which config one sample happened to get right.
    `shrink` < 1 moves each estimate that far from the config's mean over `rows` towards it: the mean
    of k neighbours is noisy, and an argmax over many noisy estimates picks the lucky ones.
    """
    rows = np.arange(len(score)) if rows is None else np.asarray(rows)
    if len(rows) < 2:
        raise ValueError("expected scores need at least two samples")
    if not 0.0 <= shrink <= 1.0:
        raise ValueError(f"shrink must lie in [0, 1], got {shrink}")
    x = np.asarray(features, dtype=np.float64)
    x = (x - x[rows].mean(0)) / (x[rows].std(0) + 1e-6)
    d = ((x[:, None] - x[None, rows]) ** 2).sum(-1)
    d[rows, np.arange(len(rows))] = np.inf  # leave the sample itself out
    k = min(k, len(rows) - 1)
    nearest = rows[np.argpartition(d, k - 1, axis=1)[:, :k]]
    overall = score[rows].mean(axis=0)
    return overall + shrink * (score[nearest].mean(axis=1) - overall)


def max_config(table: OutcomeTable) -> int:
    return max(range(len(table.configs)), key=lambda j: (table.configs[j].top_k, table.configs[j].blocks,
                                                         table.configs[j].tier == "high"))  # fmt: skip


def best_static_config(train: OutcomeTable, budgets: np.ndarray, penalty: Penalty | None = None) -> int:
    """The one config with the highest mean reward on the train split under these budgets."""
    return best_static_from_arrays(train.score, train.latency, budgets, penalty or Penalty())


def best_static_from_arrays(score: np.ndarray, latency: np.ndarray, budgets: np.ndarray, penalty: Penalty) -> int:
    budgets = np.asarray(budgets, dtype=np.float64).reshape(-1, 1)
    return int((score - penalty(latency, budgets)).mean(axis=0).argmax())


def random_feasible_configs(table: OutcomeTable, budgets: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Uniform among configs that fit each sample's budget; the cheapest when none fits."""
    return random_feasible_from_arrays(table.latency, budgets, rng)


def random_feasible_from_arrays(latency: np.ndarray, budgets: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    budgets = np.asarray(budgets, dtype=np.float64).reshape(-1, 1)
    fits = latency <= budgets
    noise = np.where(fits, rng.random(fits.shape), -1.0)
    return np.where(fits.any(axis=1), noise.argmax(axis=1), latency.argmin(axis=1))


def pareto_front(accuracy: np.ndarray, latency: np.ndarray) -> np.ndarray:
    """Indices of configs no other config beats on both accuracy (higher) and latency (lower)."""
    order = np.lexsort((-accuracy, latency))
    front, best = [], -np.inf
    for j in order:
        if accuracy[j] > best:
            front.append(int(j))
            best = accuracy[j]
    return np.array(front)


def pareto_plot(table: OutcomeTable, path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc, lat = table.score.mean(axis=0), table.latency.mean(axis=0)
    front = pareto_front(acc, lat)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = {"low": "tab:blue", "medium": "tab:orange", "high": "tab:green"}
    for tier, colour in colours.items():
        js = [j for j, c in enumerate(table.configs) if c.tier == tier]
        ax.scatter(lat[js], acc[js], s=18, color=colour, label=f"tier {tier}", alpha=0.8)
    ax.plot(lat[front], acc[front], "k-", lw=1, label="Pareto front")
    for j in front:
        c = table.configs[j]
        ax.annotate(f"{c.tier[0]}/k{c.top_k}/b{c.blocks}", (lat[j], acc[j]), fontsize=6, xytext=(3, -8),
                    textcoords="offset points")  # fmt: skip
    ax.set_xlabel("mean latency (ms)")
    ax.set_ylabel("mean VQA accuracy")
    ax.set_title(title or f"accuracy vs latency of the {len(table.configs)} configs")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
