"""PEFT methods (one module each, one registry) and the API to insert, save and load target parameters."""

from tpp_monai.peft.api import (
    ParameterReport,
    TargetParameterMismatch,
    apply_peft,
    backbone_fingerprint,
    check_target_state_dict,
    count_parameters,
    get_peft,
    load_target_state_dict,
    merge_peft,
    parameter_report,
    target_parameter_names,
    target_parameters,
    target_state_dict,
)
from tpp_monai.peft.base import TARGET_PREFIX, PeftConfig, PeftMethod
from tpp_monai.peft.registry import PEFT_METHODS, methods_for
from tpp_monai.registry import import_submodules

import_submodules(__name__, __path__)

__all__ = [
    "PEFT_METHODS", "methods_for", "PeftConfig", "PeftMethod", "TARGET_PREFIX", "ParameterReport", "TargetParameterMismatch",
    "apply_peft", "backbone_fingerprint", "check_target_state_dict", "count_parameters", "get_peft", "load_target_state_dict", "merge_peft",
    "parameter_report", "target_parameter_names", "target_parameters", "target_state_dict",
]
