"""The public API: `import envs` registers the environments, `gymnasium.make` builds them from keyword
arguments, the packages export their entry points, and no import order meets a cycle."""

import ast
import subprocess
import sys
import warnings

import gymnasium as gym
import pytest
from conftest import ROOT
from gymnasium.utils.env_checker import check_env

import agents
import envs
import policies
from envs.assets import load_assets
from envs.budgets import BudgetError, Penalty, parse_distribution
from envs.knob_env import LiveBackend, SingleStageKnobEnv, TwoStageKnobEnv


@pytest.fixture
def model_dir(world_assets):
    return world_assets


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("KNOB_RL_CACHE", str(tmp_path_factory.getbasetemp() / "api-cache"))


def checked(env):
    """`check_env` on the unwrapped env; its only warnings may be about the unbounded feature boxes."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env.unwrapped, skip_render_check=True)
    other = [str(w.message) for w in caught if "infinity" not in str(w.message)]
    assert other == []


def test_importing_envs_registers_both_ids():
    assert set(envs.ENV_IDS.values()) == {"KnobRL/TwoStage-v0", "KnobRL/SingleStage-v0"}
    for env_id in envs.ENV_IDS.values():
        assert env_id in gym.registry


@pytest.mark.slow
@pytest.mark.parametrize("env_id,cls", [("KnobRL/TwoStage-v0", TwoStageKnobEnv),
                                        ("KnobRL/SingleStage-v0", SingleStageKnobEnv)])  # fmt: skip
def test_make_without_arguments_replays_the_embedded_models_train_split(env_id, cls, monkeypatch):
    monkeypatch.delenv("KNOB_RL_CACHE")  # the embedded model's features: the user's cache
    env = gym.make(env_id)
    inner = env.unwrapped
    assets = load_assets("tiny")
    assert isinstance(inner, cls) and inner.backend is assets.train and inner.budgets.name == "log_uniform"
    assert inner.penalty == Penalty() and inner.controller_ms == 0.0 and inner.full_ms == assets.full_ms
    checked(env)


@pytest.mark.parametrize("env_id,cls", [("KnobRL/TwoStage-v0", TwoStageKnobEnv),
                                        ("KnobRL/SingleStage-v0", SingleStageKnobEnv)])  # fmt: skip
def test_make_takes_model_split_budgets_penalty_profile_and_knobs(model_dir, env_id, cls):
    env = gym.make(env_id, model=str(model_dir), split="val", budgets="tight", penalty="relative",
                   profile="latency_slow", controller_ms=0.5)  # fmt: skip
    inner = env.unwrapped
    assets = load_assets(str(model_dir), False, "latency_slow")
    assert isinstance(inner, cls) and inner.backend is assets.val
    assert inner.budgets.name == "tight" and inner.penalty == Penalty("relative") and inner.controller_ms == 0.5
    assert inner.full_ms == 50.0  # the named profile's
    checked(env)
    default = gym.make(env_id, model=model_dir, budgets=parse_distribution("loose"), penalty=Penalty("relative", 2))
    assert default.unwrapped.full_ms == 25.0 and default.unwrapped.backend is load_assets(str(model_dir)).train
    assert default.unwrapped.budgets.name == "loose" and default.unwrapped.penalty.weight == 2


def test_live_backend_runs_the_model_on_the_splits_requests(model_dir, world):
    env = gym.make("KnobRL/TwoStage-v0", model=str(model_dir), split="test", backend="live")
    inner = env.unwrapped
    assert isinstance(inner.backend, LiveBackend) and len(inner.backend) == len(world[3])
    env.reset(seed=0)
    _, _, done, _, _ = env.step([0, 0, 0])  # stage 1: the low tier; the VLM encodes its crops
    assert not done
    _, _, done, _, info = env.step([0, 0, 0])
    assert done and 0.0 <= info["score"] <= 1.0 and info["latency_ms"] > 0


def test_environments_of_one_model_share_one_load(model_dir, monkeypatch):
    import envs.assets

    loads = []
    real = envs.assets.load_model
    monkeypatch.setattr(envs.assets, "load_model", lambda spec: loads.append(spec) or real(spec))
    load_assets.cache_clear()
    made = [gym.make("KnobRL/TwoStage-v0", model=str(model_dir), budgets="tight") for _ in range(8)]
    assert loads == [str(model_dir)]
    assert len({id(e.unwrapped.backend) for e in made}) == 1


@pytest.mark.parametrize("kwargs,error,match", [
    ({"split": "dev"}, ValueError, "unknown split 'dev'"),
    ({"backend": "remote"}, ValueError, "unknown backend 'remote'"),
    ({"budgets": "gaussian"}, BudgetError, "unknown budget distribution 'gaussian'"),
    ({"budgets": 3.0}, TypeError, "budgets must be a spec string or a BudgetDistribution"),
    ({"penalty": "huge"}, ValueError, "unknown penalty 'huge'"),
    ({"profile": "latency_gpu"}, FileNotFoundError, "latency_gpu.json is missing"),
    ({"budget": "tight"}, TypeError, "unexpected keyword argument 'budget'"),
])  # fmt: skip
def test_bad_keyword_arguments_are_named(model_dir, kwargs, error, match):
    with pytest.raises(error, match=match):
        gym.make("KnobRL/SingleStage-v0", model=str(model_dir), **kwargs)


def test_an_unknown_model_is_named():
    with pytest.raises(FileNotFoundError, match="unknown model 'nope'"):
        envs.make_knob_env("two_stage", model="nope")


def test_packages_export_their_entry_points():
    for package in (envs, agents, policies):
        assert package.__doc__
        for name in package.__all__:
            assert getattr(package, name).__doc__ or not callable(getattr(package, name)), name
    assert {"make_knob_env", "load_model", "load_assets"} <= set(envs.__all__)
    assert {"Args", "train", "evaluate", "load_server"} <= set(agents.__all__)
    assert {"TwoStagePolicy", "SingleStagePolicy"} <= set(policies.__all__)


def _modules() -> list[str]:
    names = []
    for package in ("envs", "agents", "policies"):
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


@pytest.mark.slow
def test_every_module_imports_first_in_a_fresh_interpreter():
    """Each module imported before any other of the project's (its package's __init__ runs first anyway): an
    import cycle would fail one of them."""
    script = (
        "import importlib, sys\n"
        "failed = []\n"
        f"for name in {_modules()!r}:\n"
        "    for loaded in [m for m in sys.modules if m.split('.')[0] in ('envs', 'agents', 'policies')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ImportError as e:\n"
        "        failed.append(f'{name}: {e}')\n"
        "print('\\n'.join(failed))\n"
        "sys.exit(1 if failed else 0)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    for order in (("envs", "agents", "policies"), ("policies", "agents", "envs"), ("agents", "policies", "envs")):
        code = "; ".join(f"import {m}" for m in order)
        done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr


PROJECT = ("envs", "agents", "policies", "training", "diagnostics")


def test_no_function_imports_the_projects_own_modules():
    """Project modules import each other at the top: a function-level import would hide a cycle."""
    found = []
    for folder in (*PROJECT, "scripts", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    for inner in ast.walk(node):
                        if isinstance(inner, ast.ImportFrom) and (inner.module or "").split(".")[0] in PROJECT:
                            found.append(f"{path.relative_to(ROOT)}:{inner.lineno} {inner.module}")
                        elif isinstance(inner, ast.Import):
                            found += [f"{path.relative_to(ROOT)}:{inner.lineno} {a.name}" for a in inner.names
                                      if a.name.split(".")[0] in PROJECT]  # fmt: skip
    assert found == []
