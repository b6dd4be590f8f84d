"""Pretext tasks for the TPP stage (MAE, DINO, 3D DINO), one module each, one registry."""

from tpp_monai.pretext.base import PretextTask, default_lr, pretext_defaults, pretext_recipe
from tpp_monai.pretext.registry import PRETEXT_TASKS
from tpp_monai.registry import import_submodules

import_submodules(__name__, __path__)

__all__ = ["PRETEXT_TASKS", "PretextTask", "default_lr", "pretext_defaults", "pretext_recipe"]
