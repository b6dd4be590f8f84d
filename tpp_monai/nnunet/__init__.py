"""nnU-Net v2 integration: STU-Net trainers with Conv-Adapter PEFT and the 3D DINO TPP stage.

nnU-Net finds the trainers through ``nnUNet_extTrainer=<this folder>`` (see :func:`trainer_path`
and ``tpp-monai nnunet-train``). Importing the trainers needs ``nnunetv2``.
"""

from __future__ import annotations

from pathlib import Path


def tpp_only_trainer_name(trainer: str) -> str:
    """The ``_TPPonly_`` trainer that runs the same TPP stage as ``trainer`` (a ``_TPP_`` trainer variant): its
    ``tpp_target_params.pt`` is what ``trainer`` reuses. Fine-tuning scope (``Dec``) does not change the TPP stage."""
    if "_TPP_" not in trainer:
        raise ValueError(f"{trainer} has no TPP stage; TPP trainers are named nnUNetTrainer_STUNet_TPP_ConvAdapter*")
    return trainer.replace("_TPP_", "_TPPonly_").replace("ConvAdapterDec", "ConvAdapter")


def trainer_path() -> str:
    """The folder to put in ``nnUNet_extTrainer``."""
    return str(Path(__file__).resolve().parent)


__all__ = ["tpp_only_trainer_name", "trainer_path"]
