"""Training engines: the TPP-stage trainer and its optimiser/schedules."""

from tpp_monai.engines.optim import build_optimizer, param_groups
from tpp_monai.engines.schedules import WarmupCosineSchedule, build_schedule, cosine_value, warmup_cosine_value
from tpp_monai.engines.tpp_trainer import RESUME_NAME, TARGET_NAME, TargetCheckpointHandler, TPPTrainer

__all__ = [
    "RESUME_NAME", "TARGET_NAME", "TPPTrainer", "TargetCheckpointHandler", "WarmupCosineSchedule",
    "build_optimizer", "build_schedule", "cosine_value", "param_groups", "warmup_cosine_value",
]
