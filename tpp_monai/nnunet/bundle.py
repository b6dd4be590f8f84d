"""MONAI-bundle face of the 3D (nnU-Net) bundles: a ``network_def`` MONAI's tools can build and run.

``network_def`` is the network the nnU-Net trainer builds (same ``build_network_architecture``, so the same
module names and PEFT wiring), from bundle keys instead of an nnU-Net plan: STU-Net of ``stunet_size`` with the
default Conv-Adapter, ``in_channels`` / ``num_classes``, and strides derived from ``patch_size`` the way nnU-Net
plans them for isotropic patches (halve an axis while its feature map stays >= 4 voxels, at most 5 times), so
``python -m monai.bundle verify_net_in_out network_def`` works with metadata's declared shapes.

Why not ``monai.apps.nnunet`` here (monai 1.6.1): ``get_network_from_nnunet_plans`` builds nnU-Net's own
architecture classes from a plan, and ``ModelnnUNetWrapper`` looks the trainer up only inside ``nnunetv2``
(not ``nnUNet_extTrainer``), calls ``build_network_architecture`` with the pre-2.4 argument list, and puts the
predictor on ``cuda:0``; none of that fits our trainers, so we reuse the trainer's own builder.
"""

from __future__ import annotations

from typing import Sequence

from torch import nn

CONV_ADAPTER_TRAINER = "nnUNetTrainer_STUNet_ConvAdapter"


def pool_op_kernel_sizes_for_patch(patch_size: Sequence[int], n_stages: int = 6,
                                   min_feature_map: int = 4) -> list[list[int]]:
    """nnU-Net-style ``pool_op_kernel_sizes`` (first entry all 1) for ``patch_size``: each of the ``n_stages - 1``
    downsamplings halves an axis while it is even and its result stays >= ``min_feature_map``."""
    size = [int(p) for p in patch_size]
    if not size or any(p < 1 for p in size):
        raise ValueError(f"patch_size must be positive integers, got {list(patch_size)}")
    pools = [[1] * len(size)]
    for _ in range(n_stages - 1):
        s = [2 if (p % 2 == 0 and p // 2 >= min_feature_map) else 1 for p in size]
        size = [p // k for p, k in zip(size, s)]
        pools.append(s)
    return pools


def trainer_class(name: str) -> type:
    """A tpp-monai nnU-Net trainer class by name (``tpp_monai.nnunet.trainers``)."""
    from tpp_monai.nnunet import trainers

    cls = getattr(trainers, name, None)
    if not isinstance(cls, type):
        raise ValueError(f"unknown trainer {name!r}; the STU-Net trainers are listed in docs/stunet_tpp.md")
    return cls


def stunet_convadapter_network(stunet_size: str = "base", in_channels: int = 1, num_classes: int = 3,
                               patch_size: Sequence[int] = (128, 128, 128), deep_supervision: bool = False,
                               trainer: str | None = None) -> nn.Module:
    """The bundle's ``network_def``: what ``trainer`` (default ``nnUNetTrainer_STUNet_ConvAdapter`` of
    ``stunet_size``) builds for a plan whose pooling follows ``patch_size``. Inputs must be multiples of the
    network's ``total_stride`` (32 per axis for a 128^3 patch)."""
    name = trainer or (CONV_ADAPTER_TRAINER if stunet_size == "base" else f"{CONV_ADAPTER_TRAINER}_{stunet_size}")
    cls = trainer_class(name)
    if cls.stunet_size != stunet_size:
        raise ValueError(f"trainer {name} builds STU-Net-{cls.stunet_size}, not the requested {stunet_size}; "
                         f"set stunet_size to {cls.stunet_size!r} or pick the _{stunet_size} trainer variant")
    plan = {"pool_op_kernel_sizes": pool_op_kernel_sizes_for_patch(patch_size)}
    return cls.build_network_architecture(None, plan, int(in_channels), int(num_classes), bool(deep_supervision))


__all__ = ["pool_op_kernel_sizes_for_patch", "stunet_convadapter_network", "trainer_class"]
