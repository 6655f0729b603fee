"""The asked-colour carry: its labels, its loss, that it teaches the carry, and its training options."""

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from envs.tasks.synthvqa import COLOURS, complement, make_sample
from training.aids.attention_guide import answer_positions
from training.aids.colour_carry import CARRY_LR_SCALE, CarryLoss, ColourCarry, asked_colours
from training.args import TrainArgs
from training.checkpoints import continue_head
from training.cli import parse as parse_train_args
from training.trainer import lr_at, param_groups, train
from training.vision_probe import VisionProbe, prepare_with_targets


def test_asked_colours_follow_the_presence_question():
    samples = [make_sample(6, i, f) for i in range(8) for f in ("presence", "colour", "count")]
    samples.append(complement(make_sample(4, 2, "presence"), "attribute"))
    assert samples[-1].question.startswith("what colour")  # asks no colour: no label
    got = asked_colours(samples)
    names = list(COLOURS)
    for s, label in zip(samples, got, strict=True):
        if s.family == "presence" and s.question.startswith("is there"):
            assert f" {names[label]} " in s.question
        else:
            assert label == -1
    assert (got >= 0).sum() == 8 and len(set(got[got >= 0].tolist())) > 2


@pytest.fixture
def presence_batch(tiny):
    samples = [make_sample(7, i, "presence") for i in range(12)] + [make_sample(7, i, "glyph") for i in range(3)]
    samples = [s for s in samples if s.family != "presence" or s.question.startswith("is there")]
    pre, _ = prepare_with_targets(tiny.cfg, tiny.tokenizer, samples, "low", [s.answer for s in samples])
    return samples, pre


def test_the_carry_loss_is_the_readouts_cross_entropy_at_the_answer_position(tiny, presence_batch):
    samples, pre = presence_batch
    carry = ColourCarry(tiny.cfg.llm.d_model)
    asked = asked_colours(samples)
    outputs = {}
    with torch.no_grad():
        prepared = tiny.connect(pre, tiny.encode_vision(pre.pixels()))
        loss = CarryLoss(carry, answer_positions(prepared.targets), asked, layers=(1, 4))

        def both(layer, h_in, h_out):
            outputs[layer] = h_out
            loss(layer, h_in, h_out)

        tiny.forward_logits(prepared, [0, 1, 2, 3], 2, on_layer=both)  # layer 4 does not run
    assert len(loss.terms) == 1 and 0 <= loss.accuracy <= 1
    rows = torch.as_tensor(asked >= 0)
    at = outputs[1][rows, answer_positions(prepared.targets)[rows]]
    h = at.float() / at.float().pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
    want = torch.nn.functional.cross_entropy(carry.readout(h), torch.as_tensor(asked[asked >= 0]))
    assert loss.value().item() == pytest.approx(want.item(), rel=1e-5)
    none = CarryLoss(carry, answer_positions(prepared.targets), np.full(len(samples), -1), layers=(1,))
    none(1, outputs[1], outputs[1])
    assert not none.terms and none.value().item() == 0 and np.isnan(none.accuracy)
    with pytest.raises(ValueError, match="asked colours"):
        CarryLoss(carry, answer_positions(prepared.targets), asked[:-1], layers=(1,))


@pytest.mark.slow
def test_the_carry_loss_teaches_the_first_layers_to_carry_the_asked_colour(tiny, presence_batch):
    """A random model's answer position does not hold the question's colour; 30 steps on layers 0-1 and
    the readout make it name the asked colour after layer 1."""
    samples, pre = presence_batch
    torch.manual_seed(0)
    carry = ColourCarry(tiny.cfg.llm.d_model)
    params = [p for i in (0, 1) for p in tiny.llm.layers[i].parameters()] + list(carry.parameters())
    opt = torch.optim.Adam(params, lr=3e-3)
    state = {k: v.clone() for k, v in tiny.state_dict().items()}
    asked = asked_colours(samples)
    losses, hits = [], []
    try:
        for _ in range(30):
            prepared = tiny.connect(pre, tiny.encode_vision(pre.pixels()))
            loss = CarryLoss(carry, answer_positions(prepared.targets), asked, layers=(1,))
            tiny.forward_logits(prepared, [0, 1], 2, on_layer=loss)
            opt.zero_grad()
            loss.value().backward()
            opt.step()
            losses.append(loss.value().item())
            hits.append(loss.accuracy)
    finally:
        tiny.load_state_dict(state)  # the session's shared random model stays as it was
    assert losses[-1] < 0.3 * losses[0] and hits[-1] == 1.0 and hits[0] < 0.6


def saved_at(run):
    return torch.load(run / "checkpoint.pt", weights_only=True)


@pytest.mark.slow
def test_train_with_the_carry_logs_it_resumes_it_continues_it_and_refuses_bad_options(tmp_path, capsys):
    common = dict(batch_size=6, val_every=1000, val_n=5, ranking_n=3, full_steps=0, warmup=1, p_full=1.0)
    presence = dict(family_weights=(0.0, 1.0, 0.0, 0.0, 0.0), carry_weight=0.5, carry_layers=(1, 3))
    presence |= dict(boost_layers=(2,), boost_scale=10.0)
    run = tmp_path / "carry"
    train(TrainArgs(out=run, steps=2, **presence, **common))
    saved = saved_at(run)
    assert saved["carry"]["readout.weight"].shape == (len(COLOURS), 96)
    rates = [g["lr"] for g in saved["opt"]["param_groups"]]  # plain, plain, boosted, probe, readout
    base = lr_at(1, TrainArgs(out=run, steps=2, **presence, **common))
    assert rates == pytest.approx([base, base, 10 * base, base, CARRY_LR_SCALE * base])
    train(TrainArgs(out=run, steps=3, **presence, **common))  # resumes the readout and its optimiser state
    events = EventAccumulator(str(run / "tb")).Reload()
    carried = [e.value for e in events.Scalars("train/colour_carry")]
    accuracy = [e.value for e in events.Scalars("train/carry_accuracy")]
    assert len(carried) == 3 and all(0 < c < 10 for c in carried) and all(0 <= a <= 1 for a in accuracy)
    capsys.readouterr()
    follow = tmp_path / "follow"  # a run from this one's model continues its readout
    train(TrainArgs(out=follow, steps=1, init=run / "model", **presence, **common))
    assert f"asked-colour readout continued from {run / 'checkpoint.pt'}" in capsys.readouterr().out
    head = ColourCarry(96)
    assert continue_head(head, "readout", run / "model", "carry")  # what that run loaded
    assert torch.equal(head.readout.weight, saved_at(run)["carry"]["readout.weight"])
    without = tmp_path / "plain"
    train(TrainArgs(out=without, steps=1, **common))
    assert "carry" not in torch.load(without / "checkpoint.pt", weights_only=True)
    train(TrainArgs(out=tmp_path / "from_plain", steps=1, init=without / "model", **presence, **common))
    assert "asked-colour readout" not in capsys.readouterr().out  # nothing to continue: a fresh readout
    assert not continue_head(head, "readout", without / "model", "carry")
    with pytest.raises(ValueError, match="carry-weight"):  # a plain run resumed with the carry, and back
        train(TrainArgs(out=without, steps=2, **presence, **common))
    with pytest.raises(ValueError, match="carry-weight"):
        train(TrainArgs(out=run, steps=4, **common))
    for bad in (
        dict(carry_weight=-1.0),
        dict(carry_layers=()),
        dict(carry_layers=(16,)),
        dict(boost_layers=(16,)),
        dict(boost_scale=0.0),
    ):
        with pytest.raises(ValueError, match="carry|boost"):
            train(TrainArgs(out=tmp_path / "bad", steps=1, **bad))
    flags = "--carry-weight 0.5 --carry-layers 1 2 5 --boost-layers 2 3 --boost-scale 4"
    got = parse_train_args(["--out", str(tmp_path), *flags.split()])
    assert got.carry_weight == 0.5 and got.carry_layers == (1, 2, 5)
    assert got.boost_layers == (2, 3) and got.boost_scale == 4
    assert parse_train_args(["--out", str(tmp_path)]).carry_weight == 0
    with pytest.raises(SystemExit):
        parse_train_args(["--out", str(tmp_path), "--carry-layers", "17"])
    capsys.readouterr()


@pytest.mark.parametrize("boost", [(), (2,), (0, 5)])
def test_param_groups_boost_exactly_the_named_layers_mlps(tiny, tmp_path, boost):
    args = TrainArgs(out=tmp_path, boost_layers=boost, boost_scale=8.0)
    groups = param_groups(tiny, VisionProbe(tiny.cfg.llm.d_model), args)
    names = {id(p): n for n, p in tiny.named_parameters()}
    boosted = {names[id(p)] for g in groups if g.get("lr_scale") == 8.0 for p in g["params"]}
    want = {n for n in names.values() if any(n.startswith(f"llm.layers.{i}.mlp.") for i in boost)}
    assert boosted == want and (len(want) == 3 * len(boost))  # router and the two expert tensors
    everything = [id(p) for g in groups[:-1] for p in g["params"]]
    assert sorted(everything) == sorted(names) and len(groups) == 3 + (len(boost) > 0)
    for g in groups[:-1]:  # matrices decay; norms, biases and embeddings do not
        assert all((g["weight_decay"] > 0) == (p.ndim >= 2 and "embed" not in names[id(p)]) for p in g["params"])
