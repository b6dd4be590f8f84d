"""Backbones: 2D ViT (timm/MAE/DINO/MedCoSS layouts), the 2D EfficientNet-Lite0 encoder (``efficientnet``) and, in
``stunet``, the 3D STU-Net."""

from tpp_monai.backbones.registry import BACKBONES
from tpp_monai.registry import import_submodules

import_submodules(__name__, __path__)

__all__ = ["BACKBONES"]
