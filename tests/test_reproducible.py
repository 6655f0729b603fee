"""A pinned controller charge makes the main job reproducible: two runs of one seed write the same numbers."""

import json

import pytest

from scripts.train_ppo import main as train_main

UNTIMED = {"minutes", "peak_memory_mb"}  # wall time and memory: the only fields allowed to differ


def numbers(path) -> dict:
    report = json.loads(path.read_text())
    report["meta"] = {k: v for k, v in report["meta"].items() if k not in UNTIMED}
    return report


@pytest.mark.slow
def test_two_quick_runs_with_a_pinned_charge_write_identical_reports(world_assets, tmp_path, monkeypatch):
    monkeypatch.setenv("KNOB_RL_CACHE", str(tmp_path / "cache"))
    reports = []
    for name in ("a", "b"):
        argv = ["--quick", "--controller-ms", "1.0", "--model", str(world_assets), "--out", str(tmp_path / name),
                "--eval-budgets", "tight,loose", "--seed", "3"]  # fmt: skip
        assert train_main(argv) == 0
        reports.append(numbers(tmp_path / name / "eval.json"))
    first, second = reports
    assert first["meta"]["controller"] == {"pinned": True, "charged_ms": 1.0, "guard_charged_ms": 1.0}
    assert first["meta"]["controller_ms"] == 1.0 and first["meta"]["guard_ms"] == 1.0
    assert first["results"]["tight"]["ppo"]["controller_ms"] == pytest.approx(1.0)  # every decided request
    assert first == second
