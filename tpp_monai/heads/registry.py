"""Registry of task heads (``HEADS.get("unetr2d")``)."""

from tpp_monai.registry import Registry

HEADS: Registry = Registry("head")
