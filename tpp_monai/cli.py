"""``tpp-monai`` command line: one ``main`` with argparse sub-commands (others add theirs here).

    tpp-monai nnunet-trainer-path
    tpp-monai nnunet-train 501 3d_fullres 0 -tr nnUNetTrainer_STUNet_TPP_ConvAdapter -device cpu \\
        [--allow-pickle] [-pretrained_weights small_ep4k.model]

``nnunet-train`` puts our trainer folder in ``nnUNet_extTrainer`` and runs ``nnUNetv2_train`` with the
remaining arguments (``--allow-pickle`` sets ``TPP_NNUNET_ALLOW_PICKLE=1`` for official ``.model`` files).
``nnunet-predict`` first reads every ``checkpoint_final.pth`` it will use (``-d/-tr/-p/-c/-f/-chk``)
with a weights-only load: upstream nnU-Net loads them with ``weights_only=False``, which would run
any code pickled into a crafted file. A file that needs more than tensors and plain data is refused
unless ``--allow-pickle`` is given.
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


def predict_checkpoints(args: list[str]) -> list[str]:
    """The checkpoint files ``nnUNetv2_predict args`` will load ([] when -d/-c are missing or the dataset
    is unknown: nnU-Net then reports the problem itself)."""
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("-d")
    ap.add_argument("-c")
    ap.add_argument("-p", default="nnUNetPlans")
    ap.add_argument("-tr", default="nnUNetTrainer")
    ap.add_argument("-f", nargs="+", default=["0", "1", "2", "3", "4"])
    ap.add_argument("-chk", default="checkpoint_final.pth")
    ns, _ = ap.parse_known_args(args)
    if ns.d is None or ns.c is None:
        return []
    try:
        from nnunetv2.utilities.file_path_utilities import get_output_folder

        folder = get_output_folder(ns.d, ns.tr, ns.p, ns.c)
    except Exception:  # noqa: BLE001 - unknown dataset, nnUNet_results unset: nnU-Net's own message follows
        return []
    return [os.path.join(folder, f"fold_{f}", ns.chk) for f in ns.f]


def _numpy_data_globals() -> list:
    """numpy scalar/array/dtype reconstructors: plain data that nnU-Net's logs hold (np.float64 Dice values)."""
    import numpy as np
    import numpy.dtypes as dtypes

    core = getattr(np, "_core", None) or np.core
    return [core.multiarray.scalar, core.multiarray._reconstruct, np.ndarray, np.dtype,
            *[getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")]]


def check_predict_checkpoints(args: list[str]) -> str | None:
    """None when every checkpoint ``nnUNetv2_predict args`` would load passes a weights-only load (tensors,
    plain data, numpy numbers); else the refusal message naming the file and the fix."""
    return check_checkpoints_weights_only(predict_checkpoints(args))


def check_checkpoints_weights_only(paths: list[str],
                                   pickle_hint: str = "re-run with `tpp-monai nnunet-predict --allow-pickle ...`"
                                   ) -> str | None:
    """None when every existing file in ``paths`` loads with ``weights_only=True`` (nnU-Net's own loader then
    unpickles nothing but tensors and plain data); else the refusal message naming the file and the fix."""
    import torch

    from tpp_monai.checkpoint import describe_unreadable

    for path in paths:
        if not os.path.isfile(path):
            continue  # a missing fold: nnU-Net names it
        try:
            with torch.serialization.safe_globals(_numpy_data_globals()):
                torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            msg = describe_unreadable(path, e, allow_pickle=False, what="nnU-Net checkpoint")
            if "not an allowed global" in str(e):
                msg += (" Upstream nnU-Net would load it with weights_only=False, running any code pickled into it: "
                        f"{pickle_hint} only if you trust this file.")
            return msg
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tpp-monai", description="TPP + PEFT for medical imaging")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("nnunet-trainer-path", help="print the folder to put in nnUNet_extTrainer")
    p = sub.add_parser("nnunet-train", help="nnUNetv2_train with the tpp-monai STU-Net trainers available",
                       description="All arguments not listed here go to nnUNetv2_train unchanged.")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow -pretrained_weights to be a legacy pickle (official STU-Net *.model); trusted files only")
    p = sub.add_parser("nnunet-predict", help="nnUNetv2_predict with the tpp-monai trainers available",
                       description="All arguments not listed here go to nnUNetv2_predict unchanged.")
    p.add_argument("--allow-pickle", action="store_true",
                   help="use checkpoints that a weights-only load refuses (pickled objects); trusted files only")
    from tpp_monai.peft.hf_interop import add_peft_commands

    add_peft_commands(sub)  # export-peft / import-peft
    args, rest = parser.parse_known_args(argv)
    if getattr(args, "run", None):  # sub-commands with their own handler take no extra arguments
        return args.run(parser.parse_args(argv))
    if args.command == "nnunet-trainer-path":
        from tpp_monai.nnunet import trainer_path

        print(trainer_path())
        return 0
    if args.command == "nnunet-train":
        return _exec("nnUNetv2_train", rest, _nnunet_env(args.allow_pickle))
    if args.command == "nnunet-predict":
        if not args.allow_pickle:
            err = check_predict_checkpoints(rest)
            if err:
                print(f"tpp-monai: {err}", file=sys.stderr)
                return 2
        return _exec("nnUNetv2_predict", rest, _nnunet_env())
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
