"""tpp-monai: Target Parameter Pre-training (TPP) for medical image analysis with MONAI and nnU-Net."""

__version__ = "0.2.0"
