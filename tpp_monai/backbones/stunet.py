"""STU-Net (Huang et al., "STU-Net: Scalable and Transferable Medical Image Segmentation Models"),
state-dict compatible with the official ``{small,base,large,huge}_ep4k.model`` checkpoints.

Layout (module names as in the official v2 trainer, so the official keys load unchanged):

- ``conv_blocks_context[d]``: ``nn.Sequential`` of :class:`BasicResBlock`; the first block of every
  stage has a 1x1 ``conv3`` shortcut (strided by the stage's stride, also for stage 0 whose stride is 1);
- ``upsample_layers[u]``: nearest interpolation by the stride, then a 1x1 ``conv``;
- ``conv_blocks_localization[u]``: residual blocks on ``cat(upsampled, skip)``;
- ``seg_outputs[u]``: 1x1 conv per decoder stage (deep supervision, highest resolution first).

Sizes: widths ``base x [1, 2, 4, 8, 16, 16]`` with base S 16 / B 32 / L 64 / H 96 and
1 / 1 / 2 / 3 residual blocks per stage. The official models use 3x3x3 kernels everywhere and
the nnU-Net plan's ``pool_op_kernel_sizes[1:]`` (cut/padded with stride 1 to 5 stages) as strides.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from tpp_monai.backbones.registry import BACKBONES

logger = logging.getLogger("tpp_monai.stunet")

STUNET_SIZES: dict[str, tuple[int, int]] = {"small": (16, 1), "base": (32, 1), "large": (64, 2), "huge": (96, 3)}
WIDTH_MULT = (1, 2, 4, 8, 16, 16)
SKIP_ON_FINETUNE = ("seg_outputs",)


def _ops(spatial_dims: int):
    if spatial_dims == 3:
        return nn.Conv3d, nn.InstanceNorm3d
    if spatial_dims == 2:
        return nn.Conv2d, nn.InstanceNorm2d
    raise ValueError(f"STU-Net supports spatial_dims 2 or 3, got {spatial_dims}")


def _tuple(v: int | Sequence[int], n: int) -> tuple[int, ...]:
    return tuple(int(x) for x in v) if isinstance(v, (list, tuple)) else (int(v),) * n


class BasicResBlock(nn.Module):
    """conv1-norm1-act1-conv2-norm2 (+ shortcut, 1x1 ``conv3`` if given) -> act2. InstanceNorm affine."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: Sequence[int] | int = 3,
        stride: Sequence[int] | int = 1, use_1x1conv: bool = False, spatial_dims: int = 3,
    ) -> None:
        super().__init__()
        conv, norm = _ops(spatial_dims)
        k = _tuple(kernel_size, spatial_dims)
        pad = tuple(i // 2 for i in k)
        s = _tuple(stride, spatial_dims)
        self.conv1 = conv(in_channels, out_channels, k, stride=s, padding=pad)
        self.norm1 = norm(out_channels, affine=True)
        self.act1 = nn.LeakyReLU(inplace=True)
        self.conv2 = conv(out_channels, out_channels, k, padding=pad)
        self.norm2 = norm(out_channels, affine=True)
        self.act2 = nn.LeakyReLU(inplace=True)
        self.conv3 = conv(in_channels, out_channels, 1, stride=s) if use_1x1conv else None
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act1(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        y = y + (self.conv3(x) if self.conv3 is not None else x)
        return self.act2(y)


class UpsampleNearest(nn.Module):
    """Nearest interpolation by ``scale`` then a 1x1 conv (official ``Upsample_Layer_nearest``)."""

    def __init__(self, in_channels: int, out_channels: int, scale: Sequence[int], spatial_dims: int = 3) -> None:
        super().__init__()
        conv, _ = _ops(spatial_dims)
        self.conv = conv(in_channels, out_channels, kernel_size=1)
        self.scale = tuple(float(s) for s in scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(s != 1 for s in self.scale):
            x = nn.functional.interpolate(x, scale_factor=self.scale, mode="nearest")
        return self.conv(x)


class _DeepSupervisionFlag(nn.Module):
    """Parameter-free holder of ``deep_supervision`` (nnU-Net toggles ``network.decoder.deep_supervision``)."""

    def __init__(self, enabled: bool) -> None:
        super().__init__()
        self.deep_supervision = enabled


@dataclass
class STUNetConfig:
    in_channels: int
    num_classes: int
    dims: tuple[int, ...]
    depth: tuple[int, ...]
    strides: tuple[tuple[int, ...], ...]
    kernel_sizes: tuple[tuple[int, ...], ...]
    spatial_dims: int = 3
    size: str | None = None


class STUNet(nn.Module):
    """STU-Net; ``forward`` returns the full-resolution logits, or with deep supervision the tuple of
    logits of every decoder stage, highest resolution first (as nnU-Net expects)."""

    def __init__(
        self, in_channels: int, num_classes: int, size: str | None = "base", dims: Sequence[int] | None = None,
        depth: Sequence[int] | None = None, strides: Sequence[Sequence[int] | int] | None = None,
        kernel_sizes: Sequence[Sequence[int] | int] | None = None, spatial_dims: int = 3,
        enable_deep_supervision: bool = True,
    ) -> None:
        super().__init__()
        if dims is None or depth is None:
            if size not in STUNET_SIZES:
                raise ValueError(f"Unknown STU-Net size {size!r}; choose one of {sorted(STUNET_SIZES)} or give dims+depth")
            base, blocks = STUNET_SIZES[size]
            dims = dims or [base * m for m in WIDTH_MULT]
            depth = depth or [blocks] * len(dims)
        n_stages = len(dims)
        if len(depth) != n_stages:
            raise ValueError(f"depth has {len(depth)} entries, dims {n_stages}")
        strides = [_tuple(s, spatial_dims) for s in (strides or [2] * (n_stages - 1))]
        if len(strides) != n_stages - 1:
            raise ValueError(f"STU-Net with {n_stages} stages needs {n_stages - 1} strides, got {len(strides)}")
        kernel_sizes = [_tuple(k, spatial_dims) for k in (kernel_sizes or [3] * n_stages)]
        if len(kernel_sizes) != n_stages:
            raise ValueError(f"STU-Net with {n_stages} stages needs {n_stages} kernel sizes, got {len(kernel_sizes)}")
        self.cfg = STUNetConfig(in_channels, num_classes, tuple(dims), tuple(depth), tuple(strides),
                                tuple(kernel_sizes), spatial_dims, size)
        conv, _ = _ops(spatial_dims)
        self.decoder = _DeepSupervisionFlag(enable_deep_supervision)

        def stage(cin: int, cout: int, k, s, n: int) -> nn.Sequential:
            blocks = [BasicResBlock(cin, cout, k, s, use_1x1conv=True, spatial_dims=spatial_dims)]
            blocks += [BasicResBlock(cout, cout, k, 1, spatial_dims=spatial_dims) for _ in range(n - 1)]
            return nn.Sequential(*blocks)

        self.conv_blocks_context = nn.ModuleList([stage(in_channels, dims[0], kernel_sizes[0], 1, depth[0])])
        for d in range(1, n_stages):
            self.conv_blocks_context.append(stage(dims[d - 1], dims[d], kernel_sizes[d], strides[d - 1], depth[d]))
        self.upsample_layers = nn.ModuleList()
        self.conv_blocks_localization = nn.ModuleList()
        self.seg_outputs = nn.ModuleList()
        for u in range(n_stages - 1):
            lo, hi = n_stages - 1 - u, n_stages - 2 - u  # from stage lo up to stage hi
            self.upsample_layers.append(UpsampleNearest(dims[lo], dims[hi], strides[hi], spatial_dims))
            self.conv_blocks_localization.append(stage(dims[hi] * 2, dims[hi], kernel_sizes[hi], 1, depth[hi]))
            self.seg_outputs.append(conv(dims[hi], num_classes, kernel_size=1))

    # ------------------------------------------------------------------ nnU-Net glue
    @classmethod
    def from_plans(
        cls, configuration_manager: Any, num_input_channels: int, num_output_channels: int, size: str = "base",
        enable_deep_supervision: bool = True, use_plan_kernels: bool = False, n_stages: int = 6,
    ) -> "STUNet":
        """Build from an nnU-Net ``ConfigurationManager`` (or a dict with ``pool_op_kernel_sizes``).

        Strides are ``pool_op_kernel_sizes[1:]`` cut or padded with stride 1 to ``n_stages - 1``; kernels are
        3 everywhere as in the official models (``use_plan_kernels=True`` takes ``conv_kernel_sizes`` instead,
        which breaks compatibility with the official weights when the plan has anisotropic kernels).
        """
        get = (lambda k: configuration_manager[k]) if isinstance(configuration_manager, dict) else (
            lambda k: getattr(configuration_manager, k))
        pools = [list(p) for p in get("pool_op_kernel_sizes")]
        nd = len(pools[0])
        strides = pools[1:][: n_stages - 1]
        strides += [[1] * nd] * (n_stages - 1 - len(strides))
        if use_plan_kernels:
            kernels = [list(k) for k in get("conv_kernel_sizes")][:n_stages]
            kernels += [kernels[-1]] * (n_stages - len(kernels))
        else:
            kernels = [[3] * nd] * n_stages
        base, blocks = STUNET_SIZES[size]
        return cls(num_input_channels, num_output_channels, size=size, dims=[base * m for m in WIDTH_MULT][:n_stages],
                   depth=[blocks] * n_stages, strides=strides, kernel_sizes=kernels, spatial_dims=nd,
                   enable_deep_supervision=enable_deep_supervision)

    # ------------------------------------------------------------------ forward
    def forward_encoder(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Outputs of every context stage (the last one is the bottleneck)."""
        feats = []
        for blk in self.conv_blocks_context:
            x = blk(x)
            feats.append(x)
        return feats

    def forward_decoder(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """Outputs of every decoder stage (lowest resolution first), i.e. what ``seg_outputs`` sees."""
        x, skips = feats[-1], feats[:-1]
        outs = []
        for u in range(len(self.conv_blocks_localization)):
            x = self.upsample_layers[u](x)
            x = self.conv_blocks_localization[u](torch.cat((x, skips[-(u + 1)]), dim=1))
            outs.append(x)
        return outs

    @property
    def total_stride(self) -> tuple[int, ...]:
        """Per-axis product of the strides: inputs through the whole network must be multiples of it."""
        return tuple(int(math.prod(s[d] for s in self.cfg.strides)) for d in range(self.cfg.spatial_dims))

    def forward(self, x: torch.Tensor):
        outs = [seg(f) for seg, f in zip(self.seg_outputs, self.forward_decoder(self.forward_encoder(x)))]
        if self.decoder.deep_supervision:
            return tuple(outs[::-1])
        return outs[-1]

    def residual_blocks(self) -> list[BasicResBlock]:
        """Every residual block (encoder then decoder), for CNN PEFT methods (Conv-Adapter)."""
        return [m for m in self.modules() if isinstance(m, BasicResBlock)]

    @property
    def encoder_dim(self) -> int:
        return self.cfg.dims[-1]


@BACKBONES.register("stunet")
def build_stunet(size: str = "base", in_channels: int = 1, num_classes: int = 2, **kwargs: Any) -> STUNet:
    return STUNet(in_channels, num_classes, size=size, **kwargs)


# ---------------------------------------------------------------------- checkpoint loading
class STUNetCheckpointMismatch(ValueError):
    """An STU-Net checkpoint does not fit the model (names the missing/unexpected/mis-shaped keys)."""


def _preview(names: Sequence[str], k: int = 8) -> str:
    names = list(names)
    return ", ".join(names[:k]) + (f", ... (+{len(names) - k})" if len(names) > k else "")


def _adapt_input_channels(w: torch.Tensor, n: int, mode: str) -> torch.Tensor:
    if w.shape[1] == n:
        return w
    if w.shape[1] != 1:
        raise STUNetCheckpointMismatch(
            f"cannot adapt a first conv with {w.shape[1]} input channels to {n} (only 1 -> n is supported)")
    w = w.repeat(1, n, *([1] * (w.ndim - 2)))
    return w / n if mode == "average" else w


def load_stunet_checkpoint(
    path_or_state: Any, model: nn.Module, allow_pickle: bool = False, skip: Sequence[str] = SKIP_ON_FINETUNE,
    input_channels_mode: str = "repeat", strict: bool = True, ignore_prefix: str = "peft_",
) -> dict[str, list[str]]:
    """Load an official STU-Net checkpoint (``network_weights`` or ``state_dict``) into ``model``.

    - keys containing any of ``skip`` (default ``seg_outputs``: fine-tuning gets a fresh head) are not loaded;
    - the first conv (``conv_blocks_context.0.0.conv1``/``conv3``) of a 1-channel checkpoint is repeated for
      models with more input channels (``input_channels_mode="repeat"`` as STU-Net does, or ``"average"``:
      repeated and divided by the channel count, so a channel-replicated input gives the same output);
    - the model's PEFT tensors (names with a part starting with ``ignore_prefix``) are not expected;
    - with ``strict`` any other missing, unexpected or mis-shaped key raises
      :class:`STUNetCheckpointMismatch` naming them; ``strict=False`` loads the rest and reports them.

    The official ``.model`` files are pickles (numpy scalars in their metadata): they load only with
    ``allow_pickle=True`` (only for files you trust). Returns ``{"loaded", "skipped", "missing",
    "unexpected", "mismatched"}`` (lists of names).
    """
    from tpp_monai.safe_io import safe_load

    if input_channels_mode not in ("repeat", "average"):
        raise ValueError("input_channels_mode must be 'repeat' or 'average'")
    obj = path_or_state if isinstance(path_or_state, dict) else safe_load(path_or_state, allow_pickle=allow_pickle)
    state = obj
    for key in ("network_weights", "state_dict", "model"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            state = obj[key]
            break
    state = {(k[7:] if k.startswith("module.") else k).replace("_orig_mod.", ""): v for k, v in state.items()}
    mod = getattr(model, "_orig_mod", getattr(model, "module", model))
    own = mod.state_dict()

    def skipped(k: str) -> bool:
        return any(s in k for s in skip)

    def peft(k: str) -> bool:
        return any(p.startswith(ignore_prefix) for p in k.split("."))

    for first in ("conv_blocks_context.0.0.conv1.weight", "conv_blocks_context.0.0.conv3.weight"):
        if first in state and first in own and tuple(state[first].shape) != tuple(own[first].shape):
            state[first] = _adapt_input_channels(torch.as_tensor(state[first]), own[first].shape[1], input_channels_mode)
    wanted = [k for k in own if not skipped(k) and not peft(k)]
    missing = sorted(k for k in wanted if k not in state)
    unexpected = sorted(k for k in state if k not in own and not skipped(k))
    mismatched = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in wanted if k in state and tuple(state[k].shape) != tuple(own[k].shape))
    report = {"missing": missing, "unexpected": unexpected, "mismatched": mismatched,
              "skipped": sorted(k for k in state if skipped(k))}
    if strict and (missing or unexpected or mismatched):
        parts = [f"{n} {len(v)}: {_preview(v)}" for n, v in
                 (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)) if v]
        raise STUNetCheckpointMismatch(
            "STU-Net checkpoint does not fit this model (" + "; ".join(parts) + "). Build the model with the "
            "checkpoint's size (small/base/large/huge) or pass strict=False to load the matching part.")
    bad = {m.split(":")[0] for m in mismatched}
    load = {k: torch.as_tensor(state[k]) for k in wanted if k in state and k not in bad}
    with torch.no_grad():
        for k, v in load.items():
            own[k].copy_(v.to(own[k].dtype))
    report["loaded"] = sorted(load)
    for name in ("missing", "unexpected", "mismatched"):
        if report[name]:
            logger.warning("STU-Net checkpoint: %s %d: %s", name, len(report[name]), _preview(report[name]))
    return report
