"""Training: the one loop (:func:`fit`) every stage reuses, and pretraining on token shards (:func:`pretrain`).

    from lmstack.train import TrainConfig, LossOutput, FitResult, fit, pretrain, PretrainConfig

See ``lmstack/train/loop.py`` for the ``fit`` contract and docs/pretrain.md for the user guide.
"""

from lmstack.train.config import DataSection, ModelSection, PretrainConfig, TrainConfig
from lmstack.train.loop import BatchSource, FitResult, LossOutput, TrainingDiverged, evaluate, fit
from lmstack.train.losses import causal_lm_loss
from lmstack.train.metrics import MetricsLogger
from lmstack.train.pretraining import pretrain


__all__ = [
    "TrainConfig", "PretrainConfig", "ModelSection", "DataSection", "fit", "FitResult", "LossOutput",
    "BatchSource", "TrainingDiverged", "evaluate", "causal_lm_loss", "MetricsLogger", "pretrain",
]
