"""UNETR-style 2D segmentation decoder for the ViT, built from MONAI's UNETR blocks.

As in MONAI ``UNETR`` and the MedCoSS downstream segmentation model, the decoder gets the image
itself (a full-resolution convolutional skip) and the hidden states of four transformer layers:
``hidden_states_out[3, 6, 9]`` counted from 0 -- the outputs of blocks **4, 7 and 10** (1-based) --
plus the encoder output after the **last** block (12 for a 12-layer ViT; see
:func:`default_layers` for other depths).  The last one is taken after the backbone's final norm,
as MONAI's ``UNETR`` does (``x`` of ``ViT.forward``); MedCoSS has no final norm, so there it is the
output of block 12 itself.  With patch size 16 the token grid is H/16 x W/16; the deepest hidden
state is upsampled x2 four times and fused with the three shallower hidden states (projected
and upsampled to H/8, H/4, H/2) and the image skip (H):

=========  =======================  ==============================
input      block                    resolution / channels
=========  =======================  ==============================
image      ``UnetrBasicBlock``      H,    F
layer l1   ``UnetrPrUpBlock`` (x8)  H/2,  2F
layer l2   ``UnetrPrUpBlock`` (x4)  H/4,  4F
layer l3   ``UnetrPrUpBlock`` (x2)  H/8,  8F
layer l4   ``UnetrUpBlock`` x4      H/8 -> H, fused with the skips
out        ``UnetOutBlock``         H,    num_classes logits
=========  =======================  ==============================

Any input whose sides are divisible by 16 works.  **Patch size 8** (DINO's ViT-S/8 and ViT-B/8, or the demo's
ViT-tiny at 64 px; MONAI ``UNETR`` supports only 16): the token grid is already H/8, so the decoder makes one x2
upsampling fewer. The same blocks are used; the deepest stage fuses at H/8 instead of upsampling into it
(``encoder4`` and ``decoder5`` with ``upsample_kernel_size=1``: a 1x1 transposed conv that projects without
changing the resolution), and ``encoder2`` / ``encoder3`` have one x2 block fewer (H/8 -> H/2, H/4). Every other
stage, width and skip is UNETR's; inputs must be divisible by 8.  The decoder is a task head: it is never a
target parameter, starts random and always trains.  Loss: ``monai.losses.DiceCELoss(
to_onehot_y=True, softmax=True)`` on the logits with integer label maps of shape (B, 1, H, W).

Patch tokens are taken as the *last* ``h * w`` tokens of each hidden state, so a class token and
prompts inserted after it (VPT: ``[cls, prompts, patches]``) are skipped.

Class token: :class:`ViTSegmenter` runs the encoder **without** it by default (``cls_token=False``), as
MedCoSS's segmentation model does (``Downstream/Dim_2/{Glas,QaTa_CoV19}/model/Unimodel.py``,
``Unified_Model.forward``: the patch tokens of ``video_embed`` go straight into ``fused_encoder``; there is
no class token), so the patch tokens attend only to each other. MONAI ``UNETR`` (``classification=False``)
has no class token either. ``cls_token=True`` keeps it in the sequence and drops it afterwards (the
former behaviour; features differ by ~0.5%).
"""

from __future__ import annotations

from typing import Sequence

import torch
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock
from torch import nn

from tpp_monai.heads.registry import HEADS


def default_layers(depth: int) -> tuple[int, int, int, int]:
    """1-based blocks read by the decoder: MONAI/MedCoSS taps ``hidden_states_out[3, 6, 9]`` + the last.

    Depth 12 -> (4, 7, 10, 12), exactly MONAI ``UNETR`` and MedCoSS; other depths scale the taps
    (``k * depth // 4 + 1`` for k = 1, 2, 3, capped at ``depth``), e.g. 24 -> (7, 13, 19, 24).
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    taps = tuple(min(depth, k * depth // 4 + 1) for k in (1, 2, 3))
    return taps + (depth,)  # type: ignore[return-value]


def tokens_to_map(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, N, D) tokens -> (B, D, h, w) map of the last ``h * w`` (patch) tokens."""
    h, w = grid
    patches = tokens[:, tokens.shape[1] - h * w:]
    return patches.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)


@HEADS.register("unetr2d")
class UNETRDecoder2D(nn.Module):
    """UNETR decoder (2D) over four ViT hidden states plus the image.

    Args:
        in_channels: image channels (the ViT's ``in_chans``).
        embed_dim: ViT width (hidden size).
        num_classes: output channels (background included).
        layers: the four 1-based ViT layers to read, shallow to deep (default (4, 7, 10, 12), MONAI UNETR).
        feature_size: UNETR base width F (MONAI default 16).
        patch_size: 16 (MONAI UNETR: four x2 upsamplings) or 8 (three; the deepest stage fuses without one).
        norm_name: MONAI norm for the conv blocks ("instance", "batch", ...).
        res_block: residual conv blocks, as in MONAI UNETR.
    """

    def __init__(
        self,
        in_channels: int = 3,
        embed_dim: int = 768,
        num_classes: int = 2,
        layers: Sequence[int] = (4, 7, 10, 12),
        feature_size: int = 16,
        patch_size: int = 16,
        norm_name: str | tuple = "instance",
        res_block: bool = True,
    ) -> None:
        super().__init__()
        if patch_size not in (8, 16):
            raise ValueError(f"UNETRDecoder2D needs patch_size 16 (MONAI UNETR) or 8, got {patch_size}")
        if len(layers) != 4:
            raise ValueError(f"UNETRDecoder2D reads exactly 4 hidden states, got layers={tuple(layers)}")
        self.layers = tuple(int(i) for i in layers)
        self.patch_size = patch_size
        self.num_classes = num_classes
        f, d, sd = feature_size, embed_dim, 2
        fewer = 16 // patch_size - 1  # x2 upsamplings that the skips and the deepest stage go without (8 px: 1)
        deep_up = 2 - fewer  # the deepest stage's upsampling: H/16 -> H/8 (2), or fusing at H/8 (1)
        self.encoder1 = UnetrBasicBlock(sd, in_channels, f, kernel_size=3, stride=1, norm_name=norm_name,
                                        res_block=res_block)
        self.encoder2 = UnetrPrUpBlock(sd, d, f * 2, num_layer=2 - fewer, kernel_size=3, stride=1, upsample_kernel_size=2,
                                       norm_name=norm_name, conv_block=True, res_block=res_block)
        self.encoder3 = UnetrPrUpBlock(sd, d, f * 4, num_layer=1 - fewer, kernel_size=3, stride=1, upsample_kernel_size=2,
                                       norm_name=norm_name, conv_block=True, res_block=res_block)
        self.encoder4 = UnetrPrUpBlock(sd, d, f * 8, num_layer=0, kernel_size=3, stride=1, upsample_kernel_size=deep_up,
                                       norm_name=norm_name, conv_block=True, res_block=res_block)
        self.decoder5 = UnetrUpBlock(sd, d, f * 8, kernel_size=3, upsample_kernel_size=deep_up, norm_name=norm_name,
                                     res_block=res_block)
        self.decoder4 = UnetrUpBlock(sd, f * 8, f * 4, kernel_size=3, upsample_kernel_size=2, norm_name=norm_name,
                                     res_block=res_block)
        self.decoder3 = UnetrUpBlock(sd, f * 4, f * 2, kernel_size=3, upsample_kernel_size=2, norm_name=norm_name,
                                     res_block=res_block)
        self.decoder2 = UnetrUpBlock(sd, f * 2, f, kernel_size=3, upsample_kernel_size=2, norm_name=norm_name,
                                     res_block=res_block)
        self.out = UnetOutBlock(sd, f, num_classes)

    def forward(self, image: torch.Tensor, hidden_states: Sequence[torch.Tensor],
                grid: tuple[int, int] | None = None) -> torch.Tensor:
        """``hidden_states``: the four (B, N, D) token tensors of ``self.layers``, shallow to deep.

        Only the last ``h * w`` tokens (the patches) of each are used: the class token and VPT prompts
        (``[cls, prompts, patches]``) never reach the decoder.
        """
        hh, ww = image.shape[-2:]
        if hh % self.patch_size or ww % self.patch_size:
            raise ValueError(f"input size {(hh, ww)} must be divisible by {self.patch_size}")
        if grid is None:
            grid = (hh // self.patch_size, ww // self.patch_size)
        z3, z6, z9, z12 = (tokens_to_map(t, grid) for t in hidden_states)
        enc1 = self.encoder1(image)
        enc2 = self.encoder2(z3)
        enc3 = self.encoder3(z6)
        enc4 = self.encoder4(z9)
        dec3 = self.decoder5(z12, enc4)
        dec2 = self.decoder4(dec3, enc3)
        dec1 = self.decoder3(dec2, enc2)
        dec0 = self.decoder2(dec1, enc1)
        return self.out(dec0)


class ViTSegmenter(nn.Module):
    """Backbone (with any PEFT target parameters) + segmentation decoder: ``forward(image) -> logits``."""

    def __init__(self, backbone: nn.Module, decoder: UNETRDecoder2D, cls_token: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.decoder = decoder
        self.cls_token = bool(cls_token)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        feats, grid = self.features(image)
        return self.decoder(image, feats, grid)

    def features(self, image: torch.Tensor) -> tuple[list[torch.Tensor], tuple[int, int]]:
        """The four token tensors fed to the decoder and the patch grid.  The deepest is the encoder
        output (final norm applied, if the backbone has one) when it is the last block, as in MONAI
        ``UNETR``."""
        layers = self.decoder.layers
        out = self.backbone.forward_features(image, return_layers=layers, cls_token=self.cls_token)
        feats = [out.hidden_states[i] for i in layers[:-1]]
        feats.append(out.tokens if layers[-1] == len(self.backbone.blocks) else out.hidden_states[layers[-1]])
        return feats, tuple(out.grid)


def build_vit_segmenter(
    backbone: nn.Module,
    num_classes: int,
    layers: Sequence[int] | None = None,
    feature_size: int = 16,
    norm_name: str | tuple = "instance",
    res_block: bool = True,
    cls_token: bool = False,
    head: str = "unetr2d",
) -> ViTSegmenter:
    """Wrap a :class:`~tpp_monai.backbones.vit.VisionTransformer` with the registered segmentation head ``head``
    (``HEADS``; default the UNETR decoder) sized from its config (``cls_token``: run the encoder with the class
    token; default False, as MedCoSS's segmentation model)."""
    cfg = backbone.cfg
    dec = HEADS.get(head)(
        in_channels=cfg.in_chans, embed_dim=cfg.embed_dim, num_classes=num_classes,
        layers=tuple(layers) if layers is not None else default_layers(cfg.depth),
        feature_size=feature_size, patch_size=cfg.patch_size, norm_name=norm_name, res_block=res_block,
    )
    return ViTSegmenter(backbone, dec, cls_token=cls_token)
