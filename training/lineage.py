"""The shipped tiny model's lineage: one recipe file per training step, in order, under training/recipes/.

Each recipe is a JSON object of `TrainArgs` values (plus a `note` on why the step exists); every
step after the first starts from the model of the step before (`init` is its OUT/model, or the
directory it shipped to). `scripts/build_embedded.sh` trains the steps not built yet:

    python -m training.lineage             # the steps: name, out, init, note
    python -m training.lineage --pending   # recipe paths whose model is not built yet, in order
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RECIPES = Path(__file__).resolve().parent / "recipes"


def recipe_paths(folder: Path = RECIPES) -> list[Path]:
    """The recipe files in lineage order (their names start with the step number)."""
    return sorted(folder.glob("[0-9][0-9]_*.json"))


def read(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def check_chain(recipes: list[dict]) -> None:
    """ValueError unless each step after the first starts from the model of the step before."""
    if not recipes:
        raise ValueError("no recipes")
    for i, (before, step) in enumerate(zip(recipes, recipes[1:], strict=False), start=2):
        made = {str(Path(before["out"]) / "model")} | ({str(Path(before["ship"]))} if before.get("ship") else set())
        if str(Path(step.get("init") or "")) not in made:
            raise ValueError(f"step {i} starts from {step.get('init')}, not from the model of step {i - 1} ({made})")


def is_built(recipe: dict, root: Path = Path(".")) -> bool:
    return (root / recipe["out"] / "model" / "model.safetensors").is_file()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pending", action="store_true", help="print the recipe paths not built yet, one a line")
    args = ap.parse_args(argv)
    paths = recipe_paths()
    recipes = [read(p) for p in paths]
    check_chain(recipes)
    for path, recipe in zip(paths, recipes, strict=True):
        if args.pending:
            if not is_built(recipe):
                print(path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path)
        else:
            print(f"{path.stem}: {recipe['out']} <- {recipe.get('init') or 'a fresh model'}\n    {recipe['note']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
