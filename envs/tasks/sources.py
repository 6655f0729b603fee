"""A user's dataset from one DATA string, checked, and split into train / val / test by question id.

    synthvqa:SEED:N                                  the project's synthetic scenes
    FILE.jsonl                                       a manifest (envs/tasks/data.py)
    vqav2:QUESTIONS.json,ANNOTATIONS.json,IMAGE_DIR  VQAv2's question and annotation files
    hf:DIR                                           a Hugging Face `datasets` dataset saved with save_to_disk,
                                                     or a folder of parquet files (needs pyarrow: the `hf` extra)

`split_samples` puts each question in a split by a seeded hash of its id, so a question stays in its
split however the dataset grows or is reordered. `check_samples` refuses duplicate ids and unreadable
images before anything is written.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from envs.tasks.data import Sample, load_manifest, load_vqav2
from envs.tasks.synthvqa import make_sample

SPLITS = ("train", "val", "test")


class DataError(ValueError):
    """A dataset that cannot be used as given (a missing column, duplicate ids, unreadable images...)."""


@dataclass
class Columns:
    """The column names of an `hf:` dataset."""

    image: str = "image"
    question: str = "question"
    answers: str = "answers"
    id: str = field(default="question_id")  # `id` is tried when this column is absent; else the row number


def load_data(spec: str, columns: Columns | None = None) -> list[Sample]:
    """The samples a DATA string names (see the module's docstring)."""
    if spec.startswith("synthvqa:"):
        try:
            _, seed, n = spec.split(":")
            seed, n = int(seed), int(n)
        except ValueError:
            raise DataError(f"{spec!r}: write synthvqa:SEED:N (two integers)") from None
        if n <= 0:
            raise DataError(f"{spec!r}: N must be positive")
        return [make_sample(seed, i) for i in range(n)]
    if spec.startswith("vqav2:"):
        parts = spec[len("vqav2:") :].split(",")
        if len(parts) != 3:
            raise DataError(f"{spec!r}: write vqav2:QUESTIONS.json,ANNOTATIONS.json,IMAGE_DIR")
        for p in parts:
            if not Path(p).exists():
                raise DataError(f"{spec!r}: {p} does not exist")
        try:
            return load_vqav2(*parts)
        except (KeyError, TypeError) as e:
            raise DataError(f"{spec!r}: not VQAv2 question / annotation files (missing key {e})") from None
    if spec.startswith("hf:"):
        return load_hf(Path(spec[3:]), columns or Columns())
    if spec.endswith(".jsonl"):
        return load_manifest(spec)
    raise DataError(f"unknown DATA {spec!r}: use synthvqa:SEED:N, FILE.jsonl, vqav2:Q.json,A.json,IMAGES or hf:DIR")


def _hf_tables(root: Path):
    """The Arrow tables of a save_to_disk folder (its .arrow files) or of a folder of parquet files."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("hf: datasets need pyarrow: pip install -e '.[hf]'") from None
    if not root.is_dir():
        raise DataError(f"hf:{root}: no such folder")
    parquet = sorted(root.rglob("*.parquet"))
    if parquet:
        return [pq.read_table(p) for p in parquet]
    arrow = sorted(root.rglob("*.arrow"))
    if not arrow:
        raise DataError(f"hf:{root}: holds neither .parquet files nor a save_to_disk dataset (.arrow files)")
    tables = []
    for p in arrow:
        with pa.memory_map(str(p)) as source:
            try:
                tables.append(pa.ipc.open_stream(source).read_all())
            except pa.ArrowInvalid:
                source.seek(0)
                tables.append(pa.ipc.open_file(source).read_all())
    return tables


def _hf_image(value, root: Path, where: str):
    """An image cell: datasets' Image feature ({"bytes", "path"}), raw bytes, or a path."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return Image.open(io.BytesIO(value["bytes"]))
        value = value.get("path")
    if isinstance(value, bytes | bytearray):
        return Image.open(io.BytesIO(value))
    if isinstance(value, str) and value:
        path = Path(value) if Path(value).is_absolute() else root / value
        return path
    raise DataError(f"{where}: the image cell holds neither image bytes nor a path")


def load_hf(root: Path, columns: Columns) -> list[Sample]:
    """Rows of a datasets dataset on disk as samples; column names from `columns`."""
    samples = []
    for table in _hf_tables(root):
        names = set(table.column_names)
        for role in ("image", "question", "answers"):
            if getattr(columns, role) not in names:
                raise DataError(f"hf:{root}: no {role} column {getattr(columns, role)!r} (columns: "
                                f"{sorted(names)}); name it with --{role}-column")  # fmt: skip
        id_column = columns.id if columns.id in names else "id" if "id" in names else None
        for row in table.to_pylist():
            where = f"hf:{root} row {len(samples)}"
            answers = row[columns.answers]
            if isinstance(answers, str):
                answers = [answers]
            if isinstance(answers, list) and answers and isinstance(answers[0], dict):  # VQAv2-style answer dicts
                answers = [a.get("answer") for a in answers]
            if not answers or not all(isinstance(a, str) for a in answers):
                raise DataError(f"{where}: answers must be a non-empty list of strings")
            sid = str(row[id_column]) if id_column else str(len(samples))
            image = _hf_image(row[columns.image], root, where)
            samples.append(Sample(sid, image, str(row[columns.question]), answers, str(row.get("family") or "")))
    if not samples:
        raise DataError(f"hf:{root} holds no rows")
    return samples


def check_samples(samples: list[Sample]) -> None:
    """Refuse duplicate question ids and images that cannot be read, naming them."""
    seen, dupes = set(), []
    for s in samples:
        if s.id in seen:
            dupes.append(s.id)
        seen.add(s.id)
    if dupes:
        raise DataError(f"duplicate question ids: {sorted(set(dupes))[:10]} (ids must be unique: they decide the "
                        "split and name the rows)")  # fmt: skip
    bad = []
    for s in samples:
        try:
            if isinstance(s.image, Image.Image):
                s.image.load()
            else:
                with Image.open(s.image) as im:
                    im.load()
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            bad.append(f"{s.id} ({s.image if not isinstance(s.image, Image.Image) else 'image bytes'}: {e})")
    if bad:
        raise DataError(f"{len(bad)} unreadable image(s): " + "; ".join(bad[:5]))


def split_of(sample_id: str, seed: int, fractions: tuple[float, float, float]) -> str:
    """The split of one question id: a seeded hash of the id, compared with the cumulative fractions."""
    u = int.from_bytes(hashlib.sha1(f"{seed}:{sample_id}".encode()).digest()[:8], "big") / 2**64
    edge = 0.0
    for name, f in zip(SPLITS, fractions, strict=True):
        edge += f
        if u < edge:
            return name
    return SPLITS[-1]


def parse_fractions(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise DataError(f"--split {text!r}: three comma-separated fractions, e.g. 0.6,0.2,0.2") from None
    if len(parts) != 3 or any(p < 0 for p in parts) or abs(sum(parts) - 1.0) > 1e-6:
        raise DataError(f"--split {text!r}: three fractions >= 0 that sum to 1, e.g. 0.6,0.2,0.2")
    return parts


def split_samples(samples: list[Sample], fractions: tuple[float, float, float], seed: int = 0) -> dict:
    """{split: samples}, each question placed by `split_of`; an empty train or test split is refused."""
    out = {name: [] for name in SPLITS}
    for s in samples:
        out[split_of(s.id, seed, fractions)].append(s)
    for name, f in zip(SPLITS, fractions, strict=True):
        if not out[name] and (name != "val" or f > 0):
            raise DataError(f"the {name} split is empty ({len(samples)} questions, fractions {fractions}): use "
                            "more questions or a larger fraction for it (--split)")  # fmt: skip
    return out
