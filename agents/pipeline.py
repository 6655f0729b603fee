"""The main job: oracle imitation, then MaskablePPO fine-tuning, then evaluation across budgets.

Read top to bottom: assets (model, profile, outcome tables) -> replay environments -> policy ->
controller overhead -> behaviour cloning -> PPO (the best parameters on the validation split kept)
-> evaluation of BC, PPO and baselines -> report.
"""

from __future__ import annotations

import dataclasses
import json
import resource
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sb3_contrib import MaskablePPO
from sb3_contrib.common.maskable.evaluation import evaluate_policy
from stable_baselines3.common.callbacks import BaseCallback, CheckpointCallback
from stable_baselines3.common.vec_env import DummyVecEnv
from torch.utils.tensorboard import SummaryWriter

from agents.evaluation import baselines, clustered_se, paired_differences, policy_chooser, run_episodes, summarize
from agents.imitation import ORACLES, behaviour_clone, collect
from agents.report import write_report
from envs.budgets import Penalty, parse_distribution
from envs.guard import BudgetGuard
from envs.knob_env import make_env, replay_backend
from envs.latency import LatencyModel
from envs.vlm.checkpoint import EMBEDDED, load_model
from envs.vlm.presets import PRESETS
from policies.networks import set_guard
from policies.sb3 import POLICIES, decide

VARIANTS = {"two_stage": ("budget", "prompt", "router"), "single_stage": ("mlp", "transformer")}


@dataclass
class Args:
    policy: str = "two_stage"
    variant: str | None = None  # two_stage: budget | prompt | router; single_stage: mlp | transformer
    encoder: str = "vlm"  # single_stage's global view: the VLM's own encoder, or a distilled light one
    model: str = "tiny"
    out: Path = Path("runs/ppo")
    quick: bool = False
    train_budgets: str = "log_uniform"
    eval_budgets: str = "uniform,log_uniform,tight,loose,bimodal"
    penalty: str = "indicator"
    penalty_weight: float = 1.0
    oracle: str = "expected"  # behaviour cloning's labels: expected scores over similar requests, or "sample"
    oracle_shrink: float = 0.5  # expected scores moved this far from each config's overall mean (1: pure k-NN)
    bc_episodes: int = 3000
    bc_epochs: int = 15
    ppo_steps: int = 65536
    select_every: int = 8192  # PPO steps between validation checks (0: keep the last parameters)
    select_episodes: int = 2000  # validation episodes per budget distribution and check
    select_alpha: float = 0.05  # chance that some check without a real gain replaces the BC start
    n_envs: int = 8
    eval_episodes: int = 2000  # per budget distribution; the test split holds 2000 requests
    learning_rate: float = 1e-4
    guard: bool = True  # the budget guard (envs/guard.py) serves requests no config fits after the controller
    repair: bool = True  # and (with the guard) serves a config that fits where the policy's does not
    seed: int = 0

    def __post_init__(self):
        if self.policy not in VARIANTS:
            raise ValueError(f"unknown policy {self.policy!r}; choose one of {list(VARIANTS)}")
        self.variant = self.variant or VARIANTS[self.policy][0]
        if self.variant not in VARIANTS[self.policy]:
            raise ValueError(f"unknown {self.policy} variant {self.variant!r}; choose one of {VARIANTS[self.policy]}")
        if self.oracle not in ORACLES:
            raise ValueError(f"unknown oracle {self.oracle!r}; choose one of {ORACLES}")
        if not 0.0 < self.select_alpha < 1.0:
            raise ValueError(f"select_alpha must lie in (0, 1), got {self.select_alpha}")
        if not 0.0 <= self.oracle_shrink <= 1.0:
            raise ValueError(f"oracle shrink must lie in [0, 1], got {self.oracle_shrink}")
        if self.encoder not in ("vlm", "light"):
            raise ValueError(f"unknown global-view encoder {self.encoder!r}; choose vlm or light")
        if self.quick:
            self.bc_episodes, self.bc_epochs, self.ppo_steps, self.eval_episodes = 600, 6, 1024, 150
            self.select_every, self.select_episodes = 512, 100


def assets_dir(model: str) -> Path:
    return EMBEDDED / model if model in PRESETS else Path(model)


class Assets:
    """The VLM, its latency profile and outcome tables; replay backends over them."""

    def __init__(self, model: str, quick: bool = False):
        """`quick`: the first 200 validation and 400 test requests (features for all 3,600 take minutes cold)."""
        root = assets_dir(model)
        for need in ("latency_cpu.json", "outcomes/train.npz", "outcomes/test.npz"):
            if not (root / need).is_file():
                raise FileNotFoundError(f"{root / need} is missing; see README (profile_latency, build_outcomes)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.vlm = load_model(model)
        profile = json.loads((root / "latency_cpu.json").read_text())
        self.latency_model = LatencyModel.from_dict(profile["model"])
        self.full_ms = float(profile["reference_full_ms"])
        self.global_ms = sum(a + b for p, (a, b) in self.latency_model.per_crop.items())
        self.train = replay_backend(self.vlm, root / "outcomes/train.npz", self.latency_model)
        val_n, test_n = (200, 400) if quick else (None, None)
        self.test = replay_backend(self.vlm, root / "outcomes/test.npz", self.latency_model, first=test_n)
        val = root / "outcomes/val.npz"  # checkpoint selection; optional for user-built assets
        self.val = replay_backend(self.vlm, val, self.latency_model, first=val_n) if val.is_file() else None
        self.reuse_low = True
        self.light_encoder_error = None

    def use_light_encoder(self, seed: int = 0) -> None:
        """Distil a light global-view encoder on the train split; swap its features into both splits."""
        from envs.outcomes import dataset_samples
        from policies.light_encoder import distill, encode, global_pixels, overhead_ms

        train_px = global_pixels(self.vlm, dataset_samples(self.train.table.meta["dataset"]))
        enc, self.light_encoder_error = distill(self.vlm, train_px, self.train.features.global_view, seed=seed)
        self.train.features.global_view = encode(enc, train_px)
        self.test.features.global_view = encode(enc, global_pixels(self.vlm, dataset_samples(
            self.test.table.meta["dataset"])))  # fmt: skip
        self.global_ms, self.reuse_low = overhead_ms(enc, train_px), False

    def _timing_requests(self, budgets, seed: int, n: int = 24) -> tuple[list, list[float]]:
        """The first `n` train requests and a budget for each: what controller costs are timed on."""
        from envs.outcomes import dataset_samples

        samples = dataset_samples(self.train.table.meta["dataset"], 0, n)
        return samples, budgets.sample(np.random.default_rng(seed), len(samples), self.full_ms).tolist()

    def serving_overhead(self, model: MaskablePPO, kind: str, budgets, seed: int) -> dict:
        """The controller's cost on the serving path (agents/serving.py), on train requests."""
        from agents.serving import SingleStageServer, TwoStageServer, single_stage_overhead_ms, two_stage_overhead_ms

        samples, budgets_ms = self._timing_requests(budgets, seed)
        net = model.policy.mlp_extractor.net
        if kind == "two_stage":
            return two_stage_overhead_ms(TwoStageServer(net, self.vlm, self.full_ms, self.latency_model), samples,
                                         budgets_ms)  # fmt: skip
        server = SingleStageServer(net, self.vlm, self.full_ms, self.latency_model)
        return single_stage_overhead_ms(server, samples, budgets_ms)

    def guard_overhead(self, model: MaskablePPO, budgets, seed: int) -> float:
        """The budget guard's own time (median ms of wall time) on train requests."""
        from agents.serving import SingleStageServer, guard_overhead_ms

        samples, budgets_ms = self._timing_requests(budgets, seed)
        server = SingleStageServer(model.policy.mlp_extractor.net, self.vlm, self.full_ms, self.latency_model)
        return guard_overhead_ms(server, samples, budgets_ms)

    def env(self, kind, backend, budgets, penalty, controller_ms=0.0, guard=None, skip_guarded=False):
        return make_env(kind, backend, budgets, self.full_ms, self.vlm.cfg, penalty, controller_ms,
                        self.global_ms, self.reuse_low, guard, skip_guarded)  # fmt: skip


def controller_overhead_ms(model: MaskablePPO, env, repeats: int = 30) -> float:
    """Median wall time of the policy's decisions for one request (all its steps), batch 1, on the
    serving path (`decide`: observation to tensors, network, masked argmax)."""
    times = []
    for i in range(repeats + 3):
        obs, _ = env.reset(seed=i)
        done, spent = False, 0.0
        while not done:
            masks = env.action_masks()
            t0 = time.perf_counter()
            action = decide(model.policy, obs, masks)
            spent += time.perf_counter() - t0
            obs, _, done, _, _ = env.step(action)
        if i >= 3:
            times.append(spent * 1e3)
    return float(statistics.median(times))


def controller_cost(assets: Assets, model: MaskablePPO, kind: str, env, budgets, seed: int) -> dict:
    """What the environments charge a controller per request (`charged_ms`): its cost on the serving
    path (agents/serving.py: features, headroom and networks timed between the VLM's stages; for
    two-stage plus the budget token's share of the layers 0-2 pass) on the latency profile's clock
    (scaled by the VLM's own speed measured beside it), with the parts of that measurement. A
    single-stage policy on the light encoder has no server (its run does not save the encoder): the
    wall time of its decisions (`decide_ms`, observation to action) is charged, and the budget
    guard's time is its wall time too (`guard_charged_ms`)."""
    cost = {"decide_ms": controller_overhead_ms(model, env)}
    if kind == "two_stage" or assets.reuse_low:
        cost.update(assets.serving_overhead(model, kind, budgets, seed))
    else:
        cost["guard_ms"] = assets.guard_overhead(model, budgets, seed)
    cost["charged_ms"] = cost.get("profile_ms", cost["decide_ms"])
    cost["guard_charged_ms"] = cost.get("guard_profile_ms", cost["guard_ms"])
    return cost


def gain_threshold(alpha: float, checks: int) -> float:
    """Paired standard errors a check's validation gain must reach so that, when no check truly gains,
    the chance that any of `checks` replaces the start stays below `alpha` (one-sided, Bonferroni: the
    checks are correlated, so this errs towards keeping the start)."""
    return statistics.NormalDist().inv_cdf(1.0 - alpha / max(1, checks))


class KeepBestOnValidation(BaseCallback):
    """Scores the policy on held-out requests every `every` steps and restores the best parameters at
    the end: PPO's last update is not always its best. `score(model)` gives the rewards per budget
    distribution on fixed episodes, [distributions, episodes] (or their means, [distributions]),
    optionally with each episode's request, `(rewards, requests)`. A check is a candidate only if it
    is not below the behaviour-cloned start (the first check, always a candidate) on any distribution
    and, given episodes, its mean gain over the start, paired episode by episode, is at least
    `min_gain_se` standard errors (clustered by request where given: episodes of one request are not
    independent). A gain within validation noise does not replace the start. The candidate with the
    best mean is kept: fine-tuning cannot end below its start on validation, nor away from it by chance."""

    def __init__(self, score, every: int, min_gain_se: float = 2.0):
        super().__init__()
        self.score, self.every, self.min_gain_se, self.last = score, every, min_gain_se, 0
        self.history: list[tuple[int, float, bool]] = []  # (step, mean reward, candidate)
        self.start: np.ndarray | None = None
        self.best, self.best_step, self.best_state = -np.inf, 0, None

    def _check(self) -> None:
        out = self.score(self.model)
        rewards, requests = out if isinstance(out, tuple) else (out, None)
        rewards = np.asarray(rewards, dtype=np.float64)
        rewards = rewards.reshape(-1, 1) if rewards.ndim < 2 else rewards  # [distributions, episodes]
        self.start = rewards if self.start is None else self.start
        gain = (rewards - self.start).ravel()
        clusters = np.arange(gain.size) if requests is None else np.asarray(requests).ravel()
        se = clustered_se(gain, clusters) if rewards.shape[1] > 1 else 0.0
        means = rewards.mean(axis=1)
        reward = float(means.mean())
        candidate = bool((means >= self.start.mean(axis=1)).all() and gain.mean() >= self.min_gain_se * se)
        self.history.append((self.num_timesteps, reward, candidate))
        self.logger.record("val/mean_reward", reward)
        if candidate and reward > self.best:
            self.best, self.best_step = reward, self.num_timesteps
            self.best_state = {k: v.detach().clone() for k, v in self.model.policy.state_dict().items()}

    def _on_training_start(self) -> None:
        self._check()

    def _on_rollout_end(self) -> None:
        if self.num_timesteps - self.last >= self.every:
            self.last = self.num_timesteps
            self._check()

    def _on_step(self) -> bool:
        return True

    def _on_training_end(self) -> None:
        if self.history[-1][0] != self.num_timesteps:
            self._check()
        self.model.policy.load_state_dict(self.best_state)


class EpisodeLogger(BaseCallback):
    """TensorBoard: accuracy, violation rate, latency, reward and knob histograms of finished episodes."""

    def __init__(self):
        super().__init__()
        self.buf: dict[str, list] = {k: [] for k in ("score", "violation", "latency", "reward", "tier", "k", "b")}

    def _on_step(self) -> bool:
        for info, done, reward in zip(self.locals["infos"], self.locals["dones"], self.locals["rewards"], strict=True):
            if done and "config" in info:
                c = info["config"]
                for key, val in (("score", info["score"]), ("violation", info["violation"]), ("reward", reward),
                                 ("latency", info["latency_ms"]), ("tier", ["low", "medium", "high"].index(c.tier)),
                                 ("k", c.top_k), ("b", c.blocks)):  # fmt: skip
                    self.buf[key].append(float(val))
        return True

    def _on_rollout_end(self) -> None:
        if not self.buf["score"]:
            return
        for key, name in (("score", "accuracy"), ("violation", "violation_rate"), ("latency", "latency_ms"),
                          ("reward", "reward")):  # fmt: skip
            self.logger.record(f"episode/{name}", float(np.mean(self.buf[key])))
        for key in ("tier", "k", "b"):
            self.logger.record(f"knobs/{key}", torch.tensor(self.buf[key]))
        self.buf = {k: [] for k in self.buf}


def evaluate_all(assets: Assets, kind: str, budgets: str, policies: dict, penalty: Penalty, controller_ms: float,
                 episodes: int, seed: int, test=None, guard=None) -> dict:  # fmt: skip
    """Every policy and baseline on the same test episodes, per budget distribution (the policies
    behind `guard` if given; the baselines have no controller and so no guard)."""
    test = test or assets.test
    results = {}
    for spec in budgets.split(","):
        dist = parse_distribution(spec)
        env = assets.env(kind, test, dist, penalty, controller_ms, guard)
        rows = {name: run_episodes(env, policy_chooser(m), episodes, seed) for name, m in policies.items()}
        plain = assets.env("two_stage", test, dist, penalty, 0.0)
        train = assets.env("two_stage", assets.train, dist, penalty, 0.0)
        results[dist.name] = {name: summarize(r) for name, r in rows.items()}
        summaries, runs = baselines(plain, train, dist, episodes, seed)
        results[dist.name].update(summaries)
        results[dist.name]["_episodes"] = {name: {k: r[k].tolist() for k in ("budget", "score", "violation")}
                                           for name, r in rows.items()}  # fmt: skip
        pairs = [(name, ref) for name in rows for ref in ("bc_only", "best_static") if name != ref]
        results[dist.name]["_paired"] = paired_differences(rows | runs, pairs)
    return results


def validation_rewards(assets: Assets, args: Args, model: MaskablePPO, controller_ms: float, guard=None,
                       n_envs: int = 50):  # fmt: skip
    """Rewards on the validation split per evaluation budget distribution, the same episodes in the
    same order every call, [distributions, episodes], and each episode's request (its sample index).
    Episodes run `n_envs` at a time, so the policy decides in batches."""
    penalty = Penalty(args.penalty, args.penalty_weight)
    rewards, requests = [], []
    for spec in args.eval_budgets.split(","):
        dist = parse_distribution(spec)
        vec = DummyVecEnv([lambda d=dist: assets.env(args.policy, assets.val, d, penalty, controller_ms, guard)]
                          * n_envs)  # fmt: skip
        vec.seed(20_000)
        samples = []  # the callback sees each finished episode just before its reward is recorded

        def note(local, _, samples=samples):
            if local["done"]:
                samples.append(local["info"]["sample"])

        episodes, _ = evaluate_policy(model, vec, args.select_episodes, return_episode_rewards=True, warn=False,
                                      callback=note)  # fmt: skip
        rewards.append(episodes)
        requests.append(samples)
    return np.array(rewards), np.array(requests)


def run(args: Args) -> Path:
    t0 = time.time()
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "args.json").write_text(json.dumps(dataclasses.asdict(args), default=str, indent=1))
    assets = Assets(args.model, quick=args.quick)
    if args.policy == "single_stage" and args.encoder == "light":
        assets.use_light_encoder(args.seed)
    penalty = Penalty(args.penalty, args.penalty_weight)
    train_dist = parse_distribution(args.train_budgets)

    envs = [assets.env(args.policy, assets.train, train_dist, penalty) for _ in range(args.n_envs)]
    vec = DummyVecEnv([lambda e=e: e for e in envs])
    vec.seed(args.seed)
    kwargs = {"vlm": args.model}
    if args.policy == "two_stage":
        kwargs["stage1"] = args.variant
        if args.variant == "router":
            from policies.networks import SemanticRouter

            kwargs["routes"] = SemanticRouter.fit_routes(assets.train.features.prompt, 8, seed=args.seed)
    else:
        kwargs["fusion"] = args.variant
    model = MaskablePPO(POLICIES[args.policy], vec, learning_rate=args.learning_rate, n_steps=256, batch_size=256,
                        n_epochs=4, gamma=1.0, ent_coef=0.003, seed=args.seed, policy_kwargs=kwargs,
                        tensorboard_log=str(args.out / "tb"), verbose=0)  # fmt: skip

    controller = controller_cost(assets, model, args.policy, envs[0], train_dist, args.seed)
    controller_ms = controller["charged_ms"]
    guard_ms = controller["guard_charged_ms"]
    guard = BudgetGuard.from_table(assets.train.table, guard_ms, penalty, args.repair) if args.guard else None
    for e in envs:  # training sees only the requests the policy decides
        e.controller_ms, e.guard, e.skip_guarded = controller_ms, guard, True
    # the policy carries the time its environment adds and its guard, so a server acts as training did
    model.policy.mlp_extractor.net.added_ms.copy_(torch.as_tensor(envs[0].added_latency()))
    set_guard(model.policy.mlp_extractor.net, guard)
    print(f"controller overhead {controller_ms:.2f} ms per request"
          + (f"; budget guard {guard.ms:.3f} ms" if guard else ""))  # fmt: skip

    demos = collect(envs[0], args.bc_episodes, gamma=1.0, seed=args.seed, oracle=args.oracle,
                    shrink=args.oracle_shrink)  # fmt: skip
    writer = SummaryWriter(str(args.out / "tb" / "bc"))
    history = behaviour_clone(model.policy, demos, args.bc_epochs, seed=args.seed, log=writer.add_scalar)
    writer.close()
    model.save(args.out / "policy_bc.zip")
    print(f"behaviour cloning: loss {history[0]:.3f} -> {history[-1]:.3f} over {len(history)} epochs")

    every = max(1, (args.select_every or args.ppo_steps) // args.n_envs)  # a callback step advances every env
    callbacks, keep = [EpisodeLogger(), CheckpointCallback(every, str(args.out / "checkpoints"), "ppo")], None
    if assets.val is not None and args.select_every > 0:
        threshold = gain_threshold(args.select_alpha, args.ppo_steps // args.select_every)
        keep = KeepBestOnValidation(lambda m: validation_rewards(assets, args, m, controller_ms, guard),
                                    args.select_every, threshold)  # fmt: skip
        callbacks.append(keep)
    model.learn(args.ppo_steps, callback=callbacks, progress_bar=True, tb_log_name="ppo")
    if keep is not None:
        print(f"kept the parameters of PPO step {keep.best_step} (validation reward {keep.best:.3f})")
    model.save(args.out / "policy.zip")

    bc = MaskablePPO.load(args.out / "policy_bc.zip")
    results = evaluate_all(assets, args.policy, args.eval_budgets, {"ppo": model, "bc_only": bc}, penalty,
                           controller_ms, args.eval_episodes, args.seed + 10_000, guard=guard)  # fmt: skip
    meta = {"policy": args.policy, "variant": args.variant, "controller_ms": controller_ms, "controller": controller,
            "guard_ms": guard.ms if guard else None, "repair": bool(guard and guard.repair),
            "global_view": {"encoder": args.encoder, "ms": assets.global_ms, "reused_at_low_tier": assets.reuse_low,
                            "distillation_relative_error": assets.light_encoder_error},
            "full_config_ms": assets.full_ms, "minutes": (time.time() - t0) / 60,
            "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "bc_loss": history, "test_samples": len(assets.test),
            "selection": None if keep is None else {"history": keep.history, "kept_step": keep.best_step,
                                                     "min_gain_se": keep.min_gain_se, "alpha": args.select_alpha,
                                                     "validation_requests": len(assets.val)}}  # fmt: skip
    write_report(args.out, meta, results)
    return args.out
