"""Serving a request with a trained controller: the path whose cost the environments charge.

Two-stage: stage 1 picks the tier from the budget (and the prompt). The VLM encodes that tier's crops. The
budget token then rides in the pass of layers 0-2 that every request runs anyway (`KnobVLM.prefix`
with a side token, attending to the same prompt positions the replay observation holds), so stage 2
adds one token to that pass plus its heads; layers 3.. finish with the chosen top_k and blocks.
Replay training computes the same budget-token state from cached keys and values
(`Stage2Scheduler.budget_state`), so served and replayed decisions agree.
Single-stage: the global crop is encoded first with the VLM's own encoder, the network picks all
three knobs, and the low tier reuses the encoded crop.
Both first run the policy's budget guard (`envs/guard.py`), if it has one: when no config fits once
the controller has run, the guard's fallback config is served at once; and the guard repairs the
network's config when it does not fit (two-stage: within the chosen tier), as the environments do.
"""

from __future__ import annotations

import functools
import json
import statistics
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sb3_contrib import MaskablePPO

from agents import provenance
from envs.asset_manifest import AssetsError, latency_hash, threads_of
from envs.assets import profile_path, read_profile
from envs.budgets import budget_features, check_budget
from envs.features import prompt_embedding, stage2_sees, summarise
from envs.guard import BudgetGuard
from envs.knobs import KnobSpace
from envs.latency import ConfigLatency, LatencyModel, StageTimer, timed_prefix
from envs.vlm.checkpoint import load_model
from envs.vlm.evaluate import Config
from envs.vlm.presets import TIERS
from policies.networks import guard_of
from policies.numpy_heads import SingleStageHeads, TwoStageHeads
from policies.sb3 import SingleStagePolicy, TwoStagePolicy


@dataclass
class Served:
    answer: str
    config: Config
    parts_ms: dict[str, float]  # controller (stage 1, budget token embedding, heads) and the VLM's parts
    total_ms: float  # end to end
    predicted_ms: float | None = None  # the profile's latency for the served config, with the controller's time
    chosen_by: str = "policy"  # "policy", "guard" (no config fit: its fallback served) or "repair" (guard's fix)


class _Server:
    """A controller network beside the VLM, with the latency profile that predicts the headroom."""

    def __init__(self, net, vlm, full_ms: float, latency_model: LatencyModel):
        self.net, self.vlm, self.full_ms, self.latency_model = net.eval(), vlm, float(full_ms), latency_model
        self.knobs, self.guard, self.space = vlm.cfg.knob_lists(), guard_of(net), net.space
        if self.space != KnobSpace.from_config(vlm.cfg):
            raise ValueError(f"the policy acts over knobs {self.space.to_lists()}, the VLM has {self.knobs}")
        predict, added = ConfigLatency(latency_model, self.knobs), net.added_ms.double().numpy()

        def both(crops, tokens):
            alone = predict(crops, tokens)
            return alone, alone + added

        # requests repeat image sizes and question lengths: predict each pair of shapes once
        self._predict = functools.lru_cache(maxsize=4096)(both)

    def predict(self, image, question: str) -> tuple[np.ndarray, np.ndarray]:
        """Each config's predicted latency (ms) for this request: alone, and with the controller's time."""
        crops, tokens = self.vlm.request_shapes(image, question)
        return self._predict(tuple(crops), tuple(tokens))

    def budget_obs(self, image, question: str, budget_ms: float) -> dict[str, np.ndarray]:
        """The budget features and the headroom over every config, as the environments compute them."""
        return self._budget_obs(budget_ms, self.predict(image, question)[1])

    def _budget_obs(self, budget_ms: float, with_controller: np.ndarray) -> dict[str, np.ndarray]:
        return {"budget": budget_features(budget_ms, self.full_ms),
                "headroom": np.log(budget_ms / with_controller).astype(np.float32)}  # fmt: skip

    def guarded(self, budget_ms: float, alone: np.ndarray, with_controller: np.ndarray) -> Config | None:
        """The budget guard's config if it serves this request (no config fits once the controller
        has run), else None: the controller decides."""
        if self.guard is None or with_controller.min() <= budget_ms:  # = BudgetGuard.fires on the headroom
            return None
        tier, ki, bi = self.space.config_knobs(self.guard.pick(alone, budget_ms))
        return Config(TIERS[tier], self.knobs["top_k"][ki], self.knobs["blocks"][bi])

    def serve_config(self, image, question: str, config: Config, timer: StageTimer, t0: float) -> Served:
        """The VLM alone with fixed knobs (what the guard serves), timed into `timer` from `t0`."""
        vlm = self.vlm
        with torch.no_grad():
            _, _, state = timed_prefix(vlm, image, question, config.tier, timer)
            gen = vlm.generate(state, vlm.layers_for(config.blocks), config.top_k, timer=timer)
        return Served(gen.answers[0], config, dict(timer.ms), (time.perf_counter() - t0) * 1e3, chosen_by="guard")

    def predicted(self, image, question: str, config: Config) -> float:
        """The profile's latency (ms) of `config` for this request, with the controller's time."""
        tier, ki, bi = TIERS.index(config.tier), self.knobs["top_k"].index(config.top_k), \
            self.knobs["blocks"].index(config.blocks)  # fmt: skip
        return float(self.predict(image, question)[1][self.space.config_index(tier, ki, bi)])


class TwoStageServer(_Server):
    """Answers (image, question, budget) with a `TwoStageNet` (e.g. `model.policy.mlp_extractor.net`),
    its small layers run as numpy copies (`policies.numpy_heads`)."""

    def __init__(self, net, vlm, full_ms: float, latency_model: LatencyModel):
        super().__init__(net, vlm, full_ms, latency_model)
        self.heads = TwoStageHeads(net)

    def observe(self, image, question: str, budget_ms: float, with_controller=None) -> dict[str, np.ndarray]:
        """What stage 1 reads, before any vision work (`with_controller`: `predict`'s, if already known)."""
        if with_controller is None:
            with_controller = self.predict(image, question)[1]
        obs = self._budget_obs(budget_ms, with_controller)
        if self.heads.reads_prompt:  # the prompt and router variants read the prompt embedding
            obs["prompt"] = prompt_embedding(self.vlm, question)
        return obs

    def choose_tier(self, obs: dict) -> tuple[int, torch.Tensor, np.ndarray]:
        """Stage 1: the tier, and the budget token's input embedding and the room for that tier."""
        tier = self.heads.tier(obs["budget"], obs["headroom"], obs.get("prompt"))
        return tier, *self.stage2_inputs(obs, tier)

    def stage2_inputs(self, obs: dict, tier: int) -> tuple[torch.Tensor, np.ndarray]:
        token, room = self.heads.budget_token(obs["budget"], obs["headroom"], tier)
        return torch.from_numpy(token)[None], room

    def choose_knobs(self, side_state: torch.Tensor, room: np.ndarray, tier: int) -> tuple[int, int]:
        """Stage 2: top_k and blocks, repaired by the guard within the tier if they do not fit."""
        ki, bi = self.heads.knobs(side_state[0].float().cpu().numpy(), room)
        self.last_repaired = False
        if self.guard is None:
            return ki, bi
        allowed = self.space.tier_configs(tier)  # room: the tier's headroom, then its fits
        headroom = room[: allowed.stop - allowed.start]
        chosen = self.space.config_index(tier, ki, bi)
        repaired = self.guard.repaired(chosen, headroom, allowed.start)
        self.last_repaired = repaired != chosen
        _, ki, bi = self.space.config_knobs(repaired)
        return ki, bi

    def serve(self, image, question: str, budget_ms: float) -> Served:
        budget_ms = check_budget(budget_ms)
        timer, vlm = StageTimer(self.vlm.device), self.vlm
        t0 = time.perf_counter()
        with timer.stage("controller"):
            alone, with_controller = self.predict(image, question)
            fallback = self.guarded(budget_ms, alone, with_controller)
            if fallback is None:
                tier, token, room = self.choose_tier(self.observe(image, question, budget_ms, with_controller))
        if fallback is not None:
            return self.serve_config(image, question, fallback, timer, t0)
        pre, prepared, _ = timed_prefix(vlm, image, question, TIERS[tier], timer, run_prefix=False)
        with torch.no_grad():
            with timer.stage("prefill"):
                sees = stage2_sees(vlm, pre, prepared.valid.shape[1])
                state = vlm.prefix(prepared, side_token=token.to(vlm.device), side_sees=sees.to(vlm.device))
            with timer.stage("controller"):
                ki, bi = self.choose_knobs(state.side_state, room, tier)
            config = Config(TIERS[tier], self.knobs["top_k"][ki], self.knobs["blocks"][bi])
            gen = vlm.generate(state, vlm.layers_for(config.blocks), config.top_k, timer=timer)
        total = (time.perf_counter() - t0) * 1e3
        return Served(gen.answers[0], config, dict(timer.ms), total,
                      chosen_by="repair" if self.last_repaired else "policy")  # fmt: skip


class SingleStageServer(_Server):
    """Answers (image, question, budget) with a `SingleStageNet` over the VLM's own global-crop features;
    the MLP fusion runs as a numpy copy (`policies.numpy_heads`), the Transformer fusion in torch."""

    def __init__(self, net, vlm, full_ms: float, latency_model: LatencyModel):
        super().__init__(net, vlm, full_ms, latency_model)
        self.heads = SingleStageHeads(net) if net.fusion == "mlp" else None

    def choose(
        self, image, question: str, budget_ms: float, pre, prepared, with_controller=None
    ) -> tuple[int, int, int]:
        """The three knobs, from the budget, the prompt and the encoded global crop (`pre`, `prepared`);
        `with_controller`: `predict`'s, if already known."""
        if with_controller is None:
            with_controller = self.predict(image, question)[1]
        prompt, global_view = summarise(self.vlm, prepared, pre)  # the prompt's embeddings are in `prepared`
        obs = {**self._budget_obs(budget_ms, with_controller), "prompt": prompt[0], "global_view": global_view[0]}
        if self.heads is not None:
            logits = self.heads.logits(obs["budget"], obs["headroom"], obs["prompt"], obs["global_view"])
        else:
            with torch.inference_mode():
                logits = self.net({k: torch.as_tensor(v)[None] for k, v in obs.items()})[0][0].numpy()
        tier, ki, bi = (int(part.argmax()) for part in self.space.split(logits))
        self.last_repaired = False
        if self.guard is not None:  # repaired if it does not fit
            chosen = self.space.config_index(tier, ki, bi)
            repaired = self.guard.repaired(chosen, obs["headroom"])
            self.last_repaired = repaired != chosen
            tier, ki, bi = self.space.config_knobs(repaired)
        return tier, ki, bi

    def serve(self, image, question: str, budget_ms: float) -> Served:
        budget_ms = check_budget(budget_ms)
        timer, vlm = StageTimer(self.vlm.device), self.vlm
        t0 = time.perf_counter()
        with timer.stage("controller"):
            alone, with_controller = self.predict(image, question)
            fallback = self.guarded(budget_ms, alone, with_controller)
        if fallback is not None:
            return self.serve_config(image, question, fallback, timer, t0)
        glance = StageTimer(self.vlm.device)  # the global crop: the VLM's low tier, reused there
        pre, prepared, _ = timed_prefix(vlm, image, question, TIERS[0], glance, run_prefix=False)
        with torch.no_grad():
            with timer.stage("controller"):
                tier, ki, bi = self.choose(image, question, budget_ms, pre, prepared, with_controller)
            if tier == 0:
                for part in ("preprocess", "vision", "connector"):
                    timer.ms[part] += glance.ms[part]
            else:
                timer.ms["controller"] += sum(glance.ms.values())
                pre, prepared, _ = timed_prefix(vlm, image, question, TIERS[tier], timer, run_prefix=False)
            config = Config(TIERS[tier], self.knobs["top_k"][ki], self.knobs["blocks"][bi])
            with timer.stage("prefill"):
                state = vlm.prefix(prepared)
            gen = vlm.generate(state, vlm.layers_for(config.blocks), config.top_k, timer=timer)
        return Served(gen.answers[0], config, dict(timer.ms), (time.perf_counter() - t0) * 1e3,
                      chosen_by="repair" if self.last_repaired else "policy")  # fmt: skip


def _guard_ms(server: _Server, sample, budget_ms: float) -> float:
    """The budget guard's time for one request when it serves it (ms): the request's predicted
    latencies, the check, and the fallback's pick (scored by a stand-in: the same work)."""
    probe = server.guard or BudgetGuard(np.zeros(len(server.net.added_ms)), 0.0)
    t0 = time.perf_counter()
    alone, with_controller = server.predict(sample.image, sample.question)
    _ = with_controller.min() <= budget_ms  # the check in `guarded`
    probe.pick(alone, budget_ms)
    return (time.perf_counter() - t0) * 1e3


def guard_overhead_ms(server: _Server, samples: list, budgets_ms: list[float], repeats: int = 3) -> float:
    """The budget guard's own time alone (median ms over the requests, wall time)."""
    return statistics.median(
        _guard_ms(server, s, b) for _ in range(repeats) for s, b in zip(samples, budgets_ms, strict=True)
    )


def single_stage_overhead_ms(
    server: SingleStageServer, samples: list, budgets_ms: list[float], repeats: int = 3
) -> dict:
    """The single-stage controller's own time on the serving path (median, ms): the headroom, prompt and
    global-view features and the network, timed right after the global crop's vision work as in `serve`
    (the global crop itself is charged by the environment separately, unless the low tier reuses it);
    and that cost on the profile's clock, against the global crop's work (`_in_profile_units`)."""
    own, glance_ms, guard = [], [], []
    lm = server.latency_model
    with torch.no_grad():
        for _ in range(repeats):
            for sample, budget in zip(samples, budgets_ms, strict=True):
                guard.append(_guard_ms(server, sample, budget))
                t0 = time.perf_counter()  # as in `serve`: the guard's check, the global crop, the network
                alone, with_controller = server.predict(sample.image, sample.question)
                server.guarded(budget, alone, with_controller)
                check = time.perf_counter() - t0
                glance = StageTimer(server.vlm.device)
                pre, prepared, _ = timed_prefix(server.vlm, sample.image, sample.question, TIERS[0], glance,
                                                run_prefix=False)  # fmt: skip
                t0 = time.perf_counter()
                server.choose(sample.image, sample.question, budget, pre, prepared, with_controller)
                own.append((time.perf_counter() - t0 + check) * 1e3)
                glance_ms.append(sum(glance.ms.values()))
    predicted = max(1e-6, sum(max(0.0, a + b * 1) for a, b in lm.per_crop.values()))  # one crop
    cost = {"networks_ms": statistics.median(own), "total_ms": statistics.median(own), "requests": len(own),
            "guard_ms": statistics.median(guard)}  # fmt: skip
    return _in_profile_units(cost, glance_ms, [predicted] * len(glance_ms))


def load_policy(path: Path):
    """A saved knob-rl policy (MaskablePPO) and its kind, "two_stage" or "single_stage". A policy that records
    its assets (agents/provenance.py) is rebuilt over its model found again relative to the zip."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"policy file not found: {path}")
    try:
        rec = provenance.read(path)
        custom = None
        if rec is not None:
            from stable_baselines3.common.save_util import json_to_data

            with zipfile.ZipFile(path) as z:
                kwargs = json_to_data(z.read("data").decode())["policy_kwargs"]
            custom = {"policy_kwargs": {**kwargs, "vlm": provenance.model_of(path, rec)}}
        model = MaskablePPO.load(path, device="cpu", custom_objects=custom)
    except (FileNotFoundError, AssetsError):
        raise
    except Exception as e:  # a zip that is not an SB3 save, or one of a class we do not know
        raise ValueError(f"{path} is not a saved knob-rl policy: {e}") from None
    model.provenance = rec
    if isinstance(model.policy, TwoStagePolicy):
        return model, "two_stage"
    if isinstance(model.policy, SingleStagePolicy):
        return model, "single_stage"
    raise ValueError(f"{path} holds a {type(model.policy).__name__}, not a knob-rl policy")


def load_server(path: Path, profile: str | Path | None = None):
    """The server for a saved policy, over the VLM it was trained for and the latency profile it was trained
    with (recorded in the zip; else its model's default profile), or `profile` (a file, or a name in the
    policy's assets directory) if given. The server's `profile` attribute says which, and `threads` the CPU
    threads that profile was measured with (None if unrecorded)."""
    model, kind = load_policy(path)
    run_args = Path(path).parent / "args.json"
    if kind == "single_stage" and run_args.is_file() and json.loads(run_args.read_text()).get("encoder") == "light":
        raise ValueError(f"{path} decides on a distilled light encoder's features, which its run does not save; "
                         "serve a policy trained with --encoder vlm")  # fmt: skip
    rec = model.provenance
    if profile is not None and Path(profile).is_file():
        profile_file = Path(profile)
    elif profile is not None:
        profile_file = profile_path(provenance.resolve(path, rec["assets"]) if rec else model.policy.vlm, profile)
    elif rec is not None:
        profile_file = Path(provenance.in_assets(path, rec, rec["profile"]["file"]))
    else:
        profile_file = profile_path(model.policy.vlm)
    if not profile_file.is_file():
        raise FileNotFoundError(f"{profile_file} is missing: budgets are read against it and configs' latency "
                                "predicted")  # fmt: skip
    latency_model, full_ms = read_profile(profile_file)
    if rec is not None and rec.get("budget_reference", "profile") == "data":
        full_ms = rec["profile"]["reference_full_ms"]  # budgets read against the training data's full config
    vlm = load_model(model.policy.vlm)
    cls = TwoStageServer if kind == "two_stage" else SingleStageServer
    server = cls(model.policy.mlp_extractor.net, vlm, full_ms, latency_model)
    profile_data = json.loads(profile_file.read_text())
    meta = profile_data.get("meta", {})
    server.profile = {
        "file": str(profile_file),
        "device": meta.get("device"),
        "date": meta.get("date"),
        "as_trained": rec is None or latency_hash(profile_data["model"]) == rec["profile"]["latency"],
    }
    server.threads = threads_of(meta)
    return server


def _in_profile_units(cost: dict, vlm_ms: list[float], profile_ms: list[float]) -> dict:
    """Adds `machine_speed` (the VLM's own stage timed beside the controller, over the profile's
    prediction for it: 2 = the machine ran twice as slow as when profiled) and `profile_ms`, the
    controller's cost on the profile's clock: what the environments charge, in the units of every
    other part of their latency, however busy the machine was while measuring; likewise
    `guard_profile_ms`, the budget guard's."""
    speed = statistics.median(v / p for v, p in zip(vlm_ms, profile_ms, strict=True))
    return {**cost, "machine_speed": speed, "profile_ms": cost["total_ms"] / speed,
            "guard_profile_ms": cost["guard_ms"] / speed}  # fmt: skip


def two_stage_overhead_ms(server: TwoStageServer, samples: list, budgets_ms: list[float], repeats: int = 6) -> dict:
    """What the two-stage controller adds to a request on the serving path, measured (medians, ms):
    its own networks (stage 1, the budget token's embedding, the heads) and the budget token's share
    of the layers 0-2 pass (that pass with the token minus without it, timed back to back: a difference
    of two noisy timings, hence more repeats); and that cost on the profile's clock, against the
    layers 0-2 pass (`_in_profile_units`)."""
    vlm, own, extra, plain, predicted, guard = server.vlm, [], [], [], [], []
    a, b = server.latency_model.prefix
    with torch.no_grad():
        for r in range(repeats):
            for i, (sample, budget) in enumerate(zip(samples, budgets_ms, strict=True)):
                guard.append(_guard_ms(server, sample, budget))
                t0 = time.perf_counter()  # as in `serve`: the guard's check, then stage 1
                alone, with_controller = server.predict(sample.image, sample.question)
                server.guarded(budget, alone, with_controller)
                obs = server.observe(sample.image, sample.question, budget, with_controller)
                server.choose_tier(obs)
                t_net = time.perf_counter() - t0
                tier = (i + r) % len(TIERS)  # every tier's prefix, whatever an untrained stage 1 prefers
                token, room = server.stage2_inputs(obs, tier)
                pre = vlm.preprocess([sample.image], [sample.question], TIERS[tier])
                prepared = vlm.connect(pre, vlm.encode_vision(pre.pixels()))
                sees = stage2_sees(vlm, pre, prepared.valid.shape[1])
                runs = {}
                for with_token in (True, False) if (i + r) % 2 else (False, True):  # alternate the order
                    t0 = time.perf_counter()
                    state = vlm.prefix(prepared, token, sees) if with_token else vlm.prefix(prepared)
                    runs[with_token] = time.perf_counter() - t0
                    if with_token:
                        t1 = time.perf_counter()
                        server.choose_knobs(state.side_state, room, tier)
                        t_net += time.perf_counter() - t1
                own.append(t_net * 1e3)
                extra.append((runs[True] - runs[False]) * 1e3)
                plain.append(runs[False] * 1e3)
                predicted.append(max(1e-6, a + b * prepared.prompt_tokens[0]))
    networks, token_share = statistics.median(own), statistics.median(extra)
    cost = {"networks_ms": networks, "budget_token_prefill_ms": token_share,
            "total_ms": networks + max(token_share, 0.0), "requests": len(own),
            "guard_ms": statistics.median(guard)}  # fmt: skip
    return _in_profile_units(cost, plain, predicted)
