"""The outcome table: every sample x every config, run once, recorded, then replayed.

Rows hold the answer, its score and the latency parts (from a latency profile's model, applied to
the request's own crops, prompt length and decode steps). The sweep shares work: per batch and tier
the crops, vision encoder, connector and LLM layers 0-2 run once, and every (top_k, blocks) pair
finishes from that prefix.

Storage is sharded and append-only: shard i (a fixed range of samples) is written to a temporary
file and renamed into place when complete, so a run killed at any moment (even kill -9) leaves only
whole shards, and running the same command again computes exactly the missing ones.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from envs.atomic import atomic_path, stale_temporaries, write_json, write_text
from envs.latency import PARTS, LatencyModel
from envs.tasks.data import load_manifest
from envs.tasks.synthvqa import VERSION, make_sample
from envs.vlm.checkpoint import load_model, weights_digest
from envs.vlm.evaluate import Config, finish_all
from envs.vlm.metrics import exact_match, vqa_soft_accuracy

META = "meta.json"


# ---------------------------------------------------------------------------------------------- datasets
def dataset_samples(spec: dict, start: int = 0, stop: int | None = None) -> list:
    """Samples [start, stop) of a dataset spec: synthvqa.dataset_spec(seed, n) or {"kind": "manifest", "path"}."""
    if spec["kind"] == "synthvqa":
        version = spec.get("version", 1)  # tables from before versions were recorded are version 1
        if version != VERSION:
            raise ValueError(
                f"this table was built on SynthVQA version {version}, whose scenes differ from "
                f"the current version {VERSION}: rebuild it (scripts/build_outcomes.py)"
            )
        stop = spec["n"] if stop is None else min(stop, spec["n"])
        return [make_sample(spec["seed"], i) for i in range(start, stop)]
    if spec["kind"] == "manifest":
        stop = spec.get("n") if stop is None else min(stop, spec.get("n", stop))
        return load_manifest(spec["path"])[start:stop]
    raise ValueError(f"unknown dataset kind {spec['kind']!r}")


def dataset_size(spec: dict) -> int:
    return spec["n"] if "n" in spec else len(dataset_samples(spec))


# ---------------------------------------------------------------------------------------------- one shard
_MODELS: dict[tuple, object] = {}


def _model(spec: str, device: str):
    """One model per worker process (Ray tasks on the same worker reuse it)."""
    key = (spec, device)
    if key not in _MODELS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _MODELS[key] = load_model(spec, device=device)
    return _MODELS[key]


def _failed_rows(index, sample, configs, reason):
    return [{"sample": index, "sample_id": sample.id, "family": sample.family, "config": j, "tier": c.tier,
             "top_k": c.top_k, "blocks": c.blocks, "status": "failed", "reason": reason}
            for j, c in enumerate(configs)]  # fmt: skip


def run_shard(model_spec: str, dataset: dict, start: int, stop: int, configs: Sequence[Config],
              latency: dict, batch_size: int = 32, device: str = "cpu") -> list[dict]:  # fmt: skip
    """Rows of samples [start, stop) x configs, sorted by (sample, config)."""
    model = _model(model_spec, device)
    latency_model = LatencyModel.from_dict(latency)
    samples = dataset_samples(dataset, start, stop)
    rows: dict[tuple[int, int], dict] = {}
    for j, idx, prepared, gen in finish_all(model, samples, configs, batch_size):
        if j is None:  # a bad sample: recorded as failed, the sweep goes on
            for r in _failed_rows(start + idx[0], samples[idx[0]], configs, str(prepared)):
                rows[(r["sample"], r["config"])] = r
            continue
        c = configs[j]
        for n, i in enumerate(idx):
            s = samples[i]
            latency_ms = row_latency(
                latency_model, prepared.n_crops[n], prepared.prompt_tokens[n], c.top_k, c.blocks, gen.decode_steps[n]
            )
            rows[(start + i, j)] = {
                "sample": start + i, "sample_id": s.id, "family": s.family, "config": j, "tier": c.tier,
                "top_k": c.top_k, "blocks": c.blocks, "status": "ok", "answer": gen.answers[n],
                "score": vqa_soft_accuracy(gen.answers[n], s.answers), "exact": exact_match(gen.answers[n], s.answers),
                "crops": prepared.n_crops[n], "prompt_tokens": prepared.prompt_tokens[n],
                "decode_steps": gen.decode_steps[n], "latency_ms": latency_ms,
            }  # fmt: skip
    return [rows[k] for k in sorted(rows)]


def row_latency(latency_model: LatencyModel, crops: int, prompt_tokens: int, top_k: int, blocks: int,
                decode_steps: int) -> dict[str, float]:  # fmt: skip
    """A row's `latency_ms`: the latency model's parts and total for the request's own shapes."""
    parts = latency_model.predict(crops, prompt_tokens, top_k, blocks, decode_steps)
    return {p: round(parts[p], 4) for p in (*PARTS, "total")}


# ---------------------------------------------------------------------------------------------- the table
def n_shards(meta: dict) -> int:
    return (meta["n"] + meta["shard_size"] - 1) // meta["shard_size"]


def shard_path(out: Path, i: int) -> Path:
    return out / "shards" / f"shard_{i:05d}.jsonl"


def write_shard(out: Path, i: int, rows: list[dict]) -> None:
    write_text(shard_path(out, i), "".join(json.dumps(r) + "\n" for r in rows))


def read_meta(out: Path) -> dict:
    """A table's meta.json; a torn or foreign file is a ValueError naming it."""
    path = Path(out) / META
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(
            f"{path} is torn or not JSON ({e}); delete the table directory {out} and build it again"
        ) from None
    if not isinstance(meta, dict) or not all(k in meta for k in ("n", "shard_size", "configs", "dataset")):
        raise ValueError(f"{path} is not an outcome table's meta (keys n, shard_size, configs, dataset expected)")
    return meta


def build_outcomes(model_spec: str, dataset: dict, out: str | Path, latency: dict, configs: Sequence[Config],
                   shard_size: int = 50, batch_size: int = 32, executor: str = "local", ray_address: str | None = None,
                   gpus_per_task: float = 0.0, device: str = "cpu", progress: bool = True) -> Path:  # fmt: skip
    """Fill OUT with every missing shard; existing whole shards are kept (resume)."""
    from tqdm import tqdm

    out = Path(out)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    n = dataset_size(dataset)
    meta = {"model": str(model_spec), "weights": weights_digest(model_spec), "dataset": dataset, "n": n,
            "shard_size": shard_size, "configs": [c.__dict__ for c in configs], "latency_model": latency}  # fmt: skip
    if (out / META).exists():
        old = read_meta(out)
        if {k: old.get(k) for k in meta} != json.loads(json.dumps(meta)):
            raise ValueError(f"{out} holds an outcome table for another model, dataset, profile or shard size")
    else:
        write_json(out / META, meta)
    for stale in stale_temporaries(out / "shards"):
        stale.unlink(missing_ok=True)  # torn writes of a killed run
    todo = [i for i in range(n_shards(meta)) if not shard_path(out, i).exists()]
    ranges = [(i, i * shard_size, min(n, (i + 1) * shard_size)) for i in todo]
    if executor == "local":
        for i, a, b in tqdm(ranges, desc="outcome shards", disable=not progress):
            write_shard(out, i, run_shard(model_spec, dataset, a, b, configs, latency, batch_size, device))
    elif executor == "ray":
        import ray

        if not ray.is_initialized():
            ray.init(address=ray_address, ignore_reinit_error=True, include_dashboard=False, log_to_driver=False)
        task = ray.remote(num_gpus=gpus_per_task)(run_shard)
        pending = {
            task.remote(model_spec, dataset, a, b, configs, latency, batch_size, device): i for i, a, b in ranges
        }
        bar = tqdm(total=len(pending), desc="outcome shards (ray)", disable=not progress)
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            write_shard(out, pending.pop(done[0]), ray.get(done[0]))
            bar.update()
        bar.close()
    else:
        raise ValueError(f"unknown executor {executor!r}; choose local or ray")
    return out


def retime_outcomes(src: str | Path, out: str | Path, latency: dict) -> Path:
    """A copy of the complete table SRC whose latencies come from another profile's latency model.

    Rows record each request's own shapes (crops, prompt tokens, decode steps), so a new profile (a
    quieter re-measurement, another machine) applies without running the model again; answers and
    scores are copied unchanged.
    """
    src, out = Path(src), Path(out)
    if (out / META).exists():
        raise ValueError(f"retime into a new directory: {out} already holds a table")
    meta = read_meta(src)
    model = LatencyModel.from_dict(latency)
    missing = [i for i in range(n_shards(meta)) if not shard_path(src, i).exists()]
    if missing:
        raise ValueError(f"{src} is incomplete: shard {missing[0]} is missing; finish building it first")
    (out / "shards").mkdir(parents=True, exist_ok=True)
    for i in range(n_shards(meta)):
        shard = list(read_shard(src, i))
        for r in shard:
            if r["status"] == "ok":
                keys = ("crops", "prompt_tokens", "top_k", "blocks", "decode_steps")
                r["latency_ms"] = row_latency(model, *(r[k] for k in keys))
        write_shard(out, i, shard)
    write_json(out / META, {**meta, "latency_model": latency})
    return out


def read_rows(out: str | Path):
    """All rows, sorted by (sample, config), streamed shard by shard."""
    out = Path(out)
    meta = read_meta(out)
    for i in range(n_shards(meta)):
        if not shard_path(out, i).exists():
            raise ValueError(f"{out} is incomplete: shard {i} is missing; run the build command again")
        yield from read_shard(out, i)


def read_shard(out: Path, i: int):
    with shard_path(out, i).open() as f:
        for line in f:
            yield json.loads(line)


def export_jsonl(out: str | Path, path: str | Path) -> Path:
    with atomic_path(path) as tmp, tmp.open("w") as f:
        for r in read_rows(out):
            f.write(json.dumps(r, sort_keys=True) + "\n")
    return Path(path)


@dataclass
class OutcomeTable:
    """Arrays over (sample, config) for replay, oracles and reports."""

    configs: list[Config]
    sample_ids: list[str]
    families: list[str]
    ok: np.ndarray  # [n] bool: the sample ran (not failed)
    score: np.ndarray  # [n, c] VQA soft accuracy
    exact: np.ndarray  # [n, c] exact match
    latency: np.ndarray  # [n, c] total ms
    parts: np.ndarray  # [n, c, len(PARTS)]
    meta: dict

    def save_npz(self, path: str | Path) -> Path:
        """The compact replay form (a few MB for thousands of samples) that ships beside a model."""
        with atomic_path(path) as tmp:
            self._savez(tmp)
        return Path(path)

    def _savez(self, path: Path) -> None:
        np.savez_compressed(
            path, meta=json.dumps(self.meta), configs=json.dumps([c.__dict__ for c in self.configs]),
            sample_ids=np.array(self.sample_ids), families=np.array(self.families), ok=self.ok,
            score=self.score, exact=self.exact, latency=self.latency, parts=self.parts.astype(np.float16),
        )  # fmt: skip

    @classmethod
    def load(cls, out: str | Path) -> OutcomeTable:
        """From a table directory (shards) or its packed .npz."""
        out = Path(out)
        if out.suffix == ".npz":
            if not out.is_file():
                raise ValueError(f"outcome table not found: {out}")
            z = np.load(out)
            return cls([Config(**c) for c in json.loads(str(z["configs"]))], z["sample_ids"].tolist(),
                       z["families"].tolist(), z["ok"], z["score"], z["exact"], z["latency"],
                       z["parts"].astype(np.float32),
                       json.loads(str(z["meta"])))  # fmt: skip
        if not (out / META).exists():
            raise ValueError(f"{out} is not an outcome table (no {META})")
        meta = read_meta(out)
        configs = [Config(**c) for c in meta["configs"]]
        n, c = meta["n"], len(configs)
        score, exact, latency = (np.zeros((n, c), np.float32) for _ in range(3))
        parts = np.zeros((n, c, len(PARTS)), np.float32)
        ok = np.ones(n, bool)
        ids, fams = [""] * n, [""] * n
        for r in read_rows(out):
            i, j = r["sample"], r["config"]
            ids[i], fams[i] = r["sample_id"], r["family"]
            if r["status"] != "ok":
                ok[i] = False
                continue
            score[i, j], exact[i, j] = r["score"], r["exact"]
            latency[i, j] = r["latency_ms"]["total"]
            parts[i, j] = [r["latency_ms"][p] for p in PARTS]
        return cls(configs, ids, fams, ok, score, exact, latency, parts, meta)

    def subset(self, mask: np.ndarray) -> OutcomeTable:
        idx = np.flatnonzero(mask)
        return OutcomeTable(self.configs, [self.sample_ids[i] for i in idx], [self.families[i] for i in idx],
                            self.ok[idx], self.score[idx], self.exact[idx], self.latency[idx], self.parts[idx],
                            self.meta)  # fmt: skip

    def head(self, n: int) -> OutcomeTable:
        """The first `n` samples, with a dataset spec that names exactly them (so caches keyed on it differ)."""
        if n >= len(self.sample_ids):
            return self
        table = self.subset(np.arange(len(self.sample_ids)) < n)
        table.meta = {**self.meta, "dataset": {**self.meta["dataset"], "n": n}}
        return table

    def valid(self) -> OutcomeTable:
        return self.subset(self.ok)
