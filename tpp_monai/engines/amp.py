"""Mixed precision of the TPP stage and of fine-tuning: which autocast dtype, and when a GradScaler.

Why: on CUDA, autocast halves the activation memory and speeds up the frozen backbone's matmuls;
bfloat16 (Ampere and later) has float32's range and needs no loss scaling, float16 does. Autocast
only changes the dtype of computations, never the stored tensors, so the frozen backbone stays
bit-identical (tested). Default (``amp=None`` / ``True``): on for CUDA, off for CPU; ``"bf16"`` /
``"fp16"`` force a dtype on any device (CPU bf16 autocast is what the tests use).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

_NAMES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def resolve_amp(amp: bool | str | None, device: torch.device | str) -> torch.dtype | None:
    """Autocast dtype for ``amp`` on ``device``; None means full precision.

    ``None``/``True``/``"auto"``: bfloat16 on CUDA when supported, else float16; nothing on CPU.
    ``False``/``"off"``: nothing. ``"bf16"``/``"fp16"``: that dtype on any device.
    """
    device = torch.device(device)
    if amp is False or (isinstance(amp, str) and amp.lower() in ("off", "false", "none", "fp32")):
        return None
    if amp is None or amp is True or (isinstance(amp, str) and amp.lower() == "auto"):
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if isinstance(amp, str) and amp.lower() in _NAMES:
        return _NAMES[amp.lower()]
    raise ValueError(f"amp must be True/False/None, 'auto', 'bf16' or 'fp16'; got {amp!r}")


def autocast(device: torch.device | str, dtype: torch.dtype | None) -> AbstractContextManager:
    """``torch.autocast`` for ``dtype`` on ``device``, or a no-op for full precision."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def grad_scaler(device: torch.device | str, dtype: torch.dtype | None) -> torch.amp.GradScaler | None:
    """A GradScaler for float16 (whose range underflows small gradients); None for bf16/fp32."""
    if dtype != torch.float16:
        return None
    return torch.amp.GradScaler(torch.device(device).type)


def autocast_kwargs() -> dict:
    """``amp_kwargs`` for MONAI's SupervisedTrainer/Evaluator (CUDA autocast): bfloat16 where supported."""
    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return {"dtype": torch.bfloat16 if bf16 else torch.float16}
