"""Training of the VLM: the knob-elastic trainer, its arguments, and the training aids.

    from training import TrainArgs, train
    model_dir = train(TrainArgs(out=Path("runs/my_vlm"), steps=3000))

The model package (`envs/vlm/`) is inference only; everything that exists to train it lives here.
"""

from training.aids import AIDS, LossTerm, Part
from training.args import TrainArgs
from training.trainer import train

__all__ = ["AIDS", "LossTerm", "Part", "TrainArgs", "train"]
