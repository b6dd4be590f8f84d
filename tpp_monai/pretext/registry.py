"""The one registry of pretext tasks: ``PRETEXT_TASKS.get("mae")`` gives the task class."""

from tpp_monai.registry import Registry

PRETEXT_TASKS: Registry = Registry("pretext task")
