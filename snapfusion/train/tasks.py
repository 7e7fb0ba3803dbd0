"""The base model's training stages, each a ``Task`` for the one loop (train/loop.py), in one import.

Each stage combines the shared pieces: its data (train/data.py), its noise and timestep sampling (train/noise.py)
and its loss (snapfusion/losses.py). The stages themselves live in train/autoencoder.py, train/text.py and
train/unet.py; step distillation, robust training and decoder distillation build on the same pieces.
"""

from snapfusion.train.autoencoder import (AutoencoderTask, AutoencoderTaskConfig, latent_scaling_factor,
                                          load_initial_autoencoder)
from snapfusion.train.text import ContrastivePair, TextTask, TextTaskConfig
from snapfusion.train.unet import UNetTask, UNetTaskConfig, require_known_prediction

__all__ = ["AutoencoderTask", "AutoencoderTaskConfig", "ContrastivePair", "TextTask", "TextTaskConfig", "UNetTask",
           "UNetTaskConfig", "latent_scaling_factor", "load_initial_autoencoder", "require_known_prediction"]
