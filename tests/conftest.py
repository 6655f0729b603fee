import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from envs.budgets import parse_distribution
from envs.features import FeatureCache
from envs.knob_env import LiveBackend, ReplayBackend, TwoStageKnobEnv
from envs.latency import LatencyModel
from envs.outcomes import OutcomeTable, build_outcomes, dataset_samples
from envs.tasks.synthvqa import dataset_spec
from envs.vlm.checkpoint import build_model, save_model
from envs.vlm.evaluate import all_configs

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny():
    """A randomly initialised tiny model: the knob mechanics do not depend on training."""
    return build_model("tiny", seed=0)


def load_benchmark(name: str):
    """benchmarks/ holds scripts, not a package: load one by path."""
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), ROOT / "benchmarks" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def random_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


@pytest.fixture
def images():
    return [random_image(160, 200, 1), random_image(96, 64, 2), random_image(210, 150, 3)]


QUESTIONS = ["what colour is the largest shape?", "how many circles?", "which letter is in the top left corner?"]


@pytest.fixture
def questions():
    return list(QUESTIONS)


def fake_latency() -> dict:
    """A latency model with known coefficients: cost grows with crops, tokens, top-k and blocks."""
    kb = [(k, b) for k in (1, 2, 4, 6, 8) for b in (5, 7, 9, 11, 13)]
    return LatencyModel(
        per_crop={"preprocess": (0.5, 0.1), "vision": (1.0, 2.0), "connector": (0.2, 0.1)},
        prefix=(1.0, 0.05),
        prefill_rest={f"{k}|{b}": (0.5, 0.002 * b * (4 + k)) for k, b in kb},
        decode_per_token={f"{k}|{b}": 0.3 * b + 0.1 * k for k, b in kb},
    ).to_dict()


DATASET = dataset_spec(21, 5)


@pytest.fixture(scope="session")
def vlm_dir(tiny, tmp_path_factory):
    """The random tiny model saved, for what loads a VLM by path (SB3 policies)."""
    return str(save_model(tiny, tmp_path_factory.mktemp("vlm") / "m"))


@pytest.fixture(scope="session")
def world(tiny, tmp_path_factory):
    """One small outcome table and feature cache over the random tiny model, shared by every test module."""
    tmp = tmp_path_factory.mktemp("env")
    model_dir = str(save_model(tiny, tmp / "m"))
    out = build_outcomes(model_dir, DATASET, tmp / "t", fake_latency(), all_configs(tiny), progress=False)
    table = OutcomeTable.load(out)
    samples = dataset_samples(DATASET)
    return tiny, table, FeatureCache.build(tiny, samples, progress=False), samples


def _envs(world, cls=TwoStageKnobEnv, **kw):
    model, table, feats, samples = world
    lm = LatencyModel.from_dict(fake_latency())
    replay = cls(ReplayBackend(table, feats, lm, model.cfg.knob_lists()), parse_distribution("uniform"), 20.0, **kw)
    live = cls(LiveBackend(model, samples, lm), parse_distribution("uniform"), 20.0, **kw)
    return replay, live


@pytest.fixture(scope="session")
def world_assets(world, tmp_path_factory):
    """A model directory laid out like the embedded one (envs/assets.py): the world's model, a profile beside it
    (and a second, `latency_slow`), and the world's one table standing in for every split."""
    tiny, table, _, _ = world
    root = save_model(tiny, tmp_path_factory.mktemp("world_assets") / "tiny")
    (root / "latency_cpu.json").write_text(json.dumps({"model": fake_latency(), "reference_full_ms": 25.0}))
    (root / "latency_slow.json").write_text(json.dumps({"model": fake_latency(), "reference_full_ms": 50.0}))
    (root / "outcomes").mkdir()
    for split in ("train", "val", "test"):
        table.save_npz(root / "outcomes" / f"{split}.npz")
    return root
