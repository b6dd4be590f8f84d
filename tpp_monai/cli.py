"""``tpp-monai`` command line: one ``main`` with argparse sub-commands (others add theirs here).

    tpp-monai prepare | tpp | train | evaluate | infer    # the 2D workflow on your own data (cli_workflow.py)

    tpp-monai nnunet-trainer-path
    tpp-monai nnunet-train 501 3d_fullres 0 -tr nnUNetTrainer_STUNet_TPP_ConvAdapter -device cpu \\
        [--allow-pickle] [-pretrained_weights small_ep4k.model]

``nnunet-train`` / ``nnunet-predict`` put our trainer folder in ``nnUNet_extTrainer`` and run nnU-Net's own
``nnUNetv2_train`` / ``nnUNetv2_predict`` entry point in this process with the remaining arguments, every
checkpoint load forced weights-only (:mod:`tpp_monai.nnunet.safety`): upstream nnU-Net loads checkpoints with
``weights_only=False``, which would run any code pickled into a crafted file. nnU-Net parses its arguments and
finds its files itself, so what is checked is exactly what it loads. ``--allow-pickle`` (trusted files only):
for ``nnunet-train`` the ``-pretrained_weights`` file may be a legacy pickle (official STU-Net ``.model``; also
``TPP_NNUNET_ALLOW_PICKLE=1``), for ``nnunet-predict`` every fold's checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys


def _nnunet_env(allow_pickle: bool = False) -> dict[str, str]:
    from tpp_monai.nnunet import trainer_path

    env = dict(os.environ)
    paths = [p for p in env.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
    if trainer_path() not in paths:
        paths.insert(0, trainer_path())
    env["nnUNet_extTrainer"] = os.pathsep.join(paths)
    if allow_pickle:
        env["TPP_NNUNET_ALLOW_PICKLE"] = "1"
    return env


def check_checkpoints_weights_only(paths: list[str], pickle_hint: str | None = None) -> str | None:
    """None when every existing file in ``paths`` loads weights-only; else the refusal naming the file and the fix
    (:func:`tpp_monai.nnunet.safety.check_checkpoints_weights_only`)."""
    from tpp_monai.nnunet.safety import PREDICT_OPT_IN
    from tpp_monai.nnunet.safety import check_checkpoints_weights_only as check

    return check(paths, pickle_hint or PREDICT_OPT_IN)


def _run_nnunet(tool: str, args: list[str], allow_pickle: bool) -> int:
    """nnU-Net's ``tool`` entry point in this process (with our trainers on ``nnUNet_extTrainer``), loads guarded."""
    from tpp_monai.nnunet.safety import run_nnunet_entry

    os.environ.update(_nnunet_env(allow_pickle and tool == "nnUNetv2_train"))
    return run_nnunet_entry(tool, args, allow_pickle=allow_pickle)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tpp-monai", description="TPP + PEFT for medical imaging")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("nnunet-trainer-path", help="print the folder to put in nnUNet_extTrainer")
    p = sub.add_parser("nnunet-train", help="nnUNetv2_train with the tpp-monai STU-Net trainers available",
                       description="All arguments not listed here go to nnUNetv2_train unchanged.")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow the -pretrained_weights file to be a legacy pickle (official STU-Net *.model); trusted "
                        "files only. nnU-Net's own checkpoints (--c, --val) always load weights-only")
    p = sub.add_parser("nnunet-predict", help="nnUNetv2_predict with the tpp-monai trainers available",
                       description="All arguments not listed here go to nnUNetv2_predict unchanged.")
    p.add_argument("--allow-pickle", action="store_true",
                   help="use checkpoints that a weights-only load refuses (pickled objects); trusted files only")
    from tpp_monai.cli_workflow import WORKFLOW_COMMANDS, add_workflow_commands, run_workflow_command
    from tpp_monai.peft.hf_interop import add_peft_commands

    add_workflow_commands(sub)
    add_peft_commands(sub)  # export-peft / import-peft
    args, rest = parser.parse_known_args(argv)
    if args.command in WORKFLOW_COMMANDS:
        return run_workflow_command(args, rest)
    if getattr(args, "run", None):  # sub-commands with their own handler take no extra arguments
        return args.run(parser.parse_args(argv))
    if args.command == "nnunet-trainer-path":
        from tpp_monai.nnunet import trainer_path

        print(trainer_path())
        return 0
    if args.command == "nnunet-train":
        from tpp_monai.nnunet.safety import allow_pickle_from_env

        return _run_nnunet("nnUNetv2_train", rest, args.allow_pickle or allow_pickle_from_env())
    if args.command == "nnunet-predict":
        return _run_nnunet("nnUNetv2_predict", rest, args.allow_pickle)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
