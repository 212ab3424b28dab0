"""Distillation losses for any training stage: KD, feature and attention transfer, DCCD.

Each loss is a frozen config; :class:`DistillLoss` turns a list of them into one
``loss(outputs, target, inputs)`` for :func:`edgeslim.train.loop.train_classifier` (and the
QAT, pruning fine-tune and gate trainers built on it), running the teacher once per batch.
"""

# edgeslim.train imports kd_loss from here: load the training loop first, so whichever of
# the two packages is imported first, the other finds what it needs.
import edgeslim.train.loop  # noqa: F401

# isort: split
from edgeslim.distill.attention import AttentionTerm, attention_distance, attention_map
from edgeslim.distill.config import (
    AttentionConfig,
    DCCDConfig,
    DistillConfig,
    DistillConfigError,
    FeatureConfig,
    KDConfig,
    config_from_dict,
    config_to_dict,
)
from edgeslim.distill.dccd import VIEWS, DCCDTerm, channel_contrastive, dynamic_difference
from edgeslim.distill.feature import FeatureTerm
from edgeslim.distill.kd import (
    KDTerm,
    kd_loss,
    labels_or_teacher,
    output_match_loss,
    soft_kl,
    teacher_loss,
)
from edgeslim.distill.loss import (
    TERMS,
    DistillBatch,
    DistillLoss,
    DistillTerm,
    StudentWithAdapters,
    register_term,
)
from edgeslim.distill.taps import TapError, Taps, UnknownTapError, tap_module

__all__ = [
    "TERMS",
    "VIEWS",
    "AttentionConfig",
    "AttentionTerm",
    "DCCDConfig",
    "DCCDTerm",
    "DistillBatch",
    "DistillConfig",
    "DistillConfigError",
    "DistillLoss",
    "DistillTerm",
    "FeatureConfig",
    "FeatureTerm",
    "KDConfig",
    "KDTerm",
    "StudentWithAdapters",
    "TapError",
    "Taps",
    "UnknownTapError",
    "attention_distance",
    "attention_map",
    "channel_contrastive",
    "config_from_dict",
    "config_to_dict",
    "dynamic_difference",
    "kd_loss",
    "labels_or_teacher",
    "output_match_loss",
    "register_term",
    "soft_kl",
    "tap_module",
    "teacher_loss",
]
