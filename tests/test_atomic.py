"""Atomic writes (envs/atomic.py) and caches that refuse or rebuild a torn file instead of trusting it."""

import json
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from envs.atomic import atomic_path, stale_temporaries, write_bytes, write_json, write_text
from envs.features import CorruptCacheError, FeatureCache
from envs.outcomes import OutcomeTable, read_meta
from tests.conftest import ROOT, fake_latency


def _leftovers(folder, keep):
    return sorted(p.name for p in folder.iterdir() if p.name != keep)


def test_text_bytes_and_json_are_written_whole(tmp_path):
    assert write_text(tmp_path / "a.txt", "héllo").read_text() == "héllo"
    assert write_bytes(tmp_path / "b.bin", b"\x00\x01").read_bytes() == b"\x00\x01"
    assert (
        write_json(tmp_path / "sub" / "c.json", {"x": [1, 2]}, indent=None, end="\n").read_text() == '{"x": [1, 2]}\n'
    )
    write_text(tmp_path / "a.txt", "second")  # replaces an existing file
    assert (tmp_path / "a.txt").read_text() == "second"
    assert stale_temporaries(tmp_path) == [] and stale_temporaries(tmp_path / "sub") == []


def test_a_writer_that_raises_midway_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "cache.npz"
    np.savez(target, x=np.arange(3))
    before = target.read_bytes()
    with pytest.raises(RuntimeError, match="disk full"), atomic_path(target) as tmp:
        with open(tmp, "wb") as f:
            f.write(b"PK\x03\x04 half a zip")
        raise RuntimeError("disk full")
    assert target.read_bytes() == before
    assert _leftovers(tmp_path, "cache.npz") == []


def test_the_temporary_keeps_the_suffix_so_savez_writes_exactly_it(tmp_path):
    with atomic_path(tmp_path / "f.npz") as tmp:
        assert tmp.suffix == ".npz" and tmp.parent == tmp_path
        np.savez(tmp, x=np.arange(4))
    np.testing.assert_array_equal(np.load(tmp_path / "f.npz")["x"], np.arange(4))
    assert _leftovers(tmp_path, "f.npz") == []


def test_a_writer_that_writes_nothing_is_an_error_and_leaves_no_target(tmp_path):
    with pytest.raises(FileNotFoundError, match="wrote nothing"), atomic_path(tmp_path / "x.json"):
        pass
    assert list(tmp_path.iterdir()) == []


def _small_cache(n=3):
    rng = np.random.default_rng(0)
    return FeatureCache(rng.random((n, 8), np.float32), rng.random((n, 3, 2, 4), np.float32),
                        np.ones((n, 3, 4), np.float32), np.full((n, 3), 5, np.int64),
                        rng.random((n, 8), np.float32), np.ones((n, 3), np.int64))  # fmt: skip


def test_a_truncated_feature_cache_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "features-abc.npz"
    _small_cache().save(path)
    assert FeatureCache.load(path).prompt.shape == (3, 8)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])  # what a kill during a plain np.savez left
    with pytest.raises(CorruptCacheError, match="features-abc.npz.*delete it"):
        FeatureCache.load(path)
    path.write_text('{"not": "a cache"}')  # a foreign file
    with pytest.raises(CorruptCacheError, match="features-abc.npz"):
        FeatureCache.load(path)


@pytest.mark.slow  # the shared `world` fixture builds a model and a table
def test_a_torn_feature_cache_is_rebuilt_with_a_warning(world, tmp_path):
    """replay_backend rebuilds a torn cache (warning with the file's name) instead of failing every run."""
    from envs.knob_env import replay_backend
    from envs.latency import LatencyModel

    tiny, table, feats, _ = world
    table_path = table.save_npz(tmp_path / "table.npz")
    latency = LatencyModel.from_dict(fake_latency())
    replay_backend(tiny, table_path, latency, cache_dir=tmp_path / "cache")
    (cache,) = (tmp_path / "cache").glob("features-*.npz")
    cache.write_bytes(cache.read_bytes()[:1000])
    with pytest.raises(zipfile.BadZipFile):
        np.load(cache)  # torn indeed
    with pytest.warns(UserWarning, match=f"{cache.name}.*rebuilding"):
        backend = replay_backend(tiny, table_path, latency, cache_dir=tmp_path / "cache")
    np.testing.assert_allclose(backend.prompt(0), feats.prompt[0], atol=1e-6)
    np.testing.assert_allclose(FeatureCache.load(cache).kv, feats.kv, atol=1e-5)  # rebuilt whole on disk
    _small_cache(n=2).save(cache)  # a whole npz of other shapes: foreign, rebuilt too
    with pytest.warns(UserWarning, match=f"{cache.name} holds arrays of other shapes"):
        replay_backend(tiny, table_path, latency, cache_dir=tmp_path / "cache")
    np.testing.assert_allclose(FeatureCache.load(cache).prompt, feats.prompt, atol=1e-6)
    assert stale_temporaries(tmp_path / "cache") == []


@pytest.mark.slow  # the shared `world` fixture builds a model and a table
def test_a_torn_outcome_meta_is_an_error_naming_the_file(world, tmp_path):
    _, table, _, _ = world
    src = table.meta  # a directory table's meta, written by build_outcomes
    out = tmp_path / "t"
    (out / "shards").mkdir(parents=True)
    text = json.dumps(src, indent=1)
    (out / "meta.json").write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=r"meta\.json is torn or not JSON"):
        OutcomeTable.load(out)
    with pytest.raises(ValueError, match=str(out / "meta.json")):
        read_meta(out)
    (out / "meta.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"meta\.json is not an outcome table's meta"):
        OutcomeTable.load(out)


@pytest.mark.slow  # the shared `world` fixture builds a model and a table
def test_a_packed_table_is_written_atomically_and_round_trips(world, tmp_path):
    _, table, _, _ = world
    path = table.save_npz(tmp_path / "t.npz")
    assert _leftovers(tmp_path, "t.npz") == []
    back = OutcomeTable.load(path)
    np.testing.assert_array_equal(back.score, table.score)
    assert back.sample_ids == table.sample_ids


_WRITER = """
import sys, numpy as np
from envs.atomic import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    print("writing", flush=True)
    np.savez(tmp, x=np.arange(int(sys.argv[2]), dtype=np.float64))
print("done", flush=True)
"""


@pytest.mark.slow  # writes a few hundred MB in a subprocess
@pytest.mark.parametrize("old", [False, True])
def test_sigkill_during_a_big_atomic_write_leaves_the_old_file_or_none(tmp_path, old):
    target = tmp_path / "big.npz"
    if old:
        np.savez(target, x=np.arange(10, dtype=np.float64))
    n = 40_000_000  # 320 MB: takes far longer than the pause below to write
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(target), str(n)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout.readline().strip() == "writing"
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    if old:
        np.testing.assert_array_equal(np.load(target)["x"], np.arange(10, dtype=np.float64))
    else:
        assert not target.exists()
    leftovers = stale_temporaries(tmp_path)  # the killed writer's partial temporary, marked as one
    assert all(p.name.startswith(".big.npz.") for p in leftovers)
    assert set(tmp_path.iterdir()) - set(leftovers) == ({target} if old else set())


def test_a_failed_checkpoint_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    from training import checkpoints

    net = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    path = tmp_path / "checkpoint.pt"
    checkpoints.save_checkpoint(path, net, net, opt, step=3)

    def torn(obj, f):
        Path(f).write_bytes(b"PK\x03\x04 torn")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoints.torch, "save", torn)
    with pytest.raises(OSError, match="No space left"):
        checkpoints.save_checkpoint(path, net, net, opt, step=4)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 3
    assert _leftovers(tmp_path, "checkpoint.pt") == []


def test_a_model_directory_is_saved_whole_and_loads(tiny, tmp_path):
    from envs.vlm.checkpoint import load_model, save_model

    path = save_model(tiny, tmp_path / "m")
    assert stale_temporaries(path) == []
    back = load_model(str(path))
    for k, v in tiny.state_dict().items():
        assert torch.equal(back.state_dict()[k].cpu(), v.cpu()), k
