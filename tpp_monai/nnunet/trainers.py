"""nnU-Net v2 (2.8.1) trainers: STU-Net fine-tuning, Conv-Adapter PEFT and Conv-Adapter with a TPP stage.

Use them through ``nnUNet_extTrainer`` (``tpp-monai nnunet-train ...`` sets it), e.g.::

    tpp-monai nnunet-train 501 3d_fullres 0 -tr nnUNetTrainer_STUNet_TPP_ConvAdapter \\
        -pretrained_weights base_ep4k.model --allow-pickle

Trainers (size suffixes ``_small``/``_large``/``_huge`` exist for each; no suffix = base):

- ``nnUNetTrainer_STUNet_FT``: STU-Net, every parameter trained (STU-Net's ``_ft``: lr 1e-3);
- ``nnUNetTrainer_STUNet_ConvAdapter``: frozen STU-Net + Conv-Adapters; trains adapters + ``seg_outputs``;
- ``nnUNetTrainer_STUNet_TPP_ConvAdapter``: as above, preceded by the **TPP stage**: 3D DINO
  (``dino3d``) on patches of the fold's training cases (nnU-Net's training data loader), adapters +
  projection head trained, backbone frozen. The target parameters are saved atomically to
  ``<output_folder>/tpp_target_params.pt`` and the nnU-Net checkpoints record the stage in
  ``init_args["tpp_stage"]``, so ``--c`` never redoes it;
- ``*_debug``: tiny budgets for tests and demos (small STU-Net, 1 epoch of 2 iterations, 2 TPP iterations).

``-pretrained_weights`` loads STU-Net checkpoints with :func:`load_stunet_checkpoint` (``seg_outputs``
skipped, first conv repeated for more input channels, adapters not expected, any other missing /
unexpected / mis-shaped key is an error). The official ``*_ep4k.model`` files are pickles: set
``TPP_NNUNET_ALLOW_PICKLE=1`` (``--allow-pickle`` of the CLI) for files you trust.

Environment variables (read when the trainer is created; class attributes give the defaults):
``TPP_NNUNET_TPP_ITERS`` (TPP iterations, default 2500 = 10 nnU-Net epochs), ``TPP_NNUNET_TPP_LR`` (5e-4),
``TPP_NNUNET_NUM_EPOCHS`` (1000), ``TPP_NNUNET_ITERS_PER_EPOCH`` (250), ``TPP_NNUNET_VAL_ITERS`` (50),
``TPP_NNUNET_LR`` (1e-3), ``TPP_NNUNET_ALLOW_PICKLE`` (0), ``TPP_NNUNET_TPP_ONLY`` (0).

**TPP-only runs.** With ``TPP_NNUNET_TPP_ONLY=1`` the TPP trainers stop right after the TPP stage (exit code 0):
``<output_folder>/tpp_target_params.pt`` is written, no nnU-Net checkpoint and no validation. Running the same
command again without the variable (same trainer, fold and ``-pretrained_weights``) loads that file instead of
redoing the stage (it is reused only if its backbone fingerprint matches) and fine-tunes. Single-process
training only (not with ``-num_gpus`` > 1).
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from os.path import isfile, join

import torch
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from torch import nn

from tpp_monai.backbones.stunet import STUNet, load_stunet_checkpoint
from tpp_monai.checkpoint import CheckpointMismatch, load_target_checkpoint, read_target_checkpoint, save_target_checkpoint
from tpp_monai.engines.schedules import warmup_cosine_value
from tpp_monai.peft.api import apply_peft, get_peft

TPP_FILE = "tpp_target_params.pt"
TPP_RECORD = "tpp_stage"


def _env(name: str, default, cast=float):
    v = os.environ.get(name)
    return default if v in (None, "") else cast(v)


def _unwrap(network: nn.Module) -> nn.Module:
    mod = getattr(network, "module", network)  # DDP
    return getattr(mod, "_orig_mod", mod)  # torch.compile


def tpp_only_from_env() -> bool:
    return str(os.environ.get("TPP_NNUNET_TPP_ONLY", "0")).lower() in ("1", "true", "yes")


def allow_pickle_from_env() -> bool:
    return str(os.environ.get("TPP_NNUNET_ALLOW_PICKLE", "0")).lower() in ("1", "true", "yes")


def load_pretrained_stunet(network: nn.Module, fname: str, verbose: bool = False) -> dict:
    """nnU-Net's ``-pretrained_weights`` for STU-Net networks (see the module docstring)."""
    report = load_stunet_checkpoint(fname, _unwrap(network), allow_pickle=allow_pickle_from_env(), strict=True)
    print(f"[tpp-monai] loaded {len(report['loaded'])} STU-Net tensors from {fname}; "
          f"skipped {len(report['skipped'])} (seg_outputs)")
    if verbose:
        for k in report["loaded"]:
            print("  ", k)
    return report


def install_pretrained_loader() -> None:
    """Route nnU-Net's ``load_pretrained_weights`` to :func:`load_pretrained_stunet` for STU-Net networks
    (other networks keep nnU-Net's loader). Idempotent."""
    import nnunetv2.run.run_training as rt

    if getattr(rt.load_pretrained_weights, "_tpp_monai", False):
        return
    original = rt.load_pretrained_weights

    def load_pretrained_weights(network, fname, verbose=False):
        if isinstance(_unwrap(network), STUNet):
            return load_pretrained_stunet(network, fname, verbose)
        return original(network, fname, verbose)

    load_pretrained_weights._tpp_monai = True
    rt.load_pretrained_weights = load_pretrained_weights


def frozen_fingerprint(net: nn.Module) -> str:
    """SHA-256 of the frozen STU-Net tensors (no target parameters, no ``seg_outputs``)."""
    peft = getattr(net, "tpp_peft", None)
    h = hashlib.sha256()
    for name, t in sorted(list(net.named_parameters()) + list(net.named_buffers()), key=lambda kv: kv[0]):
        if name.startswith("seg_outputs") or (peft is not None and peft.is_target(name)):
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class nnUNetTrainer_STUNet_FT(nnUNetTrainer):
    """STU-Net from the plans, every parameter trained, lr 1e-3 (STU-Net ``_ft``)."""

    stunet_size: str = "base"
    peft_method: str | None = None
    peft_config: dict = {}
    default_lr: float = 1e-3
    default_num_epochs: int = 1000
    default_iters_per_epoch: int = 250
    default_val_iters: int = 50

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = _env("TPP_NNUNET_LR", self.default_lr)
        self.num_epochs = _env("TPP_NNUNET_NUM_EPOCHS", self.default_num_epochs, int)
        self.num_iterations_per_epoch = _env("TPP_NNUNET_ITERS_PER_EPOCH", self.default_iters_per_epoch, int)
        self.num_val_iterations_per_epoch = _env("TPP_NNUNET_VAL_ITERS", self.default_val_iters, int)

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        """Same network at training and inference: STU-Net of ``stunet_size`` + the PEFT method (if any).
        Trainable afterwards: target parameters + ``seg_outputs`` (everything without PEFT)."""
        net = STUNet.from_plans(configuration_manager, num_input_channels, num_output_channels, size=cls.stunet_size,
                                enable_deep_supervision=enable_deep_supervision)
        if cls.peft_method:
            apply_peft(net, cls.peft_method, dict(cls.peft_config))
            for p in net.seg_outputs.parameters():
                p.requires_grad_(True)
        return net

    def initialize(self):
        install_pretrained_loader()  # before nnU-Net's maybe_load_checkpoint calls load_pretrained_weights
        super().initialize()
        net = _unwrap(self.network)
        n_train = sum(p.numel() for p in net.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in net.parameters())
        self.print_to_log_file(f"STU-Net-{self.stunet_size} PEFT={self.peft_method}: trainable {n_train:,} / "
                               f"{n_all:,} parameters ({100.0 * n_train / n_all:.3f}%)")

    def configure_optimizers(self):
        params = [p for p in self.network.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, self.initial_lr, weight_decay=self.weight_decay, momentum=0.99,
                                    nesterov=True)
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)

    def plot_network_architecture(self):  # hiddenlayer tracing is slow and pointless here
        pass


class nnUNetTrainer_STUNet_ConvAdapter(nnUNetTrainer_STUNet_FT):
    """Frozen STU-Net + Conv-Adapters (zero-init, parallel to every residual block); trains adapters + seg_outputs."""

    peft_method = "conv_adapter"
    peft_config = {"reduction": 4}


class nnUNetTrainer_STUNet_TPP_ConvAdapter(nnUNetTrainer_STUNet_ConvAdapter):
    """Conv-Adapter PEFT preceded by a 3D DINO TPP stage on the fold's training cases."""

    default_tpp_iters: int = 2500
    default_tpp_lr: float = 5e-4
    tpp_weight_decay: float = 0.04
    tpp_warmup_frac: float = 0.1
    tpp_n_local_crops: int = 4
    tpp_head: dict = {"out_dim": 4096, "hidden_dim": 1024, "bottleneck_dim": 256}

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.tpp_iters = _env("TPP_NNUNET_TPP_ITERS", self.default_tpp_iters, int)
        self.tpp_lr = _env("TPP_NNUNET_TPP_LR", self.default_tpp_lr)
        self.tpp_only = tpp_only_from_env()

    def on_train_start(self):
        super().on_train_start()
        self.run_tpp_stage()
        if self.tpp_only:
            self.stop_after_tpp()

    def stop_after_tpp(self) -> None:
        """``TPP_NNUNET_TPP_ONLY=1``: shut the data loaders down and leave the process (exit code 0)."""
        from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
        from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter

        for dl in (self.dataloader_train, self.dataloader_val):
            if isinstance(dl, (NonDetMultiThreadedAugmenter, MultiThreadedAugmenter)):
                dl._finish()
        self.print_to_log_file(f"TPP_NNUNET_TPP_ONLY=1: stopping after the TPP stage; run the same command without "
                               f"it to fine-tune from {join(self.output_folder, TPP_FILE)}")
        raise SystemExit(0)

    # ------------------------------------------------------------------ TPP stage
    def _crop_sizes(self) -> tuple[list[int], list[int]]:
        patch = [int(p) for p in self.configuration_manager.patch_size]
        net = _unwrap(self.network)
        total = [math.prod(s[d] for s in net.cfg.strides) for d in range(len(patch))]
        local = [min(p, max(p // 2, 2 * t)) for p, t in zip(patch, total)]
        return patch, local

    def run_tpp_stage(self) -> None:
        net = _unwrap(self.network)
        path = join(self.output_folder, TPP_FILE)
        record = self.my_init_kwargs.get(TPP_RECORD)
        if record and record.get("done"):
            self.print_to_log_file(f"TPP stage already done ({record.get('iterations')} iterations, {path}); skipping")
            return
        fp = frozen_fingerprint(net)
        if isfile(path):  # TPP finished but no nnU-Net checkpoint yet: reuse it if it fits this backbone
            try:
                meta = read_target_checkpoint(path).get("meta", {})
                if meta.get("stunet_fingerprint") == fp:
                    load_target_checkpoint(path, net, check_fingerprint=False)
                    self.my_init_kwargs[TPP_RECORD] = {**meta, "done": True}
                    self.print_to_log_file(f"Loaded TPP target parameters from {path}; skipping the TPP stage")
                    return
                self.print_to_log_file(f"{path} belongs to another backbone; redoing the TPP stage")
            except (CheckpointMismatch, RuntimeError) as e:
                self.print_to_log_file(f"Cannot reuse {path} ({e}); redoing the TPP stage")

        from tpp_monai.pretext.dino3d import DINO3DPretext

        gsize, lsize = self._crop_sizes()
        seg = list(net.seg_outputs.parameters())
        for p in seg:
            p.requires_grad_(False)
        task = DINO3DPretext(net, global_size=gsize, local_size=lsize, n_local_crops=self.tpp_n_local_crops,
                             spatial_dims=len(gsize), **self.tpp_head).to(self.device)
        params = task.trainable_parameters()
        opt = torch.optim.AdamW(params, lr=self.tpp_lr, weight_decay=self.tpp_weight_decay)
        iters = max(int(self.tpp_iters), 0)
        warm = int(self.tpp_warmup_frac * iters)
        self.print_to_log_file(f"TPP stage: 3D DINO, {iters} iterations, lr {self.tpp_lr}, crops {gsize}/{lsize}, "
                               f"{sum(p.numel() for p in params):,} trainable parameters (targets + projector)")
        task.train()
        t0, losses = time.time(), []
        for it in range(iters):
            lr = warmup_cosine_value(it, iters, self.tpp_lr, warm)
            for g in opt.param_groups:
                g["lr"] = lr
            data = next(self.dataloader_train)["data"]
            data = torch.as_tensor(data).to(self.device, non_blocking=True)
            out = task(data)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            torch.nn.utils.clip_grad_norm_(params, 3.0)
            opt.step()
            task.after_step(it, iters)
            losses.append(float(out["loss"].detach()))
            if it % 50 == 0 or it == iters - 1:
                self.print_to_log_file(f"TPP iteration {it + 1}/{iters}: loss {losses[-1]:.4f} lr {lr:.2e}")
        for p in seg:
            p.requires_grad_(True)
        meta = {"pretext": "dino3d", "iterations": iters, "final_loss": losses[-1] if losses else None,
                "seconds": round(time.time() - t0, 1), "stunet_size": self.stunet_size, "fold": self.fold,
                "stunet_fingerprint": fp, "peft": get_peft(net).describe()}
        if self.local_rank == 0:
            save_target_checkpoint(path, net, meta=meta)
        self.my_init_kwargs[TPP_RECORD] = {**{k: v for k, v in meta.items() if k != "peft"}, "done": True}
        del task, opt
        self.print_to_log_file(f"TPP stage done in {meta['seconds']} s; target parameters saved to {path}")


class _Debug:
    """Tiny budgets: small STU-Net, 1 epoch of 2 iterations, 1 validation iteration, 2 TPP iterations, no mirroring."""

    stunet_size = "small"
    default_num_epochs = 1
    default_iters_per_epoch = 2
    default_val_iters = 1
    default_tpp_iters = 2
    tpp_n_local_crops = 2
    tpp_head = {"out_dim": 256, "hidden_dim": 128, "bottleneck_dim": 64}

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        """No mirroring (augmentation and test-time), so validation/prediction stay fast on CPU."""
        rot, dummy_2d, initial_patch_size, _ = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        self.inference_allowed_mirroring_axes = None
        return rot, dummy_2d, initial_patch_size, None


class nnUNetTrainer_STUNet_FT_debug(_Debug, nnUNetTrainer_STUNet_FT):
    pass


class nnUNetTrainer_STUNet_ConvAdapter_debug(_Debug, nnUNetTrainer_STUNet_ConvAdapter):
    pass


class nnUNetTrainer_STUNet_TPP_ConvAdapter_debug(_Debug, nnUNetTrainer_STUNet_TPP_ConvAdapter):
    pass


# size variants: nnUNetTrainer_STUNet_<FT|ConvAdapter|TPP_ConvAdapter>_<small|large|huge>
for _base in (nnUNetTrainer_STUNet_FT, nnUNetTrainer_STUNet_ConvAdapter, nnUNetTrainer_STUNet_TPP_ConvAdapter):
    for _size in ("small", "large", "huge"):
        _name = f"{_base.__name__}_{_size}"
        globals()[_name] = type(_name, (_base,), {"stunet_size": _size, "__module__": __name__,
                                                   "__doc__": f"{_base.__doc__} (STU-Net-{_size})"})
del _base, _size, _name

__all__ = [n for n in list(globals()) if n.startswith("nnUNetTrainer_")] + [
    "install_pretrained_loader", "load_pretrained_stunet", "tpp_only_from_env", "frozen_fingerprint", "TPP_FILE", "TPP_RECORD"]
