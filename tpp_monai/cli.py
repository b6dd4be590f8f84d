"""``tpp-monai`` command line: one ``main`` with argparse sub-commands (others add theirs here).

    tpp-monai nnunet-trainer-path
    tpp-monai nnunet-train 501 3d_fullres 0 -tr nnUNetTrainer_STUNet_TPP_ConvAdapter -device cpu \\
        [--allow-pickle] [-pretrained_weights small_ep4k.model]

``nnunet-train`` puts our trainer folder in ``nnUNet_extTrainer`` and runs ``nnUNetv2_train`` with the
remaining arguments (``--allow-pickle`` sets ``TPP_NNUNET_ALLOW_PICKLE=1`` for official ``.model`` files).
"""

from __future__ import annotations

import argparse
import os
import shutil
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


def _exec(tool: str, args: list[str], env: dict[str, str]) -> int:
    exe = shutil.which(tool) or os.path.join(os.path.dirname(sys.executable), tool)
    if not os.path.exists(exe):
        print(f"tpp-monai: cannot find {tool}; install nnunetv2 in this environment", file=sys.stderr)
        return 2
    os.execve(exe, [exe, *args], env)
    return 0  # not reached


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tpp-monai", description="TPP + PEFT for medical imaging")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("nnunet-trainer-path", help="print the folder to put in nnUNet_extTrainer")
    p = sub.add_parser("nnunet-train", help="nnUNetv2_train with the tpp-monai STU-Net trainers available",
                       description="All arguments not listed here go to nnUNetv2_train unchanged.")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow -pretrained_weights to be a legacy pickle (official STU-Net *.model); trusted files only")
    p = sub.add_parser("nnunet-predict", help="nnUNetv2_predict with the tpp-monai trainers available")
    args, rest = parser.parse_known_args(argv)
    if args.command == "nnunet-trainer-path":
        from tpp_monai.nnunet import trainer_path

        print(trainer_path())
        return 0
    if args.command == "nnunet-train":
        return _exec("nnUNetv2_train", rest, _nnunet_env(args.allow_pickle))
    if args.command == "nnunet-predict":
        return _exec("nnUNetv2_predict", rest, _nnunet_env())
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
