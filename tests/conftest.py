import numpy as np
import pytest

from envs.vlm.checkpoint import build_model


@pytest.fixture(scope="session")
def tiny():
    """A randomly initialised tiny model: the knob mechanics do not depend on training."""
    return build_model("tiny", seed=0)


def random_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


@pytest.fixture
def images():
    return [random_image(160, 200, 1), random_image(96, 64, 2), random_image(210, 150, 3)]


QUESTIONS = ["what colour is the largest shape?", "how many circles?", "which letter is in the top left corner?"]


@pytest.fixture
def questions():
    return list(QUESTIONS)
