"""eval.json, eval.md and plots (accuracy and violation rate against budget) of a run."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from agents.evaluation import METRICS
from envs.atomic import atomic_path, write_json, write_text

ORDER = ("ppo", "bc_only", "oracle", "best_static", "max_config", "random_feasible")


def _names(block: dict) -> list[str]:
    return [n for n in ORDER if n in block] + sorted(n for n in block if n not in ORDER and not n.startswith("_"))


def _alpha(sel: dict) -> str:
    if "alpha" not in sel:  # a report without the threshold's alpha: nothing to say
        return ""
    return (
        f", the threshold that keeps a no-gain replacement below {sel['alpha']:g} over the checks, on "
        f"{sel['validation_requests']} validation requests"
    )


def _duration(minutes: float) -> str:
    return f"{minutes:.1f} min" if minutes >= 1 else f"{minutes * 60:.1f} s"


def _dataset(spec: dict) -> str:
    if spec.get("kind") == "synthvqa":
        return f"SynthVQA seed {spec['seed']}, {spec['n']} requests"
    return f"{spec.get('kind')} {Path(str(spec.get('path', ''))).name}"


def _sources(meta: dict) -> str:
    """Which assets, profile and tables a run used (an evaluation's `table`, a training run's `assets` record)."""
    if isinstance(meta.get("table"), dict):
        p, t = meta["profile"], meta["table"]
        return (f"{meta.get('split', 'test')} table {t['file']} ({t['requests']} requests; {_dataset(t['dataset'])}; "
                f"content {t['content']}); latency profile {p['name']} ({p['device']}, {p['date']})")  # fmt: skip
    rec = meta.get("assets")
    if isinstance(rec, dict):
        tables = ", ".join(f"{s} {t['file']} ({t['content']})" for s, t in rec["tables"].items())
        return (f"assets {rec['assets']} (model {rec['model']['path']}, weights {rec['model']['weights']}); latency "
                f"profile {rec['profile']['name']} ({rec['profile']['device']}); tables: {tables}")  # fmt: skip
    return ""


def markdown(meta: dict, results: dict) -> str:
    lines = [f"# {meta['policy']} ({meta['variant']})", "",
             f"controller overhead {meta['controller_ms']:.2f} ms; full-config latency "
             f"{meta['full_config_ms']:.1f} ms; run {_duration(meta['minutes'])}; peak memory "
             f"{meta['peak_memory_mb']:.0f} MB", ""]  # fmt: skip
    source = _sources(meta)
    if source:
        lines[2:2] = [source, ""]
    sel = meta.get("selection")
    if sel:
        checks = ", ".join(f"{step}: {r:.3f}{'' if ok else '*'}" for step, r, ok in sel["history"])
        lines[2:2] = [f"PPO parameters kept from step {sel['kept_step']} (mean validation reward at each check, "
                      f"step: reward; step 0 is the behaviour-cloned start; * not a candidate: below the start "
                      f"on some budget distribution, or a gain below {sel.get('min_gain_se', 0):.2f} paired "
                      f"standard errors{_alpha(sel)}): {checks}", ""]  # fmt: skip
    c = meta.get("controller", {})
    if "profile_ms" in c:
        token = (f" + budget token's share of the layers 0-2 pass {c['budget_token_prefill_ms']:.3f} ms"
                 if "budget_token_prefill_ms" in c else "")  # fmt: skip
        lines[2:2] = [f"serving path (agents/serving.py, medians of {c['requests']} requests): networks and "
                      f"features {c['networks_ms']:.3f} ms{token}; the VLM ran at {c['machine_speed']:.2f}x its "
                      f"profiled time meanwhile, so {c['profile_ms']:.3f} ms on the profile's clock is charged; "
                      f"the same decisions through `decide`: {c['decide_ms']:.2f} ms", ""]  # fmt: skip
    if meta.get("guard_ms") is not None:
        lines[2:2] = [f"budget guard (envs/guard.py): requests no config fits once the controller has run are served "
                      f"its fallback config for {meta['guard_ms']:.3f} ms instead (guarded_fraction)"
                      + ("; a chosen config predicted not to fit is replaced by the best one that does, where one"
                         " does (two-stage: of the chosen tier; repaired_fraction)" if meta.get("repair") else ""),
                      ""]  # fmt: skip
    for dist, block in results.items():
        lines += [f"## budgets: {dist}", "", "| policy | " + " | ".join(METRICS) + " |",
                  "|---" * (len(METRICS) + 1) + "|"]  # fmt: skip
        for name in _names(block):
            lines.append(f"| {name} | " + " | ".join(f"{block[name].get(m, float('nan')):.3f}" for m in METRICS) + " |")
        if "ppo" in block and "bc_only" in block:
            diff = block["ppo"]["mean_reward"] - block["bc_only"]["mean_reward"]
            lines += ["", f"PPO - BC mean reward: {diff:+.4f}"]
        if block.get("_paired"):  # runs before paired differences were recorded have none
            lines += [
                "",
                "paired mean-reward differences, same episodes (standard error clustered by request): "
                + "; ".join(f"{pair} {d['mean']:+.4f} ({d['se']:.4f})" for pair, d in block["_paired"].items()),
            ]
        lines.append("")
    return "\n".join(lines)


def plot(out: Path, results: dict, full_ms: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 2, figsize=(10, 3 * len(results)), squeeze=False)
    for row, (dist, block) in enumerate(results.items()):
        episodes = block.get("_episodes", {})
        for name, ep in episodes.items():
            budget = np.asarray(ep["budget"]) / full_ms
            edges = np.quantile(budget, np.linspace(0, 1, 9))
            which = np.clip(np.searchsorted(edges, budget, side="right") - 1, 0, 7)
            centres = [budget[which == i].mean() for i in range(8) if (which == i).any()]
            acc = [np.mean(np.asarray(ep["score"])[which == i]) for i in range(8) if (which == i).any()]
            vio = [np.mean(np.asarray(ep["violation"])[which == i]) for i in range(8) if (which == i).any()]
            axes[row][0].plot(centres, acc, "o-", label=name)
            axes[row][1].plot(centres, vio, "o-", label=name)
        for name in _names(block):
            if name not in episodes:  # baselines: their mean as a level line
                axes[row][0].axhline(block[name]["accuracy"], ls="--", lw=1, label=f"{name} (mean)",
                                     color=f"C{2 + _names(block).index(name)}")  # fmt: skip
                axes[row][1].axhline(block[name]["violation_rate"], ls="--", lw=1,
                                     color=f"C{2 + _names(block).index(name)}")  # fmt: skip
        axes[row][0].set_title(f"{dist}: accuracy vs budget")
        axes[row][1].set_title(f"{dist}: violation rate vs budget")
        for ax in axes[row]:
            ax.set_xlabel("budget / full-config latency")
        axes[row][0].legend(fontsize=6)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)


def write_report(out: Path, meta: dict, results: dict) -> None:
    write_json(out / "eval.json", {"meta": meta, "results": results})
    write_text(out / "eval.md", markdown(meta, results))
    plot(out / "eval.png", results, meta["full_config_ms"])
    print(markdown(meta, results))
