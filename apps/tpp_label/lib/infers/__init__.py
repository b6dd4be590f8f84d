from .bundle_seg import BundleSegInfer, untrained_message
from .stunet3d import STUNet3DInfer

__all__ = ["BundleSegInfer", "STUNet3DInfer", "untrained_message"]
