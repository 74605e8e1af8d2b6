"""Training: one supervised ``fit()`` for any classifier, evaluation, distillation losses."""

from fed_distill.train.fit import FitResult, TrainConfig, evaluate, fit, predict_logits

__all__ = ["FitResult", "TrainConfig", "evaluate", "fit", "predict_logits"]
