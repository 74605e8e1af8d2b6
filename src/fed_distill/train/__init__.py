"""Training: one supervised ``fit()`` for any classifier, evaluation, distillation losses."""

from fed_distill.train.fit import FitResult, TrainConfig, evaluate, fit, predict_logits
from fed_distill.train.student_config import StudentConfig

__all__ = ["FitResult", "StudentConfig", "TrainConfig", "evaluate", "fit", "predict_logits"]
