from .bundle_tpp import BundleTPPTrain

__all__ = ["BundleTPPTrain"]
