"""Training and evaluation loops shared by the zoo, fine-tuning, QAT and distillation."""

from edgeslim.train.loop import TrainConfig, evaluate, train_classifier

__all__ = ["TrainConfig", "evaluate", "train_classifier"]
