"""nnU-Net v2 (2.8.1) trainers: STU-Net fine-tuning, Conv-Adapter PEFT and Conv-Adapter with a 3D DINO TPP stage.

Use them through ``nnUNet_extTrainer`` (``tpp-monai nnunet-train ...`` sets it), e.g.::

    tpp-monai nnunet-train 501 3d_fullres 0 -tr nnUNetTrainer_STUNet_TPP_ConvAdapter \\
        -pretrained_weights base_ep4k.model --allow-pickle

Every setting is part of the trainer's class name (nnU-Net's convention for trainer variants), so the results
folder ``<trainer>__<plans>__<configuration>`` identifies the run:

- ``nnUNetTrainer_STUNet_FT``: STU-Net, every parameter trained, lr 1e-3 (STU-Net's ``_ft``);
- ``nnUNetTrainer_STUNet_ConvAdapter``: frozen STU-Net + Conv-Adapters (original design, ``conv_adapter``);
  trains adapters + ``seg_outputs`` (the default, see "What fine-tuning trains");
- ``nnUNetTrainer_STUNet_ConvAdapterDec``: adapters + STU-Net's pre-trained decoder (``upsample_layers``,
  ``conv_blocks_localization``) + ``seg_outputs``;
- ``nnUNetTrainer_STUNet_TPP_ConvAdapter`` / ``..._TPP_ConvAdapterDec``: the same, preceded by the TPP stage;
- ``nnUNetTrainer_STUNet_TPPonly_ConvAdapter``: only the TPP stage (writes ``tpp_target_params.pt`` into its own
  folder, no nnU-Net checkpoint, exit code 0). A ``_TPP_`` trainer first looks for its own
  ``tpp_target_params.pt``, then for the one of its ``_TPPonly_`` twin (same dataset, plans, configuration, fold);
  it reuses a file only if its frozen-backbone fingerprint and TPP settings equal its own, copying it into its
  folder; otherwise it runs the stage itself;
- suffixes: ``_small`` / ``_large`` / ``_huge`` (STU-Net size; none = base), ``_debug`` (tiny budgets for tests);
- STU-Net's published names resolve to equivalents: ``STUNetTrainer_<size>`` (every parameter, lr 1e-2, as
  STU-Net trains from scratch) and ``STUNetTrainer_<size>_ft`` (= ``nnUNetTrainer_STUNet_FT_<size>``, lr 1e-3).

**TPP stage** (:meth:`nnUNetTrainer_STUNet_TPP_ConvAdapter.run_tpp_stage`; one method, so a DDP wrapper can
wrap it): 3D DINO (``dino3d``, features pooled from the bottleneck and every decoder stage, so every adapter is
trained) on patches from nnU-Net's training loader of the fold. Paper recipe: AdamW, DINO batch 64 (of patches:
``accumulation = ceil(64 / (nnU-Net batch x tpp_views_per_patch))`` micro-batches per optimiser step), lr
``1e-4 x batch / 256`` with linear warm-up over 10 epochs then cosine to 0, weight decay cosine 0.04 -> 0.4
(:mod:`tpp_monai.engines.schedules`), gradient clipping 3.0 (DINO). A TPP epoch is nnU-Net's epoch,
``tpp_iterations_per_epoch`` = 250 optimiser steps; ``tpp_epochs`` = 100 (DINO's default; the paper gives no
epoch count for DINO): 25,000 steps, sum of lr 0.31 (one pass over the cases per epoch gave ~200 steps on LiTS,
sum 0.0025: a no-op; ``docs/stunet_tpp.md``). Mixed precision as nnU-Net trains (autocast + GradScaler on CUDA,
plain fp32 on CPU). The EMA teacher's target parameters (DINO's and the 2D stage's hand-over) are saved
atomically to ``<output_folder>/tpp_target_params.pt`` and put into the network fine-tuning trains; the learning
report goes to ``tpp_report.json`` (:mod:`tpp_monai.engines.tpp_report`). Every TPP epoch the stage writes
``tpp_resume.pt`` (the 2D resume format + network weights and every RNG state), which ``--c`` continues; the
nnU-Net checkpoints record the finished stage in ``init_args["tpp_stage"]``, so ``--c`` never redoes it.

**What fine-tuning trains.** Default: adapters + ``seg_outputs``. The paper does not say; its segmentation
Ratios (Table 1: 2-6%, i.e. the PEFT parameters plus a light task decoder) imply that PEFT fine-tuning trains
the target parameters and a small task head. On STU-Net-B, adapters + ``seg_outputs`` are 0.39% of the
parameters; adapters + the pre-trained decoder 50.8%, which is no longer parameter-efficient. The ``Dec``
variants offer the latter (closest to STU-Net's own fine-tuning, which trains everything).

``-pretrained_weights`` loads STU-Net checkpoints with :func:`load_stunet_checkpoint` (``seg_outputs``
skipped, first conv repeated for more input channels, adapters not expected, any other missing /
unexpected / mis-shaped key is an error). The official ``*_ep4k.model`` files are pickles: set
``TPP_NNUNET_ALLOW_PICKLE=1`` (``--allow-pickle`` of the CLI) for files you trust. This is the only environment
variable: it grants a permission and changes no result, so it does not belong in the results folder's name.
It covers only the ``-pretrained_weights`` file: ``load_checkpoint`` (``--c``, ``--val``, ``--val_best``) always
loads weights-only (upstream nnU-Net unpickles with ``weights_only=False``), as does the non-STU-Net fall-through
of ``-pretrained_weights`` (:mod:`tpp_monai.nnunet.safety`).
Single-process training only for the TPP stage (not with ``-num_gpus`` > 1).
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Iterator
from os.path import isfile, join

import torch
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from torch import nn

from tpp_monai.backbones.stunet import STUNet, load_stunet_checkpoint
from tpp_monai.safe_io import CheckpointMismatch, atomic_file, atomic_save
from tpp_monai.peft.target_checkpoint import load_target_checkpoint, read_target_checkpoint, save_target_checkpoint
from tpp_monai.engines.distributed import barrier, rank_world, wrap_ddp
from tpp_monai.engines.amp import grad_scaler
from tpp_monai.engines.optim import build_optimizer
from tpp_monai.engines.run_state import set_rng_state
from tpp_monai.engines.schedules import WarmupCosineSchedule
from tpp_monai.engines.tpp_report import TPPReport
from tpp_monai.engines.tpp_step import tpp_step
from tpp_monai.engines.tpp_trainer import check_resume_state, load_resume_state, resume_state
from tpp_monai.nnunet import tpp_only_trainer_name
from tpp_monai.nnunet.safety import TRAIN_OPT_IN, allow_pickle_from_env, load_weights_only, weights_only_loads
from tpp_monai.pretext.dino_cnn import DINO3DPretext
from tpp_monai.peft.api import apply_peft, backbone_hashes, count_parameters, get_peft, load_target_state_dict, target_state_dict, tensors_digest

TPP_FILE = "tpp_target_params.pt"
TPP_RESUME = "tpp_resume.pt"  # the 2D TPP stage's resume file name and format (tpp_monai.engines.tpp_trainer)
TPP_RECORD = "tpp_stage"
DECODER_PREFIXES = ("upsample_layers", "conv_blocks_localization", "seg_outputs")


def _unwrap(network: nn.Module) -> nn.Module:
    mod = getattr(network, "module", network)  # DDP
    return getattr(mod, "_orig_mod", mod)  # torch.compile


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
        # upstream loads with weights_only=False: keep it weights-only unless the file is opted in
        with weights_only_loads(TRAIN_OPT_IN, trusted=[fname] if allow_pickle_from_env() else []):
            return original(network, fname, verbose)

    load_pretrained_weights._tpp_monai = True
    rt.load_pretrained_weights = load_pretrained_weights


def install_continue_hook() -> None:
    """Let the trainer know whether nnU-Net runs it with ``--c``: nnU-Net's ``maybe_load_checkpoint`` is the one
    place that sees the flag (``trainer.tpp_continue``, read by the TPP stage to resume ``tpp_resume.pt``). Idempotent."""
    import nnunetv2.run.run_training as rt

    if getattr(rt.maybe_load_checkpoint, "_tpp_monai", False):
        return
    original = rt.maybe_load_checkpoint

    def maybe_load_checkpoint(nnunet_trainer, continue_training, validation_only, pretrained_weights_file=None):
        nnunet_trainer.tpp_continue = bool(continue_training)
        return original(nnunet_trainer, continue_training, validation_only, pretrained_weights_file)

    maybe_load_checkpoint._tpp_monai = True
    rt.maybe_load_checkpoint = maybe_load_checkpoint


def frozen_fingerprint(net: nn.Module) -> str:
    """SHA-256 of the frozen STU-Net tensors (no target parameters, no ``seg_outputs``)."""
    peft = getattr(net, "tpp_peft", None)
    return tensors_digest((name, t) for name, t in list(net.named_parameters()) + list(net.named_buffers())
                          if not (name.startswith("seg_outputs") or (peft is not None and peft.is_target(name))))


def set_trainable(net: nn.Module, train_scope: str) -> None:
    """After PEFT injection: besides the target parameters, train ``seg_outputs`` or the whole ``decoder``."""
    prefixes = {"seg_outputs": ("seg_outputs",), "decoder": DECODER_PREFIXES}.get(train_scope)
    if prefixes is None:
        raise ValueError(f"train_scope must be 'seg_outputs' or 'decoder', got {train_scope!r}")
    for n, p in net.named_parameters():
        if n.startswith(prefixes):
            p.requires_grad_(True)


class nnUNetTrainer_STUNet_FT(nnUNetTrainer):
    """STU-Net from the plans, every parameter trained, lr 1e-3 (STU-Net ``_ft``)."""

    stunet_size: str = "base"
    peft_method: str | None = None
    peft_config: dict = {}
    train_scope: str = "seg_outputs"  # with PEFT: what trains besides the target parameters
    default_lr: float = 1e-3
    default_num_epochs: int = 1000
    default_iters_per_epoch: int = 250
    default_val_iters: int = 50

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = self.default_lr
        self.num_epochs = self.default_num_epochs
        self.num_iterations_per_epoch = self.default_iters_per_epoch
        self.num_val_iterations_per_epoch = self.default_val_iters

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        """Same network at training and inference: STU-Net of ``stunet_size`` + the PEFT method (if any).
        Trainable afterwards: target parameters + ``train_scope`` (everything without PEFT)."""
        net = STUNet.from_plans(configuration_manager, num_input_channels, num_output_channels, size=cls.stunet_size,
                                enable_deep_supervision=enable_deep_supervision)
        if cls.peft_method:
            apply_peft(net, cls.peft_method, dict(cls.peft_config))
            set_trainable(net, cls.train_scope)
        return net

    def initialize(self):
        install_pretrained_loader()  # before nnU-Net's maybe_load_checkpoint calls load_pretrained_weights
        super().initialize()
        net = _unwrap(self.network)
        n_train, n_all = count_parameters(net)
        self.print_to_log_file(f"STU-Net-{self.stunet_size} PEFT={self.peft_method} train_scope={self.train_scope}: "
                               f"trainable {n_train:,} / {n_all:,} parameters ({100.0 * n_train / n_all:.3f}%)")

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        """nnU-Net's ``load_checkpoint`` (``--c``, ``--val``, ``--val_best``) on a weights-only load of the file:
        upstream unpickles it with ``weights_only=False``. nnU-Net's own checkpoints are tensors and plain data."""
        if isinstance(filename_or_checkpoint, (str, os.PathLike)):
            filename_or_checkpoint = load_weights_only(filename_or_checkpoint, map_location=self.device,
                                                       opt_in=TRAIN_OPT_IN)
        super().load_checkpoint(filename_or_checkpoint)

    def configure_optimizers(self):
        params = [p for p in self.network.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, self.initial_lr, weight_decay=self.weight_decay, momentum=0.99,
                                    nesterov=True)
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)

    def plot_network_architecture(self):  # hiddenlayer tracing is slow and pointless here
        pass


class nnUNetTrainer_STUNet_ConvAdapter(nnUNetTrainer_STUNet_FT):
    """Frozen STU-Net + original Conv-Adapters (parallel to each block's k x k conv); trains adapters + seg_outputs."""

    peft_method = "conv_adapter"
    peft_config: dict = {}


class nnUNetTrainer_STUNet_ConvAdapterDec(nnUNetTrainer_STUNet_ConvAdapter):
    """Conv-Adapters + STU-Net's pre-trained decoder (upsampling, localisation blocks, seg_outputs) train."""

    train_scope = "decoder"


class _TPPStage:
    """The 3D DINO TPP stage (mixed into a Conv-Adapter trainer). Settings are class attributes (paper values)."""

    tpp_only: bool = False
    tpp_batch_size: int = 64  # DINO samples (patches) per optimiser step
    tpp_views_per_patch: int = 1  # independent multi-crop sets drawn from each nnU-Net patch
    tpp_epochs: int = 100
    tpp_iterations_per_epoch: int = 250  # optimiser steps per TPP epoch: nnU-Net's num_iterations_per_epoch
    # DINO's recipe, owned by the pretext class (DINO3DPretext.defaults): warm-up, lr per 256, weight decay, clipping
    tpp_warmup_epochs: int = DINO3DPretext.defaults["warmup_epochs"]
    tpp_lr_per_256: float = DINO3DPretext.defaults["lr_per_256"]  # lr = tpp_lr_per_256 * effective batch / 256
    tpp_weight_decay: float = DINO3DPretext.defaults["weight_decay"]
    tpp_weight_decay_end: float = DINO3DPretext.defaults["weight_decay_end"]
    tpp_clip_grad: float = DINO3DPretext.default_clip_grad
    tpp_n_local_crops: int = 4
    tpp_features: str = "decoder"
    tpp_head: dict = {"out_dim": 4096, "hidden_dim": 1024, "bottleneck_dim": 256}

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):  # nnU-Net records these names: same signature
        super().__init__(plans, configuration, fold, dataset_json, device)
        install_continue_hook()  # before nnU-Net's run_training calls maybe_load_checkpoint

    def on_train_start(self):
        super().on_train_start()
        self.run_tpp_stage()
        if self.tpp_only:
            self.stop_after_tpp()

    def stop_after_tpp(self) -> None:
        """``_TPPonly_`` trainers: shut the data loaders down and leave the process (exit code 0)."""
        from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
        from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter

        for dl in (self.dataloader_train, self.dataloader_val):
            if isinstance(dl, (NonDetMultiThreadedAugmenter, MultiThreadedAugmenter)):
                dl._finish()
        self.print_to_log_file(f"{type(self).__name__}: stopping after the TPP stage; "
                               f"{self.tpp_twin_name()} reuses {join(self.output_folder, TPP_FILE)}")
        raise SystemExit(0)

    # ------------------------------------------------------------------ settings and plan
    @classmethod
    def tpp_twin_name(cls) -> str:
        """The ``_TPPonly_`` trainer with the same TPP stage (or the ``_TPP_`` trainer, seen from a TPP-only one)."""
        name = cls.__name__
        return name.replace("_TPPonly_", "_TPP_") if cls.tpp_only else tpp_only_trainer_name(name)

    def tpp_settings(self) -> dict:
        """Everything that defines the TPP stage's result (compared before reusing a file)."""
        return {k: getattr(self, k) for k in (
            "stunet_size", "peft_method", "peft_config", "tpp_batch_size", "tpp_views_per_patch", "tpp_epochs",
            "tpp_iterations_per_epoch", "tpp_warmup_epochs", "tpp_lr_per_256", "tpp_weight_decay", "tpp_weight_decay_end", "tpp_clip_grad",
            "tpp_n_local_crops", "tpp_features", "tpp_head")}

    def tpp_plan(self, n_cases: int) -> dict:
        """Micro-batch, accumulation, effective batch, lr and steps for ``n_cases`` training cases.

        Under ``-num_gpus N`` nnU-Net's ``batch_size`` is the per-GPU share: the N ranks together load
        ``N x micro_batch`` per micro-step, so the accumulation shrinks and the effective (global) batch,
        lr and step count stay those of one GPU.
        """
        world = rank_world()[1]
        micro = int(self.batch_size) * int(self.tpp_views_per_patch)
        accum = max(math.ceil(self.tpp_batch_size / (micro * world)), 1)
        batch = micro * world * accum
        steps_per_epoch = int(self.tpp_iterations_per_epoch)  # as nnU-Net counts an epoch (not cases / batch)
        return {"micro_batch": micro, "processes": world, "accumulation": accum, "batch": batch, "cases": int(n_cases),
                "steps_per_epoch": steps_per_epoch,
                "steps": steps_per_epoch * self.tpp_epochs, "warmup_steps": steps_per_epoch * self.tpp_warmup_epochs,
                "lr": self.tpp_lr_per_256 * batch / 256}

    def tpp_schedule(self, plan: dict) -> WarmupCosineSchedule:
        return WarmupCosineSchedule(lr=plan["lr"], total_steps=plan["steps"], warmup_steps=plan["warmup_steps"],
                                    weight_decay=self.tpp_weight_decay, weight_decay_end=self.tpp_weight_decay_end)

    def _crop_sizes(self) -> tuple[list[int], list[int]]:
        patch = [int(p) for p in self.configuration_manager.patch_size]
        total = _unwrap(self.network).total_stride  # crops pass through the decoder: multiples of the total stride
        local = [min(p, max((p // 2) // t * t, 2 * t)) for p, t in zip(patch, total)]
        return patch, local

    # ------------------------------------------------------------------ reuse
    def _try_reuse(self, net: nn.Module, fp: str, path: str) -> bool:
        twin = join(self.output_folder.replace(f"{type(self).__name__}__", f"{self.tpp_twin_name()}__"), TPP_FILE)
        for src in dict.fromkeys([path, twin]):
            if not isfile(src):
                continue
            try:
                meta = read_target_checkpoint(src).get("meta", {})
                if meta.get("stunet_fingerprint") != fp or meta.get("tpp_settings") != self.tpp_settings():
                    self.print_to_log_file(f"{src} belongs to another backbone or TPP setting; not reused")
                    continue
                load_target_checkpoint(src, net, check_fingerprint=False)
            except (CheckpointMismatch, RuntimeError) as e:
                self.print_to_log_file(f"Cannot reuse {src} ({e})")
                continue
            if src != path and self.local_rank == 0:
                with atomic_file(path) as tmp:
                    shutil.copyfile(src, tmp)
            self.my_init_kwargs[TPP_RECORD] = {**{k: v for k, v in meta.items() if k != "peft"}, "done": True,
                                               "source": src}
            self.print_to_log_file(f"Loaded TPP target parameters from {src}; skipping the TPP stage")
            return True
        return False

    # ------------------------------------------------------------------ the stage
    def run_tpp_stage(self) -> None:
        net = _unwrap(self.network)
        path = join(self.output_folder, TPP_FILE)
        record = self.my_init_kwargs.get(TPP_RECORD)
        if record and record.get("done"):
            self.print_to_log_file(f"TPP stage already done ({record.get('iterations')} iterations, {path}); skipping")
            return
        resume_path = join(self.output_folder, TPP_RESUME)
        resume = None
        if getattr(self, "tpp_continue", False) and isfile(resume_path):
            # --c: nnU-Net loaded no weights (no checkpoint yet, and --c refuses -pretrained_weights), so the
            # network of the killed run (frozen backbone included) comes back from the resume file
            resume = load_resume_state(resume_path)
            net.load_state_dict(resume["network_weights"])
        fp = frozen_fingerprint(net)
        if resume is None and self._try_reuse(net, fp, path):
            return

        gsize, lsize = self._crop_sizes()
        tr_keys, _ = self.do_split()
        plan = self.tpp_plan(len(tr_keys))
        schedule = self.tpp_schedule(plan)
        frozen_now = [p for n, p in net.named_parameters() if p.requires_grad and not get_peft(net).is_target(n)]
        for p in frozen_now:  # seg_outputs / decoder train in fine-tuning only
            p.requires_grad_(False)
        task = DINO3DPretext(net, global_size=gsize, local_size=lsize, n_local_crops=self.tpp_n_local_crops,
                             spatial_dims=len(gsize), features=self.tpp_features, **self.tpp_head).to(self.device)
        opt = build_optimizer(task, lr=plan["lr"], weight_decay=self.tpp_weight_decay,
                              betas=DINO3DPretext.defaults["betas"])
        params = task.trainable_parameters()
        # -num_gpus N: the task is DDP-wrapped, so all ranks train one set of target parameters (gradients
        # averaged, DINO's centre over all ranks' patches); rank 0 writes the file. Unused: whatever part of
        # the network the pretext features do not reach.
        fwd = wrap_ddp(task, self.device, find_unused_parameters=True)
        cuda = self.device.type == "cuda"
        amp_dtype = torch.float16 if cuda else None  # as nnU-Net trains: fp16 autocast + GradScaler on CUDA
        scaler = grad_scaler(self.device, amp_dtype)
        settings = {"tpp_settings": self.tpp_settings(), "plan": plan, "crops": [gsize, lsize], "fold": self.fold}
        report = TPPReport(task.handover_backbone(), pretext="dino3d", peft=get_peft(net).name,
                           total_steps=plan["steps"], warmup_steps=plan["warmup_steps"], handover="teacher",
                           path="nnunet")
        start = 0
        task.set_schedule_position(0, plan["steps"])
        if resume is not None:
            start = self._load_tpp_resume(resume, resume_path, task, opt, scaler, report, settings)
        elif isfile(resume_path):
            self.print_to_log_file(f"starting the TPP stage over (no --c): {resume_path} will be overwritten")
        self.print_to_log_file(
            f"TPP stage: 3D DINO ({self.tpp_features} features), {len(tr_keys)} training cases, {self.tpp_epochs} epochs "
            f"x {plan['steps_per_epoch']} steps, batch {plan['batch']} = {plan['accumulation']} x {plan['micro_batch']}, "
            f"lr {plan['lr']:.3g} (warm-up {plan['warmup_steps']} steps), wd {self.tpp_weight_decay} -> "
            f"{self.tpp_weight_decay_end}, AMP {cuda}, crops {gsize}/{lsize}, "
            f"{sum(p.numel() for p in params):,} trainable parameters (targets + projector)")
        task.train()
        t0 = time.time()
        for it in range(start, plan["steps"]):
            lr = schedule.apply(opt, it)
            total = float(tpp_step(task, fwd, opt, self._tpp_batches(), step=it, total_steps=plan["steps"],
                                   device=self.device, amp_dtype=amp_dtype, scaler=scaler, clip_grad=self.tpp_clip_grad,
                                   accumulation=plan["accumulation"]))  # DDP: one all-reduce per step
            report.record(total, lr)
            if it % 10 == 0 or it == plan["steps"] - 1:
                self.print_to_log_file(f"TPP iteration {it + 1}/{plan['steps']}: loss {total:.4f} lr {lr:.2e} "
                                       f"wd {schedule.wd_at(it):.3f}")
            if (it + 1) % plan["steps_per_epoch"] == 0 or it + 1 == plan["steps"]:
                self._save_tpp_resume(resume_path, it + 1, net, task, opt, schedule, scaler, report, settings, plan)
        for p in frozen_now:
            p.requires_grad_(True)
        # hand over the EMA teacher's target parameters (DINO evaluates the teacher; the 2D stage does the same):
        # saved, and put into the network that fine-tuning trains
        teacher = task.handover_backbone()
        load_target_state_dict(net, target_state_dict(teacher))
        meta = {"pretext": "dino3d", "iterations": plan["steps"], "plan": plan, "tpp_settings": self.tpp_settings(),
                "final_loss": report.losses[-1] if report.losses else None, "seconds": round(time.time() - t0, 1),
                "stunet_size": self.stunet_size, "fold": self.fold, "trainer": type(self).__name__,
                "stunet_fingerprint": fp, "peft": get_peft(net).describe(), "handover": "teacher"}
        if self.local_rank == 0:
            save_target_checkpoint(path, teacher, meta=meta, hashes=self._tpp_hashes(teacher))
            report.finalise(self.output_folder, log=self.print_to_log_file)
        barrier()  # the file is complete before any rank goes on
        self.my_init_kwargs[TPP_RECORD] = {**{k: v for k, v in meta.items() if k != "peft"}, "done": True}
        del task, opt, fwd
        self.print_to_log_file(f"TPP stage done in {meta['seconds']} s; target parameters saved to {path}")

    def _tpp_hashes(self, module: nn.Module) -> tuple[str, dict[str, str]]:
        """The frozen tensors' hashes, once per stage (they cannot change during TPP), not at every epoch's save."""
        cache = self.__dict__.setdefault("_tpp_hash_cache", {})
        if id(module) not in cache:
            cache[id(module)] = backbone_hashes(module)
        return cache[id(module)]

    def _tpp_batches(self) -> Iterator[torch.Tensor]:
        """Patches from nnU-Net's training loader, each repeated ``tpp_views_per_patch`` times (endless)."""
        while True:
            data = torch.as_tensor(next(self.dataloader_train)["data"]).to(self.device, non_blocking=True)
            yield data.repeat_interleave(self.tpp_views_per_patch, dim=0) if self.tpp_views_per_patch > 1 else data

    def _save_tpp_resume(self, resume_path: str, iteration: int, net: nn.Module, task: nn.Module, opt, schedule,
                         scaler, report: TPPReport, settings: dict, plan: dict) -> None:
        """The 2D resume format (:func:`~tpp_monai.engines.tpp_trainer.resume_state`) + the whole network (``--c``
        loads no pre-trained weights), every RNG state and the grad scaler; written atomically by rank 0."""
        if self.local_rank != 0:
            return
        state = resume_state(
            task, opt, schedule, iteration=iteration, epoch=iteration // plan["steps_per_epoch"],
            max_epochs=self.tpp_epochs, data={"loader": "nnunet"}, settings=settings,
            report=report.state_dict(), hashes=self._tpp_hashes(task.backbone), network_weights={k: v.detach().cpu() for k, v in net.state_dict().items()},
            grad_scaler=scaler.state_dict() if scaler is not None else None)
        atomic_save(state, resume_path)

    def _load_tpp_resume(self, obj: dict, resume_path: str, task: nn.Module, opt, scaler, report: TPPReport,
                         settings: dict) -> int:
        """Continue a killed TPP stage (``--c``) where its resume file stands; returns the next iteration."""
        check_resume_state(obj, resume_path, task, settings)
        load_target_state_dict(task.backbone, obj["target_state"])
        task.load_head_state_dict(obj["head_state"])
        opt.load_state_dict(obj["optimizer"])
        if scaler is not None and obj.get("grad_scaler"):
            scaler.load_state_dict(obj["grad_scaler"])
        it = int(obj["iteration"])
        report.load_state_dict(obj.get("report"), it)
        task.set_schedule_position(it, settings["plan"]["steps"])
        set_rng_state(obj["rng"], task, resume_path)
        self.print_to_log_file(f"resuming the TPP stage from {resume_path} at iteration {it} of "
                               f"{settings['plan']['steps']} (--c); without --c it starts over")
        return it


class nnUNetTrainer_STUNet_TPP_ConvAdapter(_TPPStage, nnUNetTrainer_STUNet_ConvAdapter):
    """Conv-Adapter PEFT (adapters + seg_outputs) preceded by a 3D DINO TPP stage on the fold's training cases."""


class nnUNetTrainer_STUNet_TPP_ConvAdapterDec(_TPPStage, nnUNetTrainer_STUNet_ConvAdapterDec):
    """Conv-Adapter + decoder fine-tuning preceded by the 3D DINO TPP stage."""


class nnUNetTrainer_STUNet_TPPonly_ConvAdapter(_TPPStage, nnUNetTrainer_STUNet_ConvAdapter):
    """Only the TPP stage: writes tpp_target_params.pt for the ``_TPP_`` trainers, no fine-tuning."""

    tpp_only = True


class _Debug:
    """Tiny budgets: small STU-Net, 1 epoch of 2 iterations, 1 validation iteration, TPP 2 epochs of 1 step of
    batch 4 (accumulated), 1 local crop, half-size crops, no mirroring."""

    stunet_size = "small"
    default_num_epochs = 1
    default_iters_per_epoch = 2
    default_val_iters = 1
    tpp_batch_size = 4
    tpp_epochs = 2
    tpp_iterations_per_epoch = 1
    tpp_warmup_epochs = 1
    tpp_n_local_crops = 1
    tpp_head = {"out_dim": 256, "hidden_dim": 128, "bottleneck_dim": 64}

    def _crop_sizes(self) -> tuple[list[int], list[int]]:
        """Half-size crops (global: half the patch, local: twice the total stride) to keep CPU tests short."""
        patch, _ = super()._crop_sizes()
        total = _unwrap(self.network).total_stride
        glob = [min(p, max((p // 2) // t * t, 2 * t)) for p, t in zip(patch, total)]
        return glob, [min(g, 2 * t) for g, t in zip(glob, total)]

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        """No mirroring (augmentation and test-time), so validation/prediction stay fast on CPU."""
        rot, dummy_2d, initial_patch_size, _ = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        self.inference_allowed_mirroring_axes = None
        return rot, dummy_2d, initial_patch_size, None


def _variant(name: str, bases: tuple, doc: str, **attrs) -> type:
    cls = type(name, bases, {"__module__": __name__, "__doc__": doc, **attrs})
    globals()[name] = cls
    return cls


_BASES = (nnUNetTrainer_STUNet_FT, nnUNetTrainer_STUNet_ConvAdapter, nnUNetTrainer_STUNet_ConvAdapterDec,
          nnUNetTrainer_STUNet_TPP_ConvAdapter, nnUNetTrainer_STUNet_TPP_ConvAdapterDec,
          nnUNetTrainer_STUNet_TPPonly_ConvAdapter)
for _base in _BASES:
    _variant(f"{_base.__name__}_debug", (_Debug, _base), f"{_base.__doc__} (debug budgets)")
    for _size in ("small", "large", "huge"):  # nnUNetTrainer_STUNet_<...>_<small|large|huge>
        _variant(f"{_base.__name__}_{_size}", (_base,), f"{_base.__doc__} (STU-Net-{_size})", stunet_size=_size)

# STU-Net's published trainer names (uni-medical/STU-Net, nnUNet-2.2 STUNetTrainer.py)
for _size in ("small", "base", "large", "huge"):
    _ft = nnUNetTrainer_STUNet_FT if _size == "base" else globals()[f"nnUNetTrainer_STUNet_FT_{_size}"]
    _variant(f"STUNetTrainer_{_size}_ft", (_ft,), f"STU-Net's STUNetTrainer_{_size}_ft: every parameter, lr 1e-3")
    _variant(f"STUNetTrainer_{_size}", (_ft,), f"STU-Net's STUNetTrainer_{_size}: every parameter, lr 1e-2",
             default_lr=1e-2)
del _base, _size, _ft

__all__ = [n for n in list(globals()) if n.startswith(("nnUNetTrainer_", "STUNetTrainer_"))] + [
    "install_pretrained_loader", "load_pretrained_stunet", "frozen_fingerprint", "set_trainable", "TPP_FILE",
    "TPP_RECORD"]
