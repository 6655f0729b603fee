"""A single-stage controller's light global-view encoder, distilled from the VLM's and swapped into a run's splits."""

from __future__ import annotations

from envs.assets import Assets
from envs.outcomes import dataset_samples
from policies.light_encoder import distill, encode, global_pixels, overhead_ms


def use_light_encoder(assets: Assets, seed: int = 0) -> float:
    """Distil a light global-view encoder on the train split and swap its features into the train,
    validation and test splits of `assets` (changed in place: build them for the run, not from
    `load_assets`' cache). The controller then pays the light encoder's measured time for every tier:
    the VLM cannot reuse its features. Returns the distillation's relative error."""
    train_px = global_pixels(assets.vlm, dataset_samples(assets.train.table.meta["dataset"]))
    encoder, error = distill(assets.vlm, train_px, assets.train.features.global_view, seed=seed)
    assets.train.features.global_view = encode(encoder, train_px)
    for held_out in (assets.val, assets.test):  # validation selects checkpoints on the features serving sees
        if held_out is not None:
            pixels = global_pixels(assets.vlm, dataset_samples(held_out.table.meta["dataset"]))
            held_out.features.global_view = encode(encoder, pixels)
    assets.global_ms, assets.reuse_low = overhead_ms(encoder, train_px), False
    return error
