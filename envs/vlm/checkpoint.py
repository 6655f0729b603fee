"""Save and load a model directory: config.json, model.safetensors, tokenizer.json, block_ranking.json.

`load_model("tiny")` loads the model shipped in the repository; a preset name that has no shipped
weights builds a randomly initialised model (good for latency, which depends on shapes only).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from envs.atomic import atomic_path, write_json
from envs.vlm.errors import CheckpointError
from envs.vlm.model import KnobVLM
from envs.vlm.presets import PRESETS, VLMConfig, get_preset
from envs.vlm.ranking import BlockRanking
from envs.vlm.tokenizer import TextTokenizer, build_word_tokenizer

CONFIG, WEIGHTS, TOKENIZER, RANKING = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "block_ranking.json",
)
EMBEDDED = Path(__file__).resolve().parent / "weights"


def build_model(
    preset: str | VLMConfig,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> KnobVLM:
    """A randomly initialised model of a preset; `device='meta'` allocates nothing."""
    cfg = get_preset(preset) if isinstance(preset, str) else preset
    torch.manual_seed(seed)
    with torch.device(device):
        model = KnobVLM(cfg, TextTokenizer(build_word_tokenizer()))
    return model.to(dtype).eval()


def save_model(model: KnobVLM, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """A model directory; each file is written atomically, the weights before the config."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(dtype or v.dtype).contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path / WEIGHTS) as tmp:
        save_file(state, str(tmp))
    write_json(path / CONFIG, model.cfg.to_dict())
    model.tokenizer.save(path / TOKENIZER)
    model.ranking.save(path / RANKING)
    return path


def check_state_dict(model: KnobVLM, state: dict[str, torch.Tensor], source: str) -> None:
    """Name every missing, unexpected or mis-shaped tensor instead of failing inside torch."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensors, e.g. {missing[:3]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors, e.g. {unexpected[:3]}")
    if wrong:
        problems.append(f"{len(wrong)} shape mismatches, e.g. {wrong[:3]}")
    if problems:
        raise CheckpointError(f"{source} does not fit preset {model.cfg.name}: " + "; ".join(problems))


def load_dir(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> KnobVLM:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"model directory not found: {path}")
    for name in (CONFIG, WEIGHTS, TOKENIZER, RANKING):
        if not (path / name).is_file():
            raise CheckpointError(f"{path} is missing {name}")
    cfg = _read_config(path)
    tokenizer = TextTokenizer.load(path / TOKENIZER)
    ranking = BlockRanking.load(path / RANKING, cfg.llm.layers)
    with torch.device("meta"):
        model = KnobVLM(cfg, tokenizer, ranking)
    state = load_file(str(path / WEIGHTS))
    check_state_dict(model, state, str(path / WEIGHTS))
    model.load_state_dict({k: v.to(dtype, copy=True) for k, v in state.items()}, assign=True)
    _rebuild_buffers(model)
    return model.to(device).eval()


def _read_config(path: Path) -> VLMConfig:
    try:
        cfg = VLMConfig.from_dict(json.loads((path / CONFIG).read_text()))
        cfg.validate()
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path / CONFIG} is not a valid model config: {e}") from None
    return cfg


def model_config(spec: str | Path) -> VLMConfig:
    """The config `load_model(spec)` would use, without building the model (knob lists of a 7B model)."""
    if str(spec) in PRESETS:
        shipped = EMBEDDED / str(spec) / CONFIG
        return _read_config(shipped.parent) if shipped.is_file() else get_preset(str(spec))
    path = Path(spec)
    if not (path / CONFIG).is_file():
        raise CheckpointError(f"{path} is not a model directory (no {CONFIG})")
    return _read_config(path)


def _rebuild_buffers(model: KnobVLM) -> None:
    """Non-persistent buffers (ViT position ids, rotary frequencies) are not stored: rebuild them."""
    emb = model.vit.embeddings
    emb.position_ids = torch.arange(emb.num_positions).expand((1, -1))
    rot = model.llm.rotary_emb
    inv_freq, _ = rot.compute_default_rope_parameters(rot.config)
    rot.inv_freq = inv_freq
    rot.original_inv_freq = inv_freq.clone()


def weights_digest(spec: str | Path) -> str:
    """A short hash of the weights `load_model(spec)` reads ("random-init" without a weights file):
    what outcome tables and cached results record, so a retrained model never meets stale ones."""
    path = (EMBEDDED / str(spec) if str(spec) in PRESETS else Path(spec)) / WEIGHTS
    if not path.is_file():
        return "random-init"
    return hashlib.sha1(path.read_bytes()).hexdigest()[:16]


def load_model(spec: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> KnobVLM:
    """A model directory, or a preset name (shipped weights if any, else random initialisation)."""
    if str(spec) in PRESETS:
        shipped = EMBEDDED / str(spec)
        if (shipped / WEIGHTS).is_file():
            return load_dir(shipped, device, dtype)
        warnings.warn(f"no trained weights ship for preset {spec!r}; using a random initialisation", stacklevel=2)
        return build_model(str(spec), device=device, dtype=dtype)
    return load_dir(spec, device, dtype)
