"""Training and evaluation loops shared by the zoo, fine-tuning, QAT and distillation."""

from edgeslim.train.distill import kd_loss
from edgeslim.train.loop import TrainConfig, evaluate, train_classifier

__all__ = ["TrainConfig", "evaluate", "kd_loss", "train_classifier"]
