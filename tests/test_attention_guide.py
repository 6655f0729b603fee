"""Guided attention: which objects a question is about, where their tokens sit, and the head's loss."""

import dataclasses

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from envs.tasks.synthvqa import SMALL_SIZE, SPLIT_SEEDS, SynthVQA, asked_objects, complement, make_sample
from envs.vlm.attention_guide import AttentionGuide, answer_attention, answer_positions, guide_masks, target_positions
from envs.vlm.checkpoint import build_model
from envs.vlm.staged import attention_mask
from envs.vlm.train import TrainArgs, prepare_with_targets, train
from scripts.attention_report import main as attention_report


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


def test_train_with_the_guide_logs_its_loss_and_refuses_bad_layers(tmp_path):
    common = dict(batch_size=4, val_every=1000, val_n=5, ranking_n=3, full_steps=0, warmup=1)
    train(TrainArgs(out=tmp_path / "run", steps=2, attn_weight=0.5, attn_layers=(1, 2), **common))
    events = EventAccumulator(str(tmp_path / "run" / "tb")).Reload()
    guide = [e.value for e in events.Scalars("train/attention_guide")]
    mass = [e.value for e in events.Scalars("train/attention_mass")]
    assert len(guide) == 2 and all(np.isfinite(guide)) and all(g > 0 for g in guide)
    assert all(0 < m < 1 for m in mass)
    for bad in (dict(attn_layers=(16,)), dict(attn_head=4), dict(attn_weight=-1.0)):
        with pytest.raises(ValueError, match="attn"):
            train(TrainArgs(out=tmp_path / "bad", steps=1, **bad))


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
