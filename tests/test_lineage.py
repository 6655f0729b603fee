"""The shipped model's lineage as recipe files, and reading options back from a recipe or a run's args.json."""

import json
from pathlib import Path

import pytest

from training.args import TrainArgs
from training.cli import parse
from training.lineage import check_chain, is_built, read, recipe_paths

PATHS = recipe_paths()


def test_every_recipe_parses_into_valid_args_with_a_note():
    assert len(PATHS) >= 2 and [p.name[:2] for p in PATHS] == [f"{i:02d}" for i in range(1, len(PATHS) + 1)]
    for path in PATHS:
        recipe = read(path)
        args = parse(["--recipe", str(path)])  # exits with a usage error for an unknown key or a bad value
        assert isinstance(recipe["note"], str) and recipe["note"]
        assert args.out == Path(recipe["out"]) and args.init == (Path(recipe["init"]) if recipe.get("init") else None)
        for key, value in recipe.items():
            if key != "note":
                got = getattr(args, key)
                assert (list(got) if isinstance(got, tuple) else str(got) if isinstance(got, Path) else got) == value


def test_each_step_starts_from_the_model_of_the_step_before_and_the_last_ships():
    recipes = [read(p) for p in PATHS]
    check_chain(recipes)
    assert "init" not in recipes[0] and recipes[-1]["ship"] == "envs/vlm/weights/tiny"
    assert len({r["out"] for r in recipes}) == len(recipes)  # every step trains into a folder of its own
    broken = [recipes[0], recipes[1] | {"init": "runs/elsewhere/model"}]
    with pytest.raises(ValueError, match="step 2 starts from runs/elsewhere/model"):
        check_chain(broken)


def test_flags_after_a_recipe_win_and_a_bad_recipe_is_a_usage_error(tmp_path, capsys):
    gpu = next(p for p in PATHS if read(p).get("device") == "cuda")
    assert parse(["--recipe", str(gpu)]).device == "cuda"
    args = parse(["--recipe", str(gpu), "--device", "cpu", "--steps", "7", "--stop-at", "5"])
    assert (args.device, args.steps, args.stop_at) == ("cpu", 7, 5)
    assert args.batch_size == read(gpu)["batch_size"]  # the rest as the recipe says
    for bad in ({"out": "x", "no_such_option": 1}, {"out": "x", "steps": 2.5}, ["not", "an", "object"]):
        path = tmp_path / "bad.json"
        path.write_text(json.dumps(bad))
        with pytest.raises(SystemExit):
            parse(["--recipe", str(path)])
        assert "--recipe" in capsys.readouterr().err


def test_a_runs_args_json_reads_back_as_the_same_args(tmp_path):
    args = TrainArgs(
        out=tmp_path / "run", init=tmp_path / "m", steps=9, attn_layers=(1, 2), family_weights=(1, 2, 3, 4, 5)
    )
    (tmp_path / "args.json").write_text(json.dumps(args.to_dict(), indent=1))
    assert parse(["--recipe", str(tmp_path / "args.json")]) == args
    assert TrainArgs.from_dict(json.loads((tmp_path / "args.json").read_text())) == args


def test_built_steps_are_the_ones_whose_model_exists(tmp_path):
    recipe = read(PATHS[0])
    assert not is_built(recipe, tmp_path)
    model = tmp_path / recipe["out"] / "model"
    model.mkdir(parents=True)
    (model / "model.safetensors").write_bytes(b"")
    assert is_built(recipe, tmp_path)


def test_every_option_has_its_help_text_from_the_comment_beside_its_field(capsys):
    import dataclasses

    from training.cli import field_help

    helps = field_help(TrainArgs)
    assert {f.name for f in dataclasses.fields(TrainArgs)} <= set(helps)
    assert helps["carry_layers"] == "after these layers"
    with pytest.raises(SystemExit):
        parse(["--help"])
    shown = " ".join(capsys.readouterr().out.split())  # whatever the terminal width
    assert "--carry-layers LAYER [LAYER ...] after these layers (default: (1, 2))" in shown


def test_every_aids_options_are_fields_of_train_args_and_off_by_default():
    import dataclasses

    from training.aids import AIDS, active_aids

    fields = {f.name for f in dataclasses.fields(TrainArgs)}
    for aid in AIDS:
        assert issubclass(TrainArgs, aid.options)
        assert {f.name for f in dataclasses.fields(aid.options)} <= fields
    assert active_aids(TrainArgs()) == []  # a plain run trains with the answer and dense vision losses only
    on = TrainArgs(attn_weight=0.1, carry_weight=0.2, norm_cap=5.0)
    assert [a.__name__ for a in active_aids(on)] == ["GuidedAttention", "AskedColourCarry", "NormCap"]
