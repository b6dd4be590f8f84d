"""Registry of backbone factories (``BACKBONES.get("vit")(size="tiny")``)."""

from tpp_monai.registry import Registry

BACKBONES: Registry = Registry("backbone")
