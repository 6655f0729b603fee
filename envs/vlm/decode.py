"""What the plain and the fast decoding paths share: the generation record and the greedy step."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Generation:
    answers: list[str]
    token_ids: list[list[int]]  # generated ids per request, <eos> excluded
    layers_run: list[int]
    top_k: int
    blocks: int
    expert_calls: list[int]  # per request, whole LLM (layers 0-2 too), prefill and decode
    expert_calls_by_layer: list[int]  # summed over the batch, per LLM layer
    step_logits: list[torch.Tensor] = field(repr=False)  # [B, V] per generated position
    decode_steps: list[int] = field(default_factory=list)  # forward passes after prefill, per request


def greedy_step(tokens, generated, done, eos, ignore_eos, max_new, decode_steps, per_request, calls) -> bool:
    """Take each unfinished request's next token (or its end); count the decode step the rest need.

    Returns True when every request is done. Shared by the plain and the fast path so both stop,
    count steps and count expert calls the same way.
    """
    for i, tok in enumerate(tokens):
        if done[i]:
            continue
        if tok == eos and not ignore_eos:
            done[i] = True
            continue
        generated[i].append(tok)
        done[i] = len(generated[i]) >= max_new
    if all(done):
        return True
    for i, finished in enumerate(done):
        if not finished:
            decode_steps[i] += 1
            per_request[i] += calls
    return False
