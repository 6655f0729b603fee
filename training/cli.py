"""The command line of a training run: one flag per `TrainArgs` field, and `--recipe FILE`.

Flags are derived from the fields' types (a tuple field takes several values, a bool field
`--x / --no-x`) and their metadata (choices, metavar, a fixed count). `--recipe FILE` reads the
values of a JSON file (a lineage step under training/recipes/, or a run's args.json); flags given
on the command line win over it. `--threads N` (envs/threads.py) is the CPU thread count of the run,
not a training option: it stays out of TrainArgs, recipes and args.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import re
import typing
from pathlib import Path

from envs.threads import add_threads_flag
from training.args import TrainArgs

RECIPE_ONLY_KEYS = ("note",)  # what a recipe may hold beside TrainArgs fields


def read_recipe(path: Path) -> dict:
    """The TrainArgs values of a recipe file (its `note` left out); ValueError for unknown keys."""
    values = json.loads(Path(path).read_text())
    if not isinstance(values, dict):
        raise ValueError(f"{path}: a recipe is a JSON object of training options")
    values = {k: v for k, v in values.items() if k not in RECIPE_ONLY_KEYS}
    typed = TrainArgs.from_dict(values)  # checks the keys and gives each value its field's type
    return {k: getattr(typed, k) for k in values}


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description as written, and each option's default after its help."""


def field_help(cls: type) -> dict[str, str]:
    """The comment after each field of the dataclass `cls` and of its bases: the field's --help text."""
    out = {}
    for base in reversed(cls.__mro__[:-1]):
        for match in re.finditer(r"^\s+(\w+): [^\n#]*#\s*(.+)$", inspect.getsource(base), re.MULTILINE):
            out[match[1]] = match[2]
    return out


def parser(description: str | None = None) -> argparse.ArgumentParser:
    """An ArgumentParser with a flag per TrainArgs field (`--batch-size` for `batch_size`), `--recipe` and
    `--threads`."""
    ap = argparse.ArgumentParser(description=description, formatter_class=_Formatter)
    ap.add_argument("--recipe", type=Path, help="JSON file of option values (a lineage step or a run's args.json)")
    # absent unless given (SUPPRESS), so the formatter does not print "(default: None)" after the help's own default
    add_threads_flag(ap).default = argparse.SUPPRESS
    hints, helps = typing.get_type_hints(TrainArgs), field_help(TrainArgs)
    for f in dataclasses.fields(TrainArgs):
        flag, hint, meta = "--" + f.name.replace("_", "-"), hints[f.name], dict(f.metadata)
        meta["help"] = helps.get(f.name, f.name.replace("_", " "))
        if hint is bool:
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=meta["help"])
        elif hint in (Path, Path | None):
            ap.add_argument(flag, type=Path, default=f.default, help=meta["help"])
        elif typing.get_origin(hint) is tuple:
            items = typing.get_args(hint)
            nargs = meta.pop("nargs", "+" if items[-1] is Ellipsis else len(items))
            meta.setdefault("metavar", "LAYER" if f.name.endswith("_layers") else None)
            ap.add_argument(flag, type=items[0], nargs=nargs, default=f.default, **meta)
        else:
            ap.add_argument(flag, type=hint, default=f.default, **meta)
    return ap


def parse_command(argv: list[str] | None = None, description: str | None = None) -> tuple[TrainArgs, int | None]:
    """TrainArgs and the `--threads` count (None if not given) from the command line; a usage error (exit 2)
    for values `train` cannot run with."""
    ap = parser(description)
    known, _ = ap.parse_known_args(argv)
    if known.recipe is not None:
        try:
            ap.set_defaults(**read_recipe(known.recipe))
        except (OSError, ValueError, TypeError) as e:
            ap.error(f"--recipe {known.recipe}: {e}")
    values = vars(ap.parse_args(argv))
    values.pop("recipe")
    threads = values.pop("threads", None)
    try:
        args = TrainArgs.from_dict(values)
        args.check()
    except ValueError as e:
        ap.error(str(e))
    return args, threads


def parse(argv: list[str] | None = None, description: str | None = None) -> TrainArgs:
    """TrainArgs from the command line (`--threads` accepted and left out); a usage error (exit 2) for values
    `train` cannot run with."""
    return parse_command(argv, description)[0]
