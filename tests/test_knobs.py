"""Each knob must change what is computed and what it costs; stages must compose exactly."""

import pytest
import torch

from envs.vlm.presets import FIRST_KNOBBED_LAYER
from envs.vlm.ranking import BlockRanking


def test_full_knobs_staged_equals_plain_forward(tiny, images, questions):
    prepared = tiny.prepare(images[:1], questions[:1], "medium")
    gen = tiny.finish(tiny.prefix(prepared), top_k=8, blocks=13, max_new_tokens=1)
    with torch.no_grad():
        plain = tiny.llm(inputs_embeds=prepared.embeds).last_hidden_state  # OlmoeModel.forward, norm included
        plain_logits = tiny.lm_head(plain[:, -1])
    assert gen.layers_run == list(range(16))
    torch.testing.assert_close(gen.step_logits[0], plain_logits, atol=1e-5, rtol=1e-5)


def test_vision_tokens_grow_with_tier(tiny, images, questions):
    prepared = {t: tiny.prepare(images[:1], questions[:1], t) for t in ("low", "medium", "high")}
    tokens = [prepared[t].vision_tokens[0] for t in ("low", "medium", "high")]
    crops = [prepared[t].n_crops[0] for t in ("low", "medium", "high")]
    assert tokens[0] < tokens[1] < tokens[2]
    assert crops[0] == 1 and 1 < crops[1] <= 5 and crops[1] < crops[2] <= 13
    assert tokens == [16 * c for c in crops]  # 4x4 pooled tokens per 64 px crop
    # different tiers give different first-token logits
    gens = {t: tiny.finish(tiny.prefix(p), 8, 13, max_new_tokens=1) for t, p in prepared.items()}
    assert not torch.allclose(gens["low"].step_logits[0], gens["high"].step_logits[0])


@pytest.mark.parametrize("blocks", [5, 7, 9, 11, 13])
def test_layers_run_follow_the_ranking(tiny, images, questions, blocks):
    order = [14, 3, 9, 5, 12, 7, 4, 15, 10, 6, 13, 8, 11]
    saved, tiny.ranking = tiny.ranking, BlockRanking("test", order, {i: -n for n, i in enumerate(order)})
    ran = []
    hooks = [
        layer.self_attn.register_forward_hook(lambda m, a, kw, o, i=i: ran.append(i), with_kwargs=True)
        for i, layer in enumerate(tiny.llm.layers)
    ]
    try:
        gen = tiny.answer(images[:1], questions[:1], "low", 8, blocks, max_new_tokens=1)
    finally:
        tiny.ranking = saved
        for h in hooks:
            h.remove()
    assert len(gen.layers_run) == FIRST_KNOBBED_LAYER + blocks
    assert gen.layers_run == [0, 1, 2] + sorted(order[:blocks])
    assert ran == gen.layers_run  # exactly those attention modules ran, in that order


def test_expert_calls_proportional_to_top_k(tiny, images, questions):
    prepared = tiny.prepare(images[:1], questions[:1], "low")
    n = prepared.prompt_tokens[0]
    state = tiny.prefix(prepared)
    by_k = {k: tiny.finish(state, k, 13, max_new_tokens=1) for k in (1, 2, 4, 6, 8)}
    for k, gen in by_k.items():
        assert gen.expert_calls_by_layer[3:] == [n * k] * 13
        assert gen.expert_calls_by_layer[:3] == [n * 8] * 3  # layers 0-2 ran at the trained k, once
        assert gen.expert_calls[0] == n * (3 * 8 + 13 * k)
    assert not torch.allclose(by_k[1].step_logits[0], by_k[8].step_logits[0], atol=1e-3)
    assert not torch.allclose(by_k[4].step_logits[0], by_k[8].step_logits[0], atol=1e-3)


def test_expert_calls_count_decode_tokens(tiny, images, questions):
    gen = tiny.answer(images[:1], questions[:1], "low", 2, 5, max_new_tokens=4)
    n = tiny.prepare(images[:1], questions[:1], "low").prompt_tokens[0]
    per_token = 3 * 8 + 5 * 2
    produced = len(gen.token_ids[0])
    # every produced token is fed back once, except the last one when the length limit stops decoding
    assert gen.decode_steps[0] == (produced if produced < 4 else 3)
    assert gen.expert_calls[0] == (n + gen.decode_steps[0]) * per_token


def test_layers_0_to_2_run_once_per_request_in_two_stage_flow(tiny, images, questions):
    prompt_calls = {i: 0 for i in range(16)}
    prepared = tiny.prepare(images[:1], questions[:1], "medium")
    t = prepared.embeds.shape[1]

    def count(i):
        def hook(module, args, kwargs, out):
            if kwargs["hidden_states"].shape[1] == t:
                prompt_calls[i] += 1

        return hook

    hooks = [
        layer.self_attn.register_forward_hook(count(i), with_kwargs=True) for i, layer in enumerate(tiny.llm.layers)
    ]
    try:
        state = tiny.prefix(prepared)
        for k, b in [(8, 13), (2, 7), (1, 5)]:
            tiny.finish(state, k, b, max_new_tokens=3)
    finally:
        for h in hooks:
            h.remove()
    assert [prompt_calls[i] for i in range(3)] == [1, 1, 1]
    # knobbed layers do run per finish: layer 3 is in every config, layer 15 only in the full one
    assert prompt_calls[3] == 3 and prompt_calls[15] == 1


def test_two_stage_equals_one_call(tiny, images, questions):
    one = tiny.answer(images[:1], questions[:1], "medium", 4, 9, max_new_tokens=3)
    state = tiny.prefix(tiny.prepare(images[:1], questions[:1], "medium"))
    tiny.finish(state, 8, 13, max_new_tokens=3)  # another config on the same prefix must not disturb it
    two = tiny.finish(state, 4, 9, max_new_tokens=3)
    assert one.token_ids == two.token_ids and one.expert_calls == two.expert_calls
    for a, b in zip(one.step_logits, two.step_logits, strict=True):
        assert torch.equal(a, b)


def test_no_leak_between_calls(tiny, images, questions):
    first = tiny.answer(images[:1], questions[:1], "high", 2, 5, max_new_tokens=2)
    tiny.answer(images[1:2], questions[1:2], "low", 8, 13, max_new_tokens=2)
    again = tiny.answer(images[:1], questions[:1], "high", 2, 5, max_new_tokens=2)
    assert torch.equal(first.step_logits[0], again.step_logits[0])
    assert all(layer.mlp.gate.top_k == 8 for layer in tiny.llm.layers)  # shared modules untouched


@pytest.mark.parametrize("tier,top_k,blocks", [("low", 8, 13), ("high", 2, 7)])
def test_batched_equals_one_by_one(tiny, images, questions, tier, top_k, blocks):
    batch = tiny.answer(images, questions, tier, top_k, blocks, max_new_tokens=3)
    for i in range(len(images)):
        single = tiny.answer(images[i : i + 1], questions[i : i + 1], tier, top_k, blocks, max_new_tokens=3)
        assert batch.token_ids[i] == single.token_ids[0]
        assert batch.expert_calls[i] == single.expert_calls[0]
        torch.testing.assert_close(batch.step_logits[0][i], single.step_logits[0][0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("tokens, top_k", [(1, 8), (1, 1), (3, 4)])
def test_gathered_experts_equal_the_expert_loop(tiny, tokens, top_k):
    """The few-token MoE path computes what `OlmoeExperts` computes, for any top-k."""
    from envs.vlm.staged import moe_forward

    mlp = tiny.llm.layers[4].mlp
    x = torch.randn(1, tokens, tiny.cfg.llm.d_model, generator=torch.Generator().manual_seed(tokens), dtype=tiny.dtype)
    with torch.no_grad():
        loop, gathered = moe_forward(mlp, x, top_k), moe_forward(mlp, x, top_k, gathered=True)
    assert gathered.shape == x.shape
    torch.testing.assert_close(gathered, loop, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(moe_forward(mlp, x, top_k % 8 + 1, gathered=True), gathered)  # top-k matters


def test_side_token_rides_the_prefix_without_a_trace(tiny, images, questions):
    """A side token in the layers 0-2 pass: the prompt's states, cache and answers are unchanged, and its
    own state equals running it after the prompt with only the positions it may see."""
    prepared = tiny.prepare(images[:2], questions[:2], "medium")
    b, t = prepared.valid.shape
    token = torch.randn(b, tiny.cfg.llm.d_model, generator=torch.Generator().manual_seed(0))
    sees = prepared.valid.clone()
    sees[:, : t // 2] = False
    plain, ridden = tiny.prefix(prepared), tiny.prefix(prepared, side_token=token, side_sees=sees)
    torch.testing.assert_close(ridden.hidden, plain.hidden)
    for i in range(3):
        torch.testing.assert_close(ridden.cache.layers[i][0], plain.cache.layers[i][0])
    a, b_ = tiny.finish(plain, 4, 9, max_new_tokens=2), tiny.finish(ridden, 4, 9, max_new_tokens=2)
    assert a.token_ids == b_.token_ids
    torch.testing.assert_close(b_.step_logits[0], a.step_logits[0])
    # its state: one token through layers 0-2 against the prompt's cached keys/values at the seen positions
    from envs.vlm.staged import one_token_layer

    h, position = token, prepared.valid.sum(1, keepdim=True)
    cos, sin = tiny.llm.rotary_emb(h[:, None], position)
    with torch.no_grad():
        for i in range(FIRST_KNOBBED_LAYER):
            k, v = plain.cache.layers[i]
            mask = torch.zeros(b, t + 1).masked_fill(~torch.cat([sees, torch.ones(b, 1, dtype=torch.bool)], 1), -1e30)
            h = one_token_layer(tiny.llm.layers[i], h, cos[:, 0], sin[:, 0], k, v, mask, 8)
    torch.testing.assert_close(ridden.side_state, h, atol=1e-5, rtol=1e-5)
    seeing_all = tiny.prefix(prepared, side_token=token)
    assert not torch.allclose(seeing_all.side_state, ridden.side_state)  # what it sees matters
