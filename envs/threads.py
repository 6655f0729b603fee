"""CPU thread counts that hold up on a busy machine.

The project's models are small and run one request at a time: torch's default (one thread per core)
gains little on an idle machine and, when other processes load the cores, its threads wait on each
other and a run slows many times over; so do numpy's BLAS threads (OpenBLAS starts one per core, set
here through threadpoolctl). Every script therefore sets one thread unless told otherwise
(`--threads N`; `KNOB_RL_THREADS` for library use), and a server times requests with the thread count
its latency profile was measured with, so predicted and served latencies share a clock.
"""

from __future__ import annotations

import argparse
import os

import torch
from threadpoolctl import threadpool_limits

DEFAULT = 1
_LIMITS: list = []  # the BLAS limits in force (kept referenced for the process's life)


def default_threads() -> int:
    """`KNOB_RL_THREADS` if set, else one thread."""
    value = os.environ.get("KNOB_RL_THREADS")
    if value is None:
        return DEFAULT
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"KNOB_RL_THREADS must be a positive integer, got {value!r}")
    return int(value)


def use_threads(n: int | None = None) -> int:
    """Set torch's intra-op threads (and, before any parallel work, inter-op threads) and the BLAS libraries'
    threads (numpy's OpenBLAS) to `n` (default `default_threads()`); returns the count set."""
    n = default_threads() if n is None else n
    if n < 1:
        raise ValueError(f"threads must be at least 1, got {n}")
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(n)
    except RuntimeError:  # only settable before the first parallel work; intra-op threads are what matter here
        pass
    _LIMITS[:] = [threadpool_limits(limits=n, user_api="blas")]
    return n


def thread_count(text: str) -> int:
    """A `--threads` value: a positive integer (else a usage error naming the value)."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def add_threads_flag(parser: argparse.ArgumentParser) -> argparse.Action:
    """Add the `--threads` option every script shares (default None: `use_threads` picks); returns its action."""
    return parser.add_argument("--threads", type=thread_count, default=None, metavar="N",
                               help=f"torch CPU threads (default {DEFAULT}, or $KNOB_RL_THREADS): one holds up when "
                                    "other processes load the cores; more help only training or a large model, on an "
                                    "idle machine")  # fmt: skip
