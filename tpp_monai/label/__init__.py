"""Annotation-server support (MONAI Label app in ``apps/tpp_label``): model file, I/O, TPP + PEFT training."""

from tpp_monai.label.seg2d import (
    MODEL_FORMAT,
    ImageReadError,
    Seg2DConfig,
    build_model,
    load_model,
    parse_labels,
    predict,
    read_image_2d,
    read_model_file,
    save_model,
    train_tpp_peft,
    write_mask_2d,
)

__all__ = [
    "MODEL_FORMAT", "ImageReadError", "Seg2DConfig", "build_model", "load_model", "parse_labels", "predict",
    "read_image_2d", "read_model_file", "save_model", "train_tpp_peft", "write_mask_2d",
]
