"""What each package may import: the model package serves inference only, and tests call no script's logic."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-level imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def importers(folder: str, prefixes: tuple[str, ...]) -> dict[str, set[str]]:
    out = {}
    for path in sorted((ROOT / folder).rglob("*.py")):
        bad = {m for m in imported_modules(path) if m.startswith(prefixes)}
        if bad:
            out[str(path.relative_to(ROOT))] = bad
    return out


def test_the_model_package_imports_no_task_generator_training_or_diagnostics():
    assert importers("envs/vlm", ("envs.tasks", "training", "diagnostics", "scripts")) == {}


def test_training_and_diagnostics_import_no_scripts_and_training_no_diagnostics():
    assert importers("training", ("diagnostics", "scripts")) == {}
    assert importers("diagnostics", ("scripts",)) == {}


def test_the_tests_take_training_and_diagnostics_logic_from_their_packages():
    moved = tuple(
        f"scripts.{name}"
        for name in (
            "train_vlm",
            "attention_report",
            "presence_probe",
            "error_report",
            "answer_state",
            "compare_models",
            "eval_vlm",
        )
    )
    assert importers("tests", moved) == {}
