"""The CPU benchmarks run end to end at small sizes and report what their usage lines promise."""

import itertools
import json

import pytest
from conftest import load_benchmark

from envs.vlm.presets import get_preset

pytestmark = pytest.mark.slow  # each runs the VLM over every config of the knob space

KNOBS = get_preset("tiny").knob_lists()
CONFIGS = list(itertools.product(KNOBS["tier"], KNOBS["top_k"], KNOBS["blocks"]))


def test_config_latency_times_every_config_once_per_round(tmp_path):
    out = tmp_path / "configs.json"
    assert load_benchmark("config_latency.py").main(["--repeats", "1", "--new-tokens", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [(r["tier"], r["top_k"], r["blocks"]) for r in report["configs"]] == CONFIGS
    totals = [r["total_ms"] for r in report["configs"]]
    assert all(t > 0 for t in totals) and report["meta"]["max_over_min"] == pytest.approx(max(totals) / min(totals))
    tokens = {r["tier"]: r["vision_tokens"] for r in report["configs"]}
    assert tokens["low"] < tokens["medium"] < tokens["high"]


def test_outcome_sharing_gives_the_naive_runs_answers_with_fewer_layer_evaluations(tmp_path):
    out = tmp_path / "sharing.json"
    assert load_benchmark("outcome_sharing.py").main(["--n", "2", "--batch-size", "2", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["same_answers"] and report["configs"] == len(CONFIGS)
    assert report["vit_ratio"] > 1 and report["llm_ratio"] > 1  # the sweep runs vision and layers 0-2 once


def test_env_speed_reports_replay_steps_and_live_episodes_per_second(world_assets, tmp_path):
    out = tmp_path / "env_speed.json"
    args = ["--model", str(world_assets), "--steps", "50", "--live-episodes", "2", "--out", str(out)]
    assert load_benchmark("env_speed.py").main(args) == 0
    report = json.loads(out.read_text())
    assert set(report) == {f"{m}_{k}_{u}" for k in ("two_stage", "single_stage") for m, u in
                           (("replay", "steps_per_s"), ("live", "episodes_per_s"))}  # fmt: skip
    assert all(v > 0 for v in report.values())
