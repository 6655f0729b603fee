"""Model presets: the shapes of each VLM and the knob values a policy may choose.

A preset is plain data (JSON-serialisable) so a saved model directory carries its own config and
a checkpoint can be checked against it before any weight is loaded.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

TIERS = ("low", "medium", "high")
LAYOUTS = ("per_tile", "molmo")
MOLMO_MAX_CROPS = {"low": 2, "medium": 6, "high": 12}  # tiers of a Molmo-layout model, by default
FIRST_KNOBBED_LAYER = 3  # layers 0-2 always run at the trained top-k


@dataclass
class VisionConfig:
    crop_size: int = 336  # pixels of one square crop (and of the global view)
    patch_size: int = 14
    width: int = 1024
    layers: int = 23
    heads: int = 16
    mlp: int = 4096
    feature_layers: tuple[int, ...] = (-2, -9)  # hidden-state indices concatenated, Molmo style
    overlap_margin: int = 4  # patches of overlap on each side of a tiled crop
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    # "per_tile": every view its own block of pooled tokens, PIL resize (the tiny model's training layout).
    # "molmo": Molmo's preprocessing - the global view, then all tiles stitched into one block with the
    # overlap margins trimmed, its padding-mask convention and its float32 antialiased resize.
    layout: str = "per_tile"

    @property
    def patches_per_side(self) -> int:
        return self.crop_size // self.patch_size

    @property
    def tokens_per_side(self) -> int:
        return self.patches_per_side // 2  # 2x2 attention pooling

    @property
    def feature_width(self) -> int:
        return self.width * len(self.feature_layers)


@dataclass
class ConnectorConfig:
    pool_heads: int = 16
    pool_head_dim: int = 64
    projector_hidden: int = 1024


@dataclass
class LLMConfig:
    vocab_size: int = 50432  # input embeddings: 50304 text + 128 extra (image markers, ...)
    output_vocab_size: int = 50304  # LM head rows
    d_model: int = 2048
    layers: int = 16
    heads: int = 16
    experts: int = 64
    top_k: int = 8  # the k the model was trained with
    expert_hidden: int = 1024
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_positions: int = 4096
    norm_topk_prob: bool = False


@dataclass
class KnobValues:
    max_crops: dict[str, int] = field(default_factory=lambda: {"low": 0, "medium": 4, "high": 12})
    top_k: tuple[int, ...] = (1, 2, 4, 6, 8)
    blocks: tuple[int, ...] = (5, 7, 9, 11, 13)


@dataclass
class VLMConfig:
    name: str
    vision: VisionConfig
    connector: ConnectorConfig
    llm: LLMConfig
    knobs: KnobValues
    max_new_tokens: int = 8
    always_start_with_space: bool = False  # Molmo's prompt: " User: {question} Assistant:"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> VLMConfig:
        def tuples(sub: dict) -> dict:
            return {k: tuple(v) if isinstance(v, list) else v for k, v in sub.items()}

        return cls(
            name=d["name"],
            vision=VisionConfig(**tuples(d["vision"])),
            connector=ConnectorConfig(**d["connector"]),
            llm=LLMConfig(**d["llm"]),
            knobs=KnobValues(**tuples(d["knobs"])),
            max_new_tokens=d.get("max_new_tokens", 8),
            always_start_with_space=d.get("always_start_with_space", False),
        )

    def knob_lists(self) -> dict[str, list]:
        return {
            "tier": list(TIERS),
            "top_k": list(self.knobs.top_k),
            "blocks": list(self.knobs.blocks),
        }

    def validate(self) -> None:
        """Fail early on a preset whose knobs cannot be applied to its shapes."""
        n_knobbed = self.llm.layers - FIRST_KNOBBED_LAYER
        if self.llm.layers <= FIRST_KNOBBED_LAYER:
            raise ValueError(f"{self.name}: the LLM needs more than {FIRST_KNOBBED_LAYER} layers")
        if max(self.knobs.top_k) != self.llm.top_k or min(self.knobs.top_k) < 1:
            raise ValueError(f"{self.name}: top_k values must lie in 1..{self.llm.top_k} and include it")
        if max(self.knobs.blocks) != n_knobbed or min(self.knobs.blocks) < 0:
            raise ValueError(f"{self.name}: blocks values must lie in 0..{n_knobbed} and include it")
        if set(self.knobs.max_crops) != set(TIERS):
            raise ValueError(f"{self.name}: max_crops must name exactly the tiers {TIERS}")
        if self.vision.patches_per_side % 2:
            raise ValueError(f"{self.name}: 2x2 pooling needs an even number of patches per side")
        if self.vision.layout not in LAYOUTS:
            raise ValueError(f"{self.name}: vision.layout must be one of {LAYOUTS}, got {self.vision.layout!r}")
        if self.vision.layout == "molmo":
            if min(self.knobs.max_crops.values()) < 1:
                raise ValueError(
                    f"{self.name}: Molmo-layout tiers are max-crops values >= 1, got {self.knobs.max_crops}"
                )
            m = self.vision.overlap_margin
            if m % 2 or self.vision.patches_per_side <= 2 * m:
                raise ValueError(f"{self.name}: the Molmo layout needs an even overlap margin below half a crop")


def molmoe_1b() -> VLMConfig:
    """MolmoE-1B's shapes (7,221,875,712 parameters) and preprocessing: Molmo's token layout and
    prompt, tiers as max-crops values."""
    return VLMConfig(
        "molmoe-1b",
        VisionConfig(layout="molmo"),
        ConnectorConfig(),
        LLMConfig(),
        KnobValues(max_crops=dict(MOLMO_MAX_CROPS)),
        always_start_with_space=True,
    )


def tiny() -> VLMConfig:
    """A MolmoE-shaped model small enough to train and serve on a 2-core CPU.

    Same depth and knob lists as MolmoE-1B (16 layers, 13 knobbed, top-8 of 32 experts) so
    policies learn on the same action space; widths are 20x smaller. 64 px crops of 8 px patches
    give 16 pooled tokens per crop.
    """
    return VLMConfig(
        name="tiny",
        vision=VisionConfig(
            crop_size=64,
            patch_size=8,
            width=96,
            layers=4,
            heads=4,
            mlp=384,
            feature_layers=(-1, -3),
            overlap_margin=1,
        ),
        connector=ConnectorConfig(pool_heads=4, pool_head_dim=24, projector_hidden=128),
        llm=LLMConfig(
            vocab_size=512,
            output_vocab_size=512,
            d_model=96,
            layers=16,
            heads=4,
            experts=32,
            top_k=8,
            expert_hidden=48,
            max_positions=1024,
        ),
        knobs=KnobValues(max_crops={"low": 0, "medium": 4, "high": 12}),
    )


PRESETS = {"tiny": tiny, "molmoe-1b": molmoe_1b}


def get_preset(name: str) -> VLMConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    cfg = PRESETS[name]()
    cfg.validate()
    return cfg
