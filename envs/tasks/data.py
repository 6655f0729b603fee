"""VQA-format datasets: JSONL manifests and VQAv2-style question + annotation JSON with an image folder.

SynthVQA exports to the same manifest format, so the project's own data and a user's real data go
through one loader.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from envs.atomic import atomic_path


@dataclass
class Sample:
    id: str
    image: Image.Image | Path  # a path is opened lazily by the model's preprocessing
    question: str
    answers: list[str]  # annotator answers (ten in VQAv2)
    family: str = ""
    objects: tuple = ()  # SynthVQA's SceneObjects (for dense auxiliary training); empty for real data

    @property
    def answer(self) -> str:
        """The most common answer: the training target."""
        return max(set(self.answers), key=lambda a: (self.answers.count(a), a))


def export_manifest(samples: Iterable[Sample], out_dir: str | Path, name: str = "manifest.jsonl") -> Path:
    """Write images as PNG under out_dir/images and one JSON object per sample to out_dir/name."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    with atomic_path(path) as tmp, tmp.open("w") as f:
        for s in tqdm(samples, desc="export", leave=False):
            rel = f"images/{s.id}.png"
            if isinstance(s.image, Image.Image):
                with atomic_path(out_dir / rel) as image_tmp:
                    s.image.save(image_tmp, format="PNG")
            else:
                rel = str(Path(s.image).resolve())
            row = {"id": s.id, "image": rel, "question": s.question, "answers": s.answers, "family": s.family}
            f.write(json.dumps(row) + "\n")
    return path


def load_manifest(path: str | Path) -> list[Sample]:
    """Read a JSONL manifest; image paths are relative to the manifest's folder unless absolute. A row's id is
    its `id`, else its `question_id`, else its line number."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    samples = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            answers = row["answers"]
            if isinstance(answers, str):
                answers = [answers]
            if not answers or not all(isinstance(a, str) for a in answers):
                raise ValueError("answers must be a non-empty list of strings")
            samples.append(
                Sample(
                    str(row.get("id", row.get("question_id", n))),
                    path.parent / row["image"],
                    row["question"],
                    answers,
                    row.get("family", ""),
                )
            )
        except (json.JSONDecodeError, KeyError, ValueError) as e:
            raise ValueError(f"{path}:{n}: not a manifest row ({e}); need image, question, answers") from None
    if not samples:
        raise ValueError(f"{path} holds no samples")
    return samples


def load_vqav2(questions: str | Path, annotations: str | Path, image_dir: str | Path) -> list[Sample]:
    """VQAv2 layout: {"questions": [...]} and {"annotations": [...]} joined on question_id.

    Images are found by the image id in their file name (e.g. COCO_val2014_000000000042.jpg).
    """
    qs = json.loads(Path(questions).read_text())["questions"]
    anns = {a["question_id"]: a for a in json.loads(Path(annotations).read_text())["annotations"]}
    by_id: dict[int, Path] = {}
    for p in Path(image_dir).iterdir():
        m = re.search(r"(\d+)\.(jpg|jpeg|png)$", p.name, re.IGNORECASE)
        if m:
            by_id[int(m.group(1))] = p
    samples = []
    for q in qs:
        ann = anns.get(q["question_id"])
        if ann is None:
            raise ValueError(f"question {q['question_id']} has no annotation")
        if q["image_id"] not in by_id:
            raise ValueError(f"no image for image_id {q['image_id']} in {image_dir}")
        answers = [a["answer"] for a in ann["answers"]]
        family = ann.get("answer_type", ann.get("question_type", ""))
        samples.append(Sample(str(q["question_id"]), by_id[q["image_id"]], q["question"], answers, family))
    return samples
