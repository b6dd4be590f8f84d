"""nnU-Net v2 integration: STU-Net trainers with Conv-Adapter PEFT and the 3D DINO TPP stage.

nnU-Net finds the trainers through ``nnUNet_extTrainer=<this folder>`` (see :func:`trainer_path`
and ``tpp-monai nnunet-train``). Importing the trainers needs ``nnunetv2``.
"""

from __future__ import annotations

from pathlib import Path


def trainer_path() -> str:
    """The folder to put in ``nnUNet_extTrainer``."""
    return str(Path(__file__).resolve().parent)


__all__ = ["trainer_path"]
