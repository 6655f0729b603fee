import json
import math

import numpy as np
import pytest

from envs.budgets import BudgetError, budget_features, check_budget, parse_distribution


@pytest.mark.parametrize("name,lo,hi", [("uniform", 0.2, 1.2), ("tight", 0.15, 0.5), ("loose", 0.8, 1.5),
                                        ("log_uniform", 0.15, 1.5)])  # fmt: skip
def test_named_distributions_scale_with_the_full_config_latency(name, lo, hi):
    d = parse_distribution(name)
    x = d.sample(np.random.default_rng(0), 5000, full_ms=200.0)
    assert x.min() >= lo * 200 and x.max() <= hi * 200
    assert x.max() - x.min() > 0.8 * (hi - lo) * 200


def test_log_uniform_is_uniform_in_log_space():
    x = parse_distribution("log_uniform").sample(np.random.default_rng(1), 20000, 1.0)
    hist, _ = np.histogram(np.log(x), bins=5, range=(math.log(0.15), math.log(1.5)))
    assert hist.min() / hist.max() > 0.9


def test_bimodal_has_two_modes():
    x = parse_distribution("bimodal").sample(np.random.default_rng(2), 10000, 100.0)
    assert (x > 0).all()
    assert 0.45 < (x < 60).mean() < 0.55
    assert ((x > 45) & (x < 60)).mean() < 0.02  # the valley between 30 and 100 ms


def test_trace_in_ms_and_in_fractions(tmp_path):
    (tmp_path / "ms.json").write_text(json.dumps([50, 75.5]))
    (tmp_path / "fr.json").write_text(json.dumps({"unit": "fraction", "budgets": [0.5]}))
    rng = np.random.default_rng(0)
    assert set(parse_distribution(f"trace:{tmp_path / 'ms.json'}").sample(rng, 100, 300.0)) == {50.0, 75.5}
    assert (parse_distribution(f"trace:{tmp_path / 'fr.json'}").sample(rng, 3, 300.0) == 150.0).all()


@pytest.mark.parametrize(
    "content,match",
    [("[]", "non-empty"), ("not json", "not JSON"), ("[10, -1]", "#1 is -1"), ('[10, "x"]', "#1 is 'x'"),
     ('{"unit": "s", "budgets": [1]}', "unit must be"), ("[1e999]", "positive finite")],
)  # fmt: skip
def test_bad_trace_files(tmp_path, content, match):
    (tmp_path / "t.json").write_text(content)
    with pytest.raises(BudgetError, match=match):
        parse_distribution(f"trace:{tmp_path / 't.json'}")


def test_unknown_distribution_and_missing_trace():
    with pytest.raises(BudgetError, match="unknown budget distribution 'gaussian'"):
        parse_distribution("gaussian")
    with pytest.raises(BudgetError, match="not found"):
        parse_distribution("trace:/nonexistent.json")


@pytest.mark.parametrize("bad", [0, -5, float("nan"), float("inf"), "10"])
def test_bad_budgets(bad):
    with pytest.raises(BudgetError, match="positive finite"):
        check_budget(bad)


def test_budget_features_are_log_scale_and_ratio():
    f = budget_features(np.array([50.0, 100.0, 400.0]), full_ms=100.0)
    assert f.shape == (3, 3) and f.dtype == np.float32
    np.testing.assert_allclose(f[:, 1], [0.5, 1.0, 4.0])
    np.testing.assert_allclose(f[:, 0], np.log([50, 100, 400]), rtol=1e-6)
    np.testing.assert_allclose(f[:, 2], np.log([0.5, 1.0, 4.0]), atol=1e-6)
    assert np.ptp(f, axis=0).min() > 0.5  # every feature varies over a realistic range


def test_penalty_on_scalars_and_arrays():
    from envs.budgets import Penalty

    assert Penalty("indicator", 2.0)(30.0, 25.0) == 2.0 and Penalty()(20.0, 25.0) == 0.0
    assert Penalty("relative", 0.5)(30.0, 20.0) == pytest.approx(0.25)
    arr = Penalty("relative", 1.0)(np.array([[10.0, 30.0]]), np.array([[20.0], [15.0]]))
    np.testing.assert_allclose(arr, [[0.0, 0.5], [0.0, 1.0]])
    with pytest.raises(ValueError, match="unknown penalty"):
        Penalty("quadratic")
