"""The one registry of PEFT methods: ``PEFT_METHODS.get("adapter")`` gives the method class."""

from __future__ import annotations

from tpp_monai.registry import Registry

PEFT_METHODS: Registry = Registry("PEFT method")


def methods_for(backbone: str, tpp: bool | None = None) -> list[str]:
    """Registered method names that apply to a backbone family ("vit" or "cnn"), optionally only those
    the TPP stage can pre-train (``tpp=True``)."""
    out = []
    for name in PEFT_METHODS.names():
        cls = PEFT_METHODS.get(name)
        if backbone in cls.applies_to and (tpp is None or cls.tpp_supported == tpp):
            out.append(name)
    return out
