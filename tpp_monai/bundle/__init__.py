"""Factories and handlers used by the MONAI bundles in ``bundles/`` (JSON wires them by ``_target_`` / ``$``)."""

from tpp_monai.bundle.data import (
    BundleDataError, epochs_for_iterations, inference_inputs, load_datalist,
)
from tpp_monai.bundle.inferers import FlipTTAInferer
from tpp_monai.bundle.handlers import (
    AtomicCheckpointSaver, CheckedCheckpointLoader, EvaluationFigures, GradClipHandler, JsonlLogger, LearningCurves,
    NonFiniteModelError, OutputFolderLock, PredictionWriter, SegmentationMetric, StopOnNonFiniteLoss, save_metrics_json,
)
from tpp_monai.bundle.networks import (
    TPPCheckpointMissing, build_backbone, build_classifier, build_cnn_backbone, build_cnn_classifier,
    build_cnn_segmenter, build_peft_backbone, build_peft_cnn_backbone, build_segmenter,
    load_target_params, log_trainable, poly_lr, read_backbone_checkpoint, trainable_report,
)
from tpp_monai.bundle.resume import FineTuneResume
from tpp_monai.engines.optim import build_optimizer  # the one optimiser builder, wired by the bundles' JSON
from tpp_monai.bundle.root import BundleRootError, resolve_bundle_root
from tpp_monai.bundle.saving import SaveMaskd
from tpp_monai.bundle.tpp_stage import (
    build_pretext, build_tpp_optimizer, build_tpp_trainer, save_mae_checkpoint,
)

__all__ = [
    "AtomicCheckpointSaver", "BundleDataError", "BundleRootError", "FineTuneResume", "CheckedCheckpointLoader", "EvaluationFigures", "FlipTTAInferer",
    "GradClipHandler", "JsonlLogger", "LearningCurves", "NonFiniteModelError", "OutputFolderLock", "PredictionWriter", "SaveMaskd", "SegmentationMetric",
    "StopOnNonFiniteLoss", "TPPCheckpointMissing",
    "build_backbone", "build_classifier", "build_cnn_backbone", "build_cnn_classifier", "build_cnn_segmenter",
    "build_optimizer", "build_peft_cnn_backbone", "build_peft_backbone", "build_pretext",
    "build_segmenter", "build_tpp_optimizer", "build_tpp_trainer", "epochs_for_iterations", "inference_inputs",
    "load_datalist", "load_target_params", "log_trainable", "poly_lr", "read_backbone_checkpoint",
    "resolve_bundle_root", "save_mae_checkpoint", "save_metrics_json", "trainable_report",
]
