"""The one registry of PEFT methods: ``PEFT_METHODS.get("adapter")`` gives the method class."""

from tpp_monai.registry import Registry

PEFT_METHODS: Registry = Registry("PEFT method")
