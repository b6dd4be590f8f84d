"""DINO pretext task for the TPP stage: self-distillation between a student (backbone + target
parameters + projection head) and its EMA teacher, over multi-crop views of 2D images.

Trainable: the student's target parameters and projection head. The teacher is an EMA copy
(``requires_grad=False``) updated in :meth:`DINOPretext.after_step` with a cosine momentum schedule
(0.996 -> 1). The teacher's frozen backbone tensors are *the same tensors* as the student's (shared,
never updated), so only target parameters and the head are averaged. Centring (EMA 0.9 of the
teacher outputs) and sharpening (student temperature 0.1, teacher 0.04 -> 0.07 over DINO's 30 warm-up
epochs). Defaults follow DINO's ``main_dino.py``: 8 local crops, head output 65536, gradient clipping at
3.0 (:attr:`DINOPretext.default_clip_grad`), last layer frozen for the first epoch; the teacher
temperature is DINO's README recipe for ViTs (``--teacher_temp 0.07 --warmup_teacher_temp_epochs 30``;
the code's own default is 0.04 without warm-up).

Hand-over: the checkpoint of the TPP stage holds the *teacher's* target parameters
(:meth:`DINOPretext.handover_backbone`). DINO evaluates and releases the teacher (its k-NN/linear
results and checkpoints are the teacher's, which is the better network of the two); the student's
target parameters stay in the resume file.

Reading the loss in TPP: the target parameters start at their (zero) init and the teacher is a copy
of the student, so the first iterations already sit near the distillation equilibrium, and the
centre starts at zero (uncentred teacher). The logged loss therefore rises over the first tens of
iterations while the centre catches up, then drifts down slowly; it is not comparable to a
supervised loss. With the teacher held fixed (``momentum_teacher=1``, ``center_momentum=1``) the
loss is stationary and falls as the target parameters and head learn (see tests/test_tpp.py).
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tpp_monai.engines.distributed import global_mean
from tpp_monai.engines.schedules import cosine_value
from tpp_monai.peft.api import get_peft
from tpp_monai.pretext.base import PretextTask
from tpp_monai.pretext.registry import PRETEXT_TASKS


class WeightNormLinear(nn.Module):
    """Bias-free Linear with ``W = g * v / ||v||`` per output row; names ``weight_g``/``weight_v`` as DINO's."""

    def __init__(self, in_dim: int, out_dim: int, freeze_norm: bool = True) -> None:
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        nn.init.trunc_normal_(self.weight_v, std=0.02)
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not freeze_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return F.linear(x, w)


class DINOHead(nn.Module):
    """MLP (``nlayers`` Linear + GELU, last to ``bottleneck``) -> L2 normalise -> weight-normed Linear."""

    def __init__(
        self, in_dim: int, out_dim: int = 4096, hidden_dim: int = 2048, bottleneck_dim: int = 256,
        nlayers: int = 3, norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
            for _ in range(nlayers - 2):
                layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, freeze_norm=norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1, p=2)
        return self.last_layer(x)


class MultiCropAugment(nn.Module):
    """DINO multi-crop (``DataAugmentationDINO``) for a batch of 2D images (B, C, H, W) with values in [0, 1].

    Two global crops (scale ``global_scale``) and ``n_local`` local crops (scale ``local_scale``), each a
    ``RandomResizedCrop`` (ratio 3/4-4/3, bicubic, as DINO's ``interpolation=Image.BICUBIC``) of the image
    as given, then horizontal flip, colour jitter (p 0.8; hue/saturation only for RGB), random grayscale
    (RGB), Gaussian blur (p 1.0 / 0.1 for the two global views, 0.5 for locals) and solarisation (second
    global view, p 0.2). ``mean``/``std`` normalise after augmentation if given.

    ``last_area_fractions`` holds, after each call, the area of every crop box as a fraction of its image:
    ``{"global": [...], "local": [...]}`` (what DINO's scale ranges bound).
    """

    def __init__(
        self, global_size: int, local_size: int, n_local: int = 8,
        global_scale: Sequence[float] = (0.4, 1.0), local_scale: Sequence[float] = (0.05, 0.4),
        mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        from torchvision.transforms import v2

        self.v2 = v2
        self.n_local = n_local
        self.global_size, self.local_size = global_size, local_size
        self.global_scale, self.local_scale = tuple(global_scale), tuple(local_scale)
        self.mean, self.std = mean, std
        self.last_area_fractions: dict[str, list[float]] = {"global": [], "local": []}

    def _crop(self, img: torch.Tensor, size: int, scale, kind: str) -> torch.Tensor:
        from torchvision.transforms import InterpolationMode, RandomResizedCrop

        top, left, h, w = RandomResizedCrop.get_params(img, list(scale), [3.0 / 4.0, 4.0 / 3.0])
        self.last_area_fractions[kind].append(h * w / float(img.shape[-2] * img.shape[-1]))
        return self.v2.functional.resized_crop(img, top, left, h, w, [size, size],
                                               interpolation=InterpolationMode.BICUBIC, antialias=True)

    def _one(self, img: torch.Tensor, size: int, scale, blur_p: float, solar_p: float, kind: str) -> torch.Tensor:
        v2 = self.v2
        rgb = img.shape[0] == 3
        jitter = v2.ColorJitter(0.4, 0.4, 0.2, 0.1) if rgb else v2.ColorJitter(0.4, 0.4)
        k = max(3, (size // 10) | 1)
        ops = [v2.RandomHorizontalFlip(), v2.RandomApply([jitter], p=0.8)]
        if rgb:
            ops.append(v2.RandomGrayscale(p=0.2))
        ops += [v2.RandomApply([v2.GaussianBlur(k, sigma=(0.1, 2.0))], p=blur_p), v2.RandomSolarize(0.5, p=solar_p)]
        out = v2.Compose(ops)(self._crop(img, size, scale, kind)).clamp(0, 1)
        if self.mean is not None and self.std is not None:
            out = v2.functional.normalize(out, list(self.mean), list(self.std))
        return out

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        self.last_area_fractions = {"global": [], "local": []}
        views: list[list[torch.Tensor]] = [[] for _ in range(2 + self.n_local)]
        for img in images:
            views[0].append(self._one(img, self.global_size, self.global_scale, 1.0, 0.0, "global"))
            views[1].append(self._one(img, self.global_size, self.global_scale, 0.1, 0.2, "global"))
            for j in range(self.n_local):
                views[2 + j].append(self._one(img, self.local_size, self.local_scale, 0.5, 0.0, "local"))
        return [torch.stack(v) for v in views]


def dino_loss(teacher_out: torch.Tensor, student_out: Sequence[torch.Tensor], center: torch.Tensor,
              teacher_temp: float, student_temp: float) -> torch.Tensor:
    """DINO's ``DINOLoss``: cross-entropy between the centred, sharpened teacher distribution of each of the two
    global views (``teacher_out`` (2B, K), the two views stacked) and the student's distribution of every *other*
    view (``student_out``: one (B, K) tensor per view, globals first), averaged over the pairs. One function for
    the ViT and the CNN (2D / 3D) tasks, so their loss maths cannot drift apart."""
    t_prob = F.softmax((teacher_out - center) / teacher_temp, dim=-1).detach().chunk(2)
    total, n = 0.0, 0
    for iq, q in enumerate(t_prob):
        for v, s in enumerate(student_out):
            if v == iq:
                continue
            total = total + torch.sum(-q * F.log_softmax(s / student_temp, dim=-1), dim=-1).mean()
            n += 1
    return total / n


def cosine_momentum(step: int, total_steps: int, base: float = 0.996, final: float = 1.0) -> float:
    """Teacher momentum: cosine from ``base`` to ``final`` (:func:`tpp_monai.engines.schedules.cosine_value`)."""
    return cosine_value(step, total_steps, base, final)


@PRETEXT_TASKS.register("dino")
class DINOPretext(PretextTask):
    """DINO self-distillation on the CLS token of the backbone with target parameters.

    ``forward(images)`` takes a batch in [0, 1] (B, C, H, W), makes the crops, and returns the loss;
    pass ``views`` (a list: 2 global then local crops) to :meth:`loss_from_views` to skip augmentation.
    """

    name = "dino"
    #: DINO's recipe (METHOD.md section 1): lr 1e-4 x batch / 256, weight decay cosine 0.04 -> 0.4, 10 warm-up
    #: epochs, betas (0.9, 0.999).
    defaults = {"lr_per_256": 1e-4, "weight_decay": 0.04, "weight_decay_end": 0.4, "warmup_epochs": 10,
                "betas": (0.9, 0.999), "min_lr": 0.0}
    #: DINO's ``--clip_grad 3.0`` (global norm of the student's gradients); the TPP trainer applies it
    #: unless it is given its own ``clip_grad`` (0 turns clipping off).
    default_clip_grad: float | None = 3.0

    def __init__(
        self, backbone: nn.Module, out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256,
        nlayers: int = 3, norm_last_layer: bool = True, n_local_crops: int = 8, global_crop_size: int | None = None,
        local_crop_size: int | None = None, global_scale: Sequence[float] = (0.4, 1.0),
        local_scale: Sequence[float] = (0.05, 0.4), student_temp: float = 0.1, teacher_temp: float = 0.07,
        warmup_teacher_temp: float = 0.04, warmup_teacher_temp_epochs: float = 30,
        teacher_temp_warmup_frac: float | None = None, freeze_last_layer: float = 1, center_momentum: float = 0.9,
        momentum_teacher: float = 0.996, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
    ) -> None:
        super().__init__(backbone)
        cfg = getattr(backbone, "cfg", None)
        if cfg is None:
            raise TypeError("DINO pretext needs a tpp_monai VisionTransformer-like backbone (cfg, embed_dim)")
        gsize = global_crop_size or cfg.img_size
        lsize = local_crop_size or max(cfg.patch_size, int(round(gsize * 96 / 224 / cfg.patch_size)) * cfg.patch_size)
        self._setup_distillation(
            backbone.embed_dim, MultiCropAugment(gsize, lsize, n_local_crops, global_scale, local_scale, mean, std),
            out_dim, hidden_dim, bottleneck_dim, nlayers, norm_last_layer, student_temp, teacher_temp,
            warmup_teacher_temp, teacher_temp_warmup_frac, center_momentum, momentum_teacher,
        )
        self.warmup_teacher_temp_epochs = float(warmup_teacher_temp_epochs)
        self.freeze_last_layer = float(freeze_last_layer)
        for p in self.head.last_layer.parameters():
            if p.requires_grad:
                p.register_hook(self._cancel_last_layer_grad)

    def _setup_distillation(
        self, feat_dim: int, augment: nn.Module, out_dim: int, hidden_dim: int, bottleneck_dim: int, nlayers: int,
        norm_last_layer: bool, student_temp: float, teacher_temp: float, warmup_teacher_temp: float,
        teacher_temp_warmup_frac: float, center_momentum: float, momentum_teacher: float,
    ) -> None:
        """Projection head, temperatures, centre and the EMA teacher (shared by the 2D and 3D tasks)."""
        backbone = self.backbone
        peft = get_peft(backbone)  # clear error if no PEFT method is applied
        self.head = DINOHead(feat_dim, out_dim, hidden_dim, bottleneck_dim, nlayers, norm_last_layer)
        self.augment = augment
        self.student_temp, self.teacher_temp, self.warmup_teacher_temp = student_temp, teacher_temp, warmup_teacher_temp
        self.teacher_temp_warmup_frac = teacher_temp_warmup_frac
        self.center_momentum, self.momentum_teacher = center_momentum, momentum_teacher
        self.register_buffer("center", torch.zeros(1, out_dim))
        self._step, self._total = 0, 1
        self._steps_per_epoch: int | None = None  # set by the trainer (set_schedule_position)
        self.warmup_teacher_temp_epochs: float | None = None  # 2D: epochs as DINO; None: teacher_temp_warmup_frac
        self.freeze_last_layer = 0.0
        self._pending_center: torch.Tensor | None = None

        # teacher: deep copy, then share the frozen backbone tensors with the student
        self.teacher_backbone = copy.deepcopy(backbone)
        self.teacher_head = copy.deepcopy(self.head)
        self._share_frozen(backbone, self.teacher_backbone, peft)
        for p in list(self.teacher_backbone.parameters()) + list(self.teacher_head.parameters()):
            p.requires_grad_(False)
        self._ema_names = [n for n, _ in backbone.named_parameters() if peft.is_target(n)]

    @staticmethod
    def _share_frozen(student: nn.Module, teacher: nn.Module, peft) -> None:
        for name, p in student.named_parameters():
            if peft.is_target(name):
                continue
            mod_name, _, attr = name.rpartition(".")
            mod = teacher.get_submodule(mod_name) if mod_name else teacher
            mod._parameters[attr] = p

    # ------------------------------------------------------------------ schedules
    def current_epoch(self) -> int | None:
        """0-based epoch of the step being taken (None when the trainer gave no epoch length)."""
        return self._step // self._steps_per_epoch if self._steps_per_epoch else None

    def current_teacher_temp(self) -> float:
        """Teacher temperature of the current step.

        With an epoch length (the TPP trainer gives it) and ``warmup_teacher_temp_epochs``: DINO's schedule,
        ``np.linspace(warmup_teacher_temp, teacher_temp, W)[epoch]`` for the first W epochs, then
        ``teacher_temp``, constant within an epoch. Otherwise (``teacher_temp_warmup_frac``, the 3D task,
        or no epoch length): linear per step over that fraction of the run (0.3 when unset)."""
        epoch = self.current_epoch()
        if self.teacher_temp_warmup_frac is None and self.warmup_teacher_temp_epochs is not None and epoch is not None:
            w = int(self.warmup_teacher_temp_epochs)
            if epoch >= w:
                return self.teacher_temp
            if w == 1:
                return self.warmup_teacher_temp
            return self.warmup_teacher_temp + (self.teacher_temp - self.warmup_teacher_temp) * epoch / (w - 1)
        frac = 0.3 if self.teacher_temp_warmup_frac is None else self.teacher_temp_warmup_frac
        warm = int(frac * self._total)
        if warm <= 0 or self._step >= warm:
            return self.teacher_temp
        return self.warmup_teacher_temp + (self.teacher_temp - self.warmup_teacher_temp) * self._step / warm

    def _cancel_last_layer_grad(self, grad: torch.Tensor) -> torch.Tensor:
        """DINO's ``cancel_gradients_last_layer``: no gradient for the head's last layer during the first
        ``freeze_last_layer`` epochs (zeroed here; the weight-normed layer's output ignores the scale that
        AdamW's decoupled weight decay then applies to ``weight_v``)."""
        epoch = self.current_epoch()
        if epoch is not None and epoch < self.freeze_last_layer:
            return torch.zeros_like(grad)
        return grad

    # ------------------------------------------------------------------ forward
    def _cls(self, backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return backbone.forward_features(x).tokens[:, 0]

    def _student(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for v in _group_by_size(views):  # views of one size go through the network together
            out.extend(self.head(self._cls(self.backbone, torch.cat(v))).chunk(len(v)))
        return out

    @torch.no_grad()
    def _teacher(self, views: list[torch.Tensor]) -> torch.Tensor:
        return self.teacher_head(self._cls(self.teacher_backbone, torch.cat(views[:2])))

    def loss_from_views(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        t_out = self._teacher(views)  # (2B, K)
        s_out = self._student(views)
        temp = self.current_teacher_temp()
        loss = dino_loss(t_out, s_out, self.center, temp, self.student_temp)
        if self.training:
            self._pending_center = global_mean(t_out.detach(), dim=0)  # over all ranks' batches, as DINO does
        return {"loss": loss, "teacher_temp": torch.tensor(temp)}

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.loss_from_views(self.augment(images))

    # ------------------------------------------------------------------ after the optimiser step
    @torch.no_grad()
    def update_center(self) -> None:
        if self._pending_center is not None:
            self.center.mul_(self.center_momentum).add_(self._pending_center * (1 - self.center_momentum))
            self._pending_center = None

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        s_params = dict(self.backbone.named_parameters())
        t_params = dict(self.teacher_backbone.named_parameters())
        pairs = [(t_params[n], s_params[n]) for n in self._ema_names]
        pairs += list(zip(self.teacher_head.parameters(), self.head.parameters()))
        for t, s in pairs:
            t.mul_(momentum).add_(s.detach() * (1 - momentum))

    def after_step(self, step: int, total_steps: int) -> None:
        """EMA teacher with the cosine momentum of ``step`` (0-based, the step just taken), then the centre."""
        self._step, self._total = step + 1, total_steps
        self.update_teacher(cosine_momentum(step, total_steps, self.momentum_teacher))
        self.update_center()

    def set_schedule_position(self, step: int, total_steps: int, steps_per_epoch: int | None = None) -> None:
        """Where training stands (for the teacher-temperature warm-up when resuming); ``steps_per_epoch``
        lets the schedules count epochs as DINO does."""
        self._step, self._total = step, total_steps
        if steps_per_epoch:
            self._steps_per_epoch = int(steps_per_epoch)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in list(self.backbone.parameters()) + list(self.head.parameters()) if p.requires_grad]

    def handover_backbone(self) -> nn.Module:
        """The EMA teacher: DINO's convention is to evaluate (and hand on) the teacher, not the student."""
        return self.teacher_backbone

    def head_state_dict(self) -> dict[str, Any]:
        """Student head, teacher head, teacher target parameters and centre (no frozen backbone copy)."""
        targets = set(self._ema_names)
        out = {}
        for k, v in self.state_dict().items():
            if k.startswith("backbone."):
                continue
            if k.startswith("teacher_backbone.") and k[len("teacher_backbone."):] not in targets:
                continue
            out[k] = v
        return out

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "out_dim": self.center.shape[1], "n_local_crops": self.augment.n_local}


def _group_by_size(views: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Consecutive views of one spatial size (2D or 3D), so each size goes through the network in one batch."""
    groups: list[list[torch.Tensor]] = []
    for v in views:
        if groups and groups[-1][0].shape[2:] == v.shape[2:]:
            groups[-1].append(v)
        else:
            groups.append([v])
    return groups
