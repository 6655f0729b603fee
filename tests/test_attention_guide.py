"""Guided attention: which objects a question is about, where their tokens sit, and the head's loss."""

import dataclasses

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from diagnostics.attention_report import main as attention_report
from envs.tasks.synthvqa import (
    COLOURS,
    SMALL_SIZE,
    SPLIT_SEEDS,
    SynthVQA,
    asked_objects,
    complement,
    make_sample,
    presence_kind,
)
from envs.vlm.checkpoint import build_model, load_model
from envs.vlm.staged import attention_mask
from training.aids.attention_guide import (
    AttentionGuide,
    answer_attention,
    answer_positions,
    asked_colour_positions,
    colour_reads,
    guide_masks,
    match_positions,
    presence_rows,
    target_positions,
)
from training.args import TrainArgs
from training.cli import parse as parse_train_args
from training.trainer import train
from training.vision_probe import prepare_with_targets


@pytest.mark.parametrize("family", ["colour", "presence", "glyph", "count", "sum"])
def test_asked_objects_are_the_ones_the_answer_follows_from(family):
    for i in range(40):
        s = make_sample(3, i, family)
        got = asked_objects(s)
        assert all(o in s.objects for o in got)
        if family == "colour":
            assert len(got) == 1 and got[0].colour == s.answer and got[0].size == max(o.size for o in s.objects)
        elif family == "presence":  # the small object of the asked colour and shape: one on "yes", none on "no"
            colour, shape = s.question.rstrip("?").split()[-2:]
            assert len(got) == (s.answer == "yes")
            assert all(o.label == f"shape:{shape}" and o.colour == colour and o.size <= SMALL_SIZE for o in got)
        elif family == "glyph":
            assert [o.label for o in got] == [f"letter:{s.answer}"]
        elif family == "count":
            assert len(got) == int(s.answer)
        else:
            assert sum(int(o.label.split(":")[1]) for o in got) == int(s.answer) and len(got) == 2


def test_the_attribute_partner_asks_about_every_small_object_of_its_shape():
    pairs = [complement(make_sample(4, i, "presence"), "attribute") for i in range(60)]
    attribute = [p for p in pairs if p is not None and p.question.startswith("what colour")]
    assert len(attribute) > 10
    for p in attribute:
        shape = p.question.rstrip("?").split()[-1]
        got = asked_objects(p)
        assert [o.colour for o in got] == [p.answer]  # the shape is unique among the small objects
        assert got[0].label == f"shape:{shape}" and got[0].size <= SMALL_SIZE
    with pytest.raises(ValueError, match="family"):
        asked_objects(dataclasses.replace(make_sample(4, 0), family="other"))


def test_presence_by_shape_looks_at_every_small_object_of_the_asked_shape():
    kinds = set()
    for i in range(60):
        s = make_sample(3, i, "presence")
        colour, shape = s.question.rstrip("?").split()[-2:]
        got = asked_objects(s, presence="shape")
        small = [o for o in s.objects if o.size <= SMALL_SIZE and o.label == f"shape:{shape}"]
        assert list(got) == small
        kind = presence_kind(s)
        kinds.add(kind)
        # their colours decide: one of them has the asked colour exactly when the answer is "yes"
        assert (colour in [o.colour for o in got]) == (s.answer == "yes")
        assert bool(got) == (kind in ("present", "shape elsewhere", "both elsewhere"))
    assert {"present", "shape elsewhere", "colour elsewhere"} <= kinds
    other = make_sample(3, 0, "count")
    assert asked_objects(other, presence="shape") == asked_objects(other)  # other families: unchanged
    with pytest.raises(ValueError, match="presence"):
        asked_objects(other, presence="colour")


@pytest.fixture(scope="module")
def batch(tiny):
    samples = [make_sample(5, i) for i in range(10)]
    pre, _ = prepare_with_targets(tiny.cfg, tiny.tokenizer, samples, "high", [s.answer for s in samples])
    return samples, pre


def test_guide_masks_mark_the_asked_objects_tokens_or_the_null_token(tiny, batch):
    samples, pre = batch
    masks = guide_masks(samples, pre.crops, tiny.cfg.vision.tokens_per_side)
    length = max(len(t) for t in pre.token_ids)
    where = target_positions(pre, masks, length)
    bos, patch = tiny.tokenizer.ids["bos"], tiny.tokenizer.ids["im_patch"]
    for i, (s, mask) in enumerate(zip(samples, masks, strict=True)):
        seq = [None] * (length - len(pre.token_ids[i])) + pre.token_ids[i]  # left padding
        marked = where[i].nonzero().flatten().tolist()
        if asked_objects(s):
            assert mask is not None and len(marked) == mask.sum() > 0
            assert all(seq[p] == patch for p in marked)
        else:  # presence "no", count 0: the first real token, <bos>
            assert marked == [length - len(pre.token_ids[i])] and seq[marked[0]] == bos
    # a small object is too small for the global view: the low tier has nothing to say about it
    presence_yes = next(s for s in SynthVQA(6, 40) if s.family == "presence" and s.answer == "yes")
    low, _ = prepare_with_targets(tiny.cfg, tiny.tokenizer, [presence_yes], "low")
    assert guide_masks([presence_yes], low.crops, tiny.cfg.vision.tokens_per_side) == [None]
    assert not target_positions(low, [None], len(low.token_ids[0])).any()


def test_guide_masks_leave_out_families_not_guided(tiny, batch):
    samples, pre = batch
    side = tiny.cfg.vision.tokens_per_side
    every = guide_masks(samples, pre.crops, side)
    only = guide_masks(samples, pre.crops, side, families=("presence",), presence="shape")
    assert {s.family for s in samples} > {"presence"}
    for s, a, b in zip(samples, every, only, strict=True):
        if s.family != "presence":
            assert b is None and a is not None
        else:
            want = [o.colour for o in asked_objects(s, "shape")]
            assert b is not None and b.any() == bool(want)


def test_colour_reads_are_the_looked_at_colours_where_legible(tiny):
    side = tiny.cfg.vision.tokens_per_side
    samples = [make_sample(7, i, "presence") for i in range(24)] + [make_sample(7, 0, "colour")]
    high, _ = prepare_with_targets(tiny.cfg, tiny.tokenizer, samples, "high")
    low, _ = prepare_with_targets(tiny.cfg, tiny.tokenizer, samples, "low")
    reads = colour_reads(samples, high.crops, side)
    assert reads.shape == (25, len(COLOURS)) and not reads[-1].any()  # another family reads nothing
    names = list(COLOURS)
    for s, row in zip(samples[:-1], reads, strict=False):
        looked = [o.colour for o in asked_objects(s, "shape")]
        if looked:  # shares, summing to one, on exactly the small stars' colours
            assert row.sum() == pytest.approx(1) and {names[j] for j in np.flatnonzero(row)} == set(looked)
        else:
            assert not row.any()
    assert (reads.sum(1) > 0).sum() > 5
    assert not colour_reads(samples, low.crops, side).any()  # 10 px objects: illegible in the global view


@pytest.mark.slow
def test_the_colour_read_teaches_the_guided_layer_the_looked_at_colour():
    model = load_model("tiny")  # the shipped model: its vision tokens show shapes and colours
    # It was trained with this read, so its guided layer starts afresh here: a random layer 2.
    model.llm.layers[2].load_state_dict(build_model("tiny", seed=0).llm.layers[2].state_dict())
    samples = [make_sample(8, i, "presence") for i in range(40)]
    samples = [s for s in samples if asked_objects(s, "shape")][:12]
    pre, _ = prepare_with_targets(model.cfg, model.tokenizer, samples, "high", [s.answer for s in samples])
    side = model.cfg.vision.tokens_per_side
    masks, reads = [None] * len(samples), colour_reads(samples, pre.crops, side)  # the read alone
    assert (reads.sum(1) > 0).all()
    opt = torch.optim.Adam([p for i in range(3) for p in model.llm.layers[i].parameters()], lr=3e-3)
    losses, hits = [], []
    for _ in range(25):
        prepared = model.connect(pre, model.encode_vision(pre.pixels()))
        guide = AttentionGuide(model, pre, prepared, masks, layers=(2,), head=1, reads=reads)
        model.forward_logits(prepared, [0, 1, 2], 2, on_layer=guide)
        assert not guide.terms and len(guide.read_terms) == 1  # no attention target, one read
        loss = guide.read_value()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        hits.append(guide.read_accuracy)
    assert hits[0] < 0.5 and losses[-1] < 0.5 * losses[0] and hits[-1] > 0.8


def test_presence_rows_are_the_legible_presence_questions(tiny):
    side = tiny.cfg.vision.tokens_per_side
    samples = [make_sample(9, i, f) for i in range(6) for f in ("presence", "count")]
    samples.append(complement(make_sample(4, 2, "presence"), "attribute"))
    assert samples[-1].question.startswith("what colour")
    high, _ = prepare_with_targets(tiny.cfg, tiny.tokenizer, samples, "high")
    low, _ = prepare_with_targets(tiny.cfg, tiny.tokenizer, samples, "low")
    want = [s.family == "presence" and s.question.startswith("is there") for s in samples]
    assert presence_rows(samples, high.crops, side).tolist() == want and sum(want) == 6
    assert not presence_rows(samples, low.crops, side).any()  # 10 px objects: nothing to check there


def test_the_early_answer_is_the_answer_loss_of_the_layers_run_so_far():
    """At the guided layer the early term is the cross-entropy a model cut after that layer would have."""
    model = load_model("tiny")
    samples = [make_sample(10, i, f) for i in range(4) for f in ("presence", "glyph")]
    pre, _ = prepare_with_targets(model.cfg, model.tokenizer, samples, "high", [s.answer for s in samples])
    side = model.cfg.vision.tokens_per_side
    early = presence_rows(samples, pre.crops, side)
    with torch.no_grad():
        prepared = model.connect(pre, model.encode_vision(pre.pixels()))
        guide = AttentionGuide(model, pre, prepared, [None] * len(samples), layers=(2,), head=1, early=early)
        model.forward_logits(prepared, [0, 1, 2, 5], 2, on_layer=guide)
        cut = model.forward_logits(prepared, [0, 1, 2], 2)
    query = answer_positions(prepared.targets)
    rows = torch.as_tensor(early)
    want = torch.nn.functional.cross_entropy(cut[rows, query[rows]], prepared.targets[rows, query[rows] + 1])
    assert len(guide.early_terms) == 1 and not guide.terms and not guide.read_terms
    assert guide.early_value().item() == pytest.approx(want.item(), rel=1e-5)
    first = prepared.targets[rows, query[rows] + 1].tolist()
    assert set(first) <= {model.tokenizer.encode("yes")[0], model.tokenizer.encode("no")[0]}


def test_asked_colour_positions_mark_the_question_colour_word(tiny):
    samples = [make_sample(12, i, f) for i in range(5) for f in ("presence", "colour")]
    samples.append(complement(make_sample(4, 2, "presence"), "attribute"))  # "what colour is ...": no mark
    pre, _ = prepare_with_targets(tiny.cfg, tiny.tokenizer, samples, "low", [s.answer for s in samples])
    length = max(len(t) for t in pre.token_ids)
    where = asked_colour_positions(samples, pre, tiny.tokenizer, length)
    assert where.shape == (len(samples), length)
    for i, s in enumerate(samples):
        marked = where[i].nonzero().flatten().tolist()
        if s.family == "presence" and s.question.startswith("is there"):
            seq = [None] * (length - len(pre.token_ids[i])) + pre.token_ids[i]
            colour = s.question.split()[-2]
            assert len(marked) == 1 and seq[marked[0]] == tiny.tokenizer.encode(colour)[0]
        else:
            assert marked == []
    prepared = tiny.connect(pre, tiny.encode_vision(pre.pixels()))
    guide = AttentionGuide(tiny, pre, prepared, None, layers=(1,), head=0, positions=where)
    assert torch.equal(guide.targets, where[where.any(1)]) and guide.rows.sum() == 5


def test_match_positions_are_the_colour_word_on_yes_and_bos_on_no(tiny):
    samples = [make_sample(14, i, "presence") for i in range(12)] + [make_sample(14, 0, "count")]
    pre, _ = prepare_with_targets(tiny.cfg, tiny.tokenizer, samples, "high", [s.answer for s in samples])
    length = max(len(t) for t in pre.token_ids)
    rows = presence_rows(samples, pre.crops, tiny.cfg.vision.tokens_per_side)
    rows[0] = False  # a row the tier cannot check: no target
    where = match_positions(samples, pre, tiny.tokenizer, length, rows)
    colour_at = asked_colour_positions(samples, pre, tiny.tokenizer, length)
    bos = tiny.tokenizer.ids["bos"]
    assert {s.answer for s in samples[1:12]} == {"yes", "no"}
    for i, s in enumerate(samples):
        marked = where[i].nonzero().flatten().tolist()
        if not rows[i]:
            assert marked == []
        elif s.answer == "yes":
            assert torch.equal(where[i], colour_at[i])
        else:
            seq = [None] * (length - len(pre.token_ids[i])) + pre.token_ids[i]
            assert len(marked) == 1 and seq[marked[0]] == bos


def test_answer_attention_is_the_probabilities_the_layer_used(tiny, batch):
    """Rebuild the attention output of the answer position from the probabilities and the layer's
    values; it must equal what `OlmoeAttention` computed inside the real forward."""
    samples, pre = batch
    with torch.no_grad():
        prepared = tiny.connect(pre, tiny.encode_vision(pre.pixels()))
        query = answer_positions(prepared.targets)
        positions = tiny._positions(prepared.valid)
        pos_emb = tiny.llm.rotary_emb(prepared.embeds, positions)
        seen = {}
        tiny.forward_logits(prepared, [0, 1, 2, 5], 2, on_layer=lambda i, h_in, h_out: seen.setdefault(i, h_in))
        for i in (0, 2, 5):
            layer, h_in = tiny.llm.layers[i], seen[i]
            probs = answer_attention(layer, h_in, pos_emb, prepared.valid, query)
            assert probs.shape == (len(samples), tiny.cfg.llm.heads, h_in.shape[1])
            assert torch.allclose(probs.sum(-1), torch.ones(()))
            assert (probs[~prepared.valid[:, None].expand_as(probs)] == 0).all()  # padding gets nothing
            after = torch.arange(h_in.shape[1])[None] > query[:, None]
            assert (probs.permute(0, 2, 1)[after] == 0).all()  # causal
            x = layer.input_layernorm(h_in)
            v = layer.self_attn.v_proj(x).view(*x.shape[:2], -1, layer.self_attn.head_dim)  # [B, T, H, hd]
            mine = layer.self_attn.o_proj(torch.einsum("bht,bthd->bhd", probs, v).reshape(len(samples), -1))
            mask = attention_mask(prepared.valid, h_in.shape[1], h_in.dtype)
            full, _ = layer.self_attn(hidden_states=x, position_embeddings=pos_emb, attention_mask=mask, cache=None)
            assert torch.allclose(mine, full[torch.arange(len(samples)), query], atol=1e-5)


@pytest.mark.slow
def test_the_guide_loss_moves_the_head_toward_the_targets_and_only_moves_queries_and_keys(batch):
    model = build_model("tiny", seed=1)
    samples, pre = batch
    masks = guide_masks(samples, pre.crops, model.cfg.vision.tokens_per_side)
    opt = torch.optim.Adam(model.llm.layers[2].self_attn.parameters(), lr=3e-3)
    masses = []
    for _ in range(15):
        prepared = model.connect(pre, model.encode_vision(pre.pixels()))
        guide = AttentionGuide(model, pre, prepared, masks, layers=(2, 9), head=1)
        model.forward_logits(prepared, [0, 1, 2, 3], 2, on_layer=guide)  # layer 9 not run: adds no term
        assert len(guide.terms) == 1
        loss = guide.value()
        opt.zero_grad()
        loss.backward()
        attn = model.llm.layers[2].self_attn  # the loss moves where the head looks, not what it reads
        assert attn.q_proj.weight.grad.abs().sum() > 0 and attn.k_proj.weight.grad.abs().sum() > 0
        assert attn.v_proj.weight.grad is None and attn.o_proj.weight.grad is None
        opt.step()
        masses.append(guide.mass)
    assert masses[-1] > 2 * masses[0] and masses[-1] > 0.3
    with pytest.raises(ValueError, match="head"):
        AttentionGuide(model, pre, prepared, masks, layers=(2,), head=4)


def test_answer_positions_need_an_answer_in_every_row():
    targets = torch.tensor([[-100, -100, 5, 6], [-100, -100, -100, 7]])
    assert answer_positions(targets).tolist() == [1, 2]
    with pytest.raises(ValueError, match="answer"):
        answer_positions(torch.tensor([[-100, -100], [-100, 4]]))


@pytest.mark.slow
def test_train_with_the_guide_logs_its_loss_and_refuses_bad_layers(tmp_path):
    common = dict(batch_size=4, val_every=1000, val_n=5, ranking_n=3, full_steps=0, warmup=1)
    train(TrainArgs(out=tmp_path / "run", steps=2, attn_weight=0.5, attn_layers=(1, 2), **common))
    events = EventAccumulator(str(tmp_path / "run" / "tb")).Reload()
    guide = [e.value for e in events.Scalars("train/attention_guide")]
    mass = [e.value for e in events.Scalars("train/attention_mass")]
    assert len(guide) == 2 and all(np.isfinite(guide)) and all(g > 0 for g in guide)
    assert all(0 < m < 1 for m in mass)
    for bad in (
        dict(attn_layers=(16,)),
        dict(attn_head=4),
        dict(attn_weight=-1.0),
        dict(attn_families=("shape",)),
        dict(attn_families=()),
        dict(attn_presence="colour"),
        dict(read_weight=-0.5),
        dict(early_weight=-1.0),
        dict(ask_weight=-1.0),
        dict(ask_layers=(16,)),
        dict(ask_head=4),
        dict(match_weight=-1.0),
        dict(match_layers=()),
    ):
        with pytest.raises(ValueError, match="attn|read|early|ask|match"):
            train(TrainArgs(out=tmp_path / "bad", steps=1, **bad))


@pytest.mark.slow
def test_train_with_the_colour_read_logs_it(tmp_path):
    common = dict(batch_size=6, val_every=1000, val_n=5, ranking_n=3, full_steps=0, warmup=1)
    presence_heavy = dict(family_weights=(0.0, 1.0, 0.0, 0.0, 0.0), tier_weights=(0.0, 0.0, 1.0))
    run = tmp_path / "read"
    args = dict(attn_weight=0.3, attn_families=("presence",), attn_presence="shape", read_weight=0.5, early_weight=0.5)
    args |= dict(ask_weight=0.3, ask_layers=(0, 1), ask_head=2, match_weight=0.3, match_layers=(3,), match_head=1)
    args |= dict(p_full=1.0)  # every layer runs: each guide adds a term each step
    train(TrainArgs(out=run, steps=2, **args, **presence_heavy, **common))
    events = EventAccumulator(str(run / "tb")).Reload()
    read = [e.value for e in events.Scalars("train/colour_read")]
    hits = [e.value for e in events.Scalars("train/colour_read_accuracy")]
    assert len(read) == 2 and all(0 < r < 10 for r in read) and all(0 <= h <= 1 for h in hits)
    assert len(events.Scalars("train/attention_guide")) >= 1
    early = [e.value for e in events.Scalars("train/early_answer")]
    assert len(early) == 2 and all(0 < e < 20 for e in early)
    ask = [e.value for e in events.Scalars("train/ask_mass")]
    assert len(ask) == 2 and all(0 < m < 1 for m in ask)
    match = [e.value for e in events.Scalars("train/match_mass")]
    assert len(match) == 2 and all(0 < m < 1 for m in match)


def test_train_vlm_parses_the_guide_options_and_refuses_bad_ones(tmp_path, capsys):
    flags = "--attn-families presence count --attn-presence shape --read-weight 2 --ask-layers 0 1 --ask-weight 0.5"
    flags += " --early-weight 0.25 --match-layers 4 --match-head 2 --match-weight 1"
    got = parse_train_args(["--out", str(tmp_path), *flags.split()])
    assert got.ask_layers == (0, 1) and got.ask_weight == 0.5 and got.early_weight == 0.25
    assert got.match_layers == (4,) and got.match_head == 2 and got.match_weight == 1
    assert got.attn_families == ("presence", "count") and got.attn_presence == "shape" and got.read_weight == 2
    assert parse_train_args(["--out", str(tmp_path)]).attn_families == ("colour", "presence", "glyph", "count", "sum")
    for bad in (
        ["--attn-families", "shape"],
        ["--attn-presence", "colour"],
        ["--read-weight", "-1"],
        ["--ask-head", "9"],
    ):
        with pytest.raises(SystemExit):
            parse_train_args(["--out", str(tmp_path), *bad])
    capsys.readouterr()


@pytest.mark.slow
def test_attention_report_tables_each_tier_and_family_and_refuses_bad_input(vlm_dir, tmp_path, capsys):
    out = tmp_path / "attention.md"
    assert attention_report(["--model", vlm_dir, "--seed", "9", "--n", "12", "--out", str(out)]) == 0
    rows = [
        line.split("|")[1:-1] for line in out.read_text().splitlines() if line.startswith("| ") and "---" not in line
    ]
    rows = [[c.strip() for c in r] for r in rows[1:]]  # after the header
    assert {r[0] for r in rows} == {"low", "medium", "high"}
    assert {"colour", "count", "sum"} <= {r[1] for r in rows if r[0] == "low"}
    assert not any(r[1] == "glyph" and r[0] == "low" for r in rows)  # a 16 px letter is never legible there
    assert all(0 <= float(r[2]) <= 1 and 0 < float(r[4]) <= 1 and int(r[3]) > 0 for r in rows)
    for bad in (["--seed", str(SPLIT_SEEDS["train"])], ["--layer", "16"], ["--head", "9"]):
        with pytest.raises(SystemExit):
            attention_report(["--model", vlm_dir, "--n", "2", *bad])
    capsys.readouterr()
