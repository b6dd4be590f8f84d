"""Run the nnU-Net v2 stages of the LiTS / KiTS bundles with the tpp-monai trainers.

Stages (in this order when several are asked for):

- ``plan``: ``nnUNetv2_plan_and_preprocess -d ID -c CONFIG -np N --verify_dataset_integrity``;
- ``tpp``: ``tpp-monai nnunet-train ...`` with the trainer's ``_TPPonly_`` twin (e.g.
  ``nnUNetTrainer_STUNet_TPPonly_ConvAdapter`` for ``nnUNetTrainer_STUNet_TPP_ConvAdapter``): only the TPP stage
  (3D DINO on the fold's training cases), written to ``<twin's fold folder>/tpp_target_params.pt``;
- ``train``: ``tpp-monai nnunet-train ID CONFIG FOLD -tr TRAINER -device DEV [-pretrained_weights W]``: TPP
  (skipped if the twin's file exists for the same backbone and TPP settings) then fine-tuning and nnU-Net's
  validation;
- ``predict``: nnU-Net's own ``nnUNetPredictor`` in-process (:meth:`NnUNetTPPRunner.predict`) on the trained fold
  (``checkpoint_final.pth``): NIfTI images ``<case>_0000`` in ``predict_input`` -> masks in ``predict_output``
  (the command-line equivalent, printed by dry runs: ``tpp-monai nnunet-predict -i IN -o OUT -d ID -c CONFIG -f FOLD
  -tr TRAINER -device DEV``);
- ``evaluate``: nnU-Net's own ``compute_metrics_on_folder`` (:mod:`tpp_monai.metrics.nnunet_dice`) on the fold's
  validation predictions (``<fold folder>/validation``, written by ``train``) against ``labelsTr``: nnU-Net's
  summary.json goes to ``<fold folder>/nnunet_summary.json``, the mean / per-label Dice read from it to
  ``<fold folder>/dice_summary.json`` (``evaluate_output``).

Why not ``monai.apps.nnunet.nnUNetV2Runner`` (monai 1.6.1)? It converts MONAI datalists (our prepare scripts
already write nnU-Net raw datasets), rewrites ``os.environ`` when constructed, always adds ``-num_gpus`` and
passes extra options as ``--key`` (nnUNetv2_train needs ``-device``), and has no way to set
``nnUNet_extTrainer``. Nor its ``get_nnunet_monai_predictor`` / ``ModelnnUNetWrapper`` for ``predict``: they
look trainers up only inside ``nnunetv2``, call ``build_network_architecture`` with the pre-2.4 arguments, need a
converted ``model.pt`` + ``nnunet_checkpoint.pth`` layout and put the predictor on ``cuda:0``; ``predict`` calls
``nnUNetPredictor`` on the fold folder as nnU-Net's own ``nnUNetv2_predict`` does. This module builds the same
command lines explicitly; :meth:`NnUNetTPPRunner.commands`
returns them (with their environments) without running anything, which the tests check.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from tpp_monai.nnunet import tpp_only_trainer_name, trainer_path
from tpp_monai.nnunet.safety import BUNDLE_OPT_IN, weights_only_loads

STAGES = ("plan", "tpp", "train", "predict", "evaluate")


def _bin(tool: str) -> str:
    """``tool`` next to this interpreter (the venv's nnUNetv2_* scripts), else the bare name (PATH)."""
    exe = Path(sys.executable).parent / tool
    return str(exe) if exe.exists() else tool


@dataclass
class NnUNetTPPRunner:
    """Command lines and environments for one dataset / configuration / fold / trainer."""

    dataset_id: int
    dataset_name: str
    nnunet_raw: str
    nnunet_preprocessed: str
    nnunet_results: str
    configuration: str = "3d_fullres"
    fold: int | str = 0
    trainer: str = "nnUNetTrainer_STUNet_TPP_ConvAdapter"
    plans: str = "nnUNetPlans"
    device: str = "cuda"
    pretrained_weights: str | None = None
    allow_pickle: bool = False
    num_processes: int = 4
    continue_training: bool = False
    predict_input: str | None = None
    predict_output: str | None = None
    disable_tta: bool = False
    evaluate_output: str | None = None
    dry_run: bool = False  # run(): print the commands, run nothing

    def __post_init__(self):
        self.dataset_id = int(self.dataset_id)
        for k in ("nnunet_raw", "nnunet_preprocessed", "nnunet_results"):
            setattr(self, k, os.path.abspath(os.path.expanduser(str(getattr(self, k)))))
        if not 1 <= self.dataset_id <= 999:
            raise ValueError(f"dataset_id {self.dataset_id} must be in 1..999")

    # ------------------------------------------------------------------ paths
    @property
    def dataset_folder_name(self) -> str:
        return f"Dataset{self.dataset_id:03d}_{self.dataset_name}"

    @property
    def raw_dataset_dir(self) -> Path:
        return Path(self.nnunet_raw) / self.dataset_folder_name

    def trainer_fold_dir(self, trainer: str) -> Path:
        return (Path(self.nnunet_results) / self.dataset_folder_name /
                f"{trainer}__{self.plans}__{self.configuration}" / f"fold_{self.fold}")

    @property
    def fold_dir(self) -> Path:
        return self.trainer_fold_dir(self.trainer)

    @property
    def tpp_trainer(self) -> str:
        """The ``_TPPonly_`` trainer the ``tpp`` stage runs."""
        return tpp_only_trainer_name(self.trainer)

    @property
    def tpp_file(self) -> Path:
        """Where the ``tpp`` stage writes the target parameters (the ``train`` stage copies them to its folder)."""
        return self.trainer_fold_dir(self.tpp_trainer) / "tpp_target_params.pt"

    def _predict_io(self) -> tuple[str, str]:
        src = self.predict_input or str(self.raw_dataset_dir / "imagesTs")
        dst = self.predict_output or str(self.fold_dir / "predictions")
        return src, dst

    # ------------------------------------------------------------------ environment and commands
    def env(self, base: dict | None = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        env.update(nnUNet_raw=str(self.nnunet_raw), nnUNet_preprocessed=str(self.nnunet_preprocessed),
                   nnUNet_results=str(self.nnunet_results))
        paths = [p for p in env.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
        if trainer_path() not in paths:
            paths.insert(0, trainer_path())
        env["nnUNet_extTrainer"] = os.pathsep.join(paths)
        if self.allow_pickle:
            env["TPP_NNUNET_ALLOW_PICKLE"] = "1"
        return env

    def plan_cmd(self) -> list[str]:
        return [_bin("nnUNetv2_plan_and_preprocess"), "-d", str(self.dataset_id), "-c", self.configuration,
                "-np", str(self.num_processes), "--verify_dataset_integrity"]

    def train_cmd(self, trainer: str | None = None) -> list[str]:
        cmd = [sys.executable, "-m", "tpp_monai.cli", "nnunet-train", str(self.dataset_id), self.configuration,
               str(self.fold), "-tr", trainer or self.trainer, "-p", self.plans, "-device", self.device]
        if self.pretrained_weights:
            cmd += ["-pretrained_weights", str(self.pretrained_weights)]
        if self.continue_training:
            cmd.append("--c")
        return cmd

    def predict_cmd(self) -> list[str]:
        src, dst = self._predict_io()
        cmd = [sys.executable, "-m", "tpp_monai.cli", "nnunet-predict", "-i", src, "-o", dst, "-d",
               str(self.dataset_id), "-c", self.configuration, "-f", str(self.fold), "-tr", self.trainer, "-p",
               self.plans, "-device", self.device]
        if self.disable_tta:
            cmd.append("--disable_tta")
        return cmd

    def commands(self, stages: Sequence[str] | str) -> list[tuple[str, list[str] | None, dict[str, str] | None]]:
        """``[(stage, argv, env)]`` in run order; ``evaluate`` runs in-process (argv and env None)."""
        stages = [stages] if isinstance(stages, str) else list(stages)
        unknown = [s for s in stages if s not in STAGES]
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; choose from {STAGES}")
        if "tpp" in stages and "_TPP_" not in self.trainer:
            raise ValueError(f"stage 'tpp' needs a TPP trainer (nnUNetTrainer_STUNet_TPP_ConvAdapter*), not {self.trainer}")
        out = []
        for s in STAGES:
            if s not in stages:
                continue
            if s == "plan":
                out.append((s, self.plan_cmd(), self.env()))
            elif s == "tpp":
                out.append((s, self.train_cmd(self.tpp_trainer), self.env()))
            elif s == "train":
                out.append((s, self.train_cmd(), self.env()))
            elif s == "predict":
                out.append((s, self.predict_cmd(), self.env()))
            else:
                out.append((s, None, None))
        return out

    def evaluate(self, pred_dir: str | None = None) -> dict:
        """nnU-Net's metrics of ``pred_dir`` (default the fold's validation folder), condensed to mean Dice."""
        from tpp_monai.metrics.nnunet_dice import dice_summary_for_dataset

        pred = Path(pred_dir) if pred_dir else self.fold_dir / "validation"
        out = Path(self.evaluate_output or self.fold_dir / "dice_summary.json")
        print(f"[tpp-monai] nnU-Net's compute_metrics_on_folder: {pred} against {self.raw_dataset_dir / 'labelsTr'}"
              f" -> {out.with_name('nnunet_summary.json')}, Dice summary -> {out}")
        return dice_summary_for_dataset(pred, self.raw_dataset_dir / "labelsTr", self.raw_dataset_dir / "dataset.json",
                                        out, num_processes=self.num_processes)

    def predict(self, checkpoint_name: str = "checkpoint_final.pth") -> list[Path]:
        """nnU-Net's ``nnUNetPredictor`` (sliding window, Gaussian weighting, mirroring unless ``disable_tta``) with
        the trained fold, in this process: every ``<case>_0000<ending>`` in ``predict_input`` -> ``<case><ending>``
        masks in ``predict_output``. Returns the written masks. The checkpoint is loaded weights-only unless
        ``allow_pickle`` (a refused file raises :class:`~tpp_monai.nnunet.safety.UnsafeCheckpointError`)."""
        import torch
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        src, dst = self._predict_io()
        ckpt = self.fold_dir / checkpoint_name
        if not ckpt.is_file():
            raise FileNotFoundError(f"{ckpt} not found: run the train stage for fold {self.fold} first, or set "
                                    "--settings::trainer / --settings::fold / --settings::nnunet_results to a trained fold")
        if not Path(src).is_dir():
            raise FileNotFoundError(f"input folder {src} not found: set --settings::predict_input to a folder of "
                                    "<case>_0000.nii.gz images")
        fold = self.fold if str(self.fold) == "all" else int(self.fold)
        device = torch.device(self.device)
        print(f"[tpp-monai] nnUNetPredictor: {self.fold_dir.parent} fold {fold} ({checkpoint_name}), {src} -> {dst}",
              flush=True)
        with _environ(self.env()):
            predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=not self.disable_tta,
                                        perform_everything_on_device=device.type == "cuda", device=device,
                                        verbose=False, allow_tqdm=False)
            # nnU-Net unpickles the checkpoint with weights_only=False: force weights-only unless opted in
            with contextlib.nullcontext() if self.allow_pickle else weights_only_loads(BUNDLE_OPT_IN):
                predictor.initialize_from_trained_model_folder(str(self.fold_dir.parent), use_folds=(fold,),
                                                               checkpoint_name=checkpoint_name)
            n = max(1, min(int(self.num_processes), 2))
            predictor.predict_from_files(str(src), str(dst), save_probabilities=False, overwrite=True,
                                         num_processes_preprocessing=n, num_processes_segmentation_export=n)
        ending = predictor.dataset_json["file_ending"]
        return sorted(p for p in Path(dst).iterdir() if p.name.endswith(ending))

    def run(self, stages: Sequence[str] | str, dry_run: bool | None = None) -> dict:
        """Run the stages in order (stop at the first failure). ``dry_run`` (default ``self.dry_run``): print the
        commands only."""
        dry_run = self.dry_run if dry_run is None else dry_run
        results: dict = {}
        for stage, cmd, env in self.commands(stages):
            if cmd is None:
                print(f"[tpp-monai] stage {stage}: Dice summary (in-process)")
                results[stage] = None if dry_run else self.evaluate()
                continue
            extra = {k: v for k, v in env.items() if k.startswith(("nnUNet_", "TPP_NNUNET_"))}
            print(f"[tpp-monai] stage {stage}: {' '.join(cmd)}\n  env: {extra}", flush=True)
            if dry_run:
                results[stage] = cmd
                continue
            if stage == "predict":  # in-process, nnU-Net's predictor (the printed command is the equivalent)
                results[stage] = self.predict()
                continue
            r = subprocess.run(cmd, env=env)
            if r.returncode != 0:
                raise RuntimeError(f"stage {stage} failed with exit code {r.returncode}: {' '.join(cmd)}")
            results[stage] = r.returncode
        return results


@contextlib.contextmanager
def _environ(env: dict[str, str]):
    """Temporarily use the nnU-Net paths / nnUNet_extTrainer of ``env`` in this process (nnU-Net reads them lazily)."""
    keys = [k for k in env if k.startswith(("nnUNet_", "TPP_NNUNET_"))]
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: env[k] for k in keys})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_nnunet(stages: Sequence[str] | str, dry_run: bool | None = None, **kwargs) -> dict:
    """``NnUNetTPPRunner(**kwargs).run(stages, dry_run)``."""
    return NnUNetTPPRunner(**kwargs).run(stages, dry_run=dry_run)


__all__ = ["NnUNetTPPRunner", "run_nnunet", "STAGES"]
