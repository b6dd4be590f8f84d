"""Task heads: classification head, UNETR-style segmentation decoder."""

from tpp_monai.heads.registry import HEADS
from tpp_monai.registry import import_submodules

import_submodules(__name__, __path__)

__all__ = ["HEADS"]
