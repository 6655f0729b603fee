"""The shared `--threads` option: every script that runs a model takes it, and it sets torch's thread count."""

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from envs.threads import add_threads_flag, use_threads

ROOT = Path(__file__).resolve().parents[1]
NO_MODEL_WORK = {"compare.py"}  # tables and plots of finished runs' eval.json: no torch, no threads to set
SCRIPTS = sorted(p.name for p in (ROOT / "scripts").glob("*.py") if p.name not in NO_MODEL_WORK)


def test_the_threads_flag_sets_torch_threads_and_refuses_nonsense(capsys):
    ap = argparse.ArgumentParser()
    add_threads_flag(ap)
    assert ap.parse_args([]).threads is None
    before = torch.get_num_threads()
    try:
        assert use_threads(ap.parse_args(["--threads", "2"]).threads) == 2 and torch.get_num_threads() == 2
        assert use_threads(ap.parse_args([]).threads) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    for bad in ("0", "-1", "two"):
        with pytest.raises(SystemExit):
            ap.parse_args(["--threads", bad])
        assert "expected a positive integer" in capsys.readouterr().err


def test_train_vlm_takes_threads_outside_its_training_options(capsys):
    from training.cli import parse, parse_command

    args, threads = parse_command(["--threads", "3"])
    assert threads == 3 and not hasattr(args, "threads")
    assert parse_command([])[1] is None and parse(["--threads", "3"]) == args
    with pytest.raises(SystemExit):
        parse(["--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "--threads N torch CPU threads (default 1, or $KNOB_RL_THREADS)" in shown
    assert "idle machine" in shown and "idle machine (default" not in shown  # no "(default: None)" after it


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_that_runs_a_model_documents_threads(script):
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / script), "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "--threads" in out.stdout
