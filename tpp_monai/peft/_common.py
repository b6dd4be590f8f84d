"""Small pieces shared by PEFT method modules."""

from __future__ import annotations

from torch import nn


def vit_blocks(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a ViT-like backbone (``model.blocks``), or a clear error."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or not hasattr(model, "embed_dim"):
        raise TypeError(
            f"{type(model).__name__} is not a ViT backbone (needs .blocks ModuleList and .embed_dim); "
            "this PEFT method only applies to tpp_monai.backbones.VisionTransformer-like models."
        )
    return blocks


class Bottleneck(nn.Module):
    """down -> activation -> up, with ``up`` zero-initialised so the branch starts as a no-op."""

    def __init__(self, dim: int, hidden: int, act: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.down = nn.Linear(dim, hidden)
        self.act = act()
        self.up = nn.Linear(hidden, dim)
        nn.init.kaiming_uniform_(self.down.weight, a=5 ** 0.5)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x):
        return self.up(self.act(self.down(x)))
