"""``tpp-monai`` sub-commands for the 2D workflow on your own data: prepare -> tpp -> train -> evaluate -> infer.

Why: the bundles need a datalist, a work folder and the class list on every command line; these sub-commands
fill them in from the datalist ``tpp-monai prepare`` wrote, so one folder of images goes through the whole
method with five short commands. Each stage is a thin front of one bundle command: it calls ``monai.bundle.run``
on the bundle's configs, prints the equivalent ``python -m monai.bundle run ...`` line, and passes every further
``--key value`` through unchanged as a bundle override (parsed as ``python -m monai.bundle`` parses it).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any, Sequence

BUNDLE_FOR_TASK = {"cls": "mhist_adapter_tpp", "seg": "glas_adapter_tpp"}
#: stage -> (configs of the bundle, what it writes into the work folder)
STAGES = {
    "tpp": (("train.json", "tpp_pretrain.json"), "models/tpp_target_params.pt (the pre-trained target parameters)"),
    "train": (("train.json",), "models/model.pt (best validation checkpoint), logs/, curves under figures/"),
    "evaluate": (("train.json", "evaluate.json"), "eval/metrics.json (test split) and figures under eval/"),
    "infer": (("inference.json",), "predictions/ (<image>_seg.png masks or predictions.csv)"),
}
EPILOG = """The whole path (docs/DATA_FORMAT.md has the folder layouts and the datalist format):
  tpp-monai prepare my_images/ --out work/datalist.json          # folder -> datalist with splits
  tpp-monai tpp      --datalist work/datalist.json --workdir work --backbone_ckpt vit_b16.pth
  tpp-monai train    --datalist work/datalist.json --workdir work --backbone_ckpt vit_b16.pth
  tpp-monai evaluate --datalist work/datalist.json --workdir work --backbone_ckpt vit_b16.pth
  tpp-monai infer    --workdir work --input-dir new_images/ --backbone_ckpt vit_b16.pth
Any other --key value is a bundle override (e.g. --num_iterations 500 --peft_method lora --image_size 224)."""


class WorkflowError(ValueError):
    """A workflow argument is wrong; the message says what to pass instead."""


def bundles_dir() -> Path:
    """The repository's ``bundles/`` folder (the package is installed from a clone, ``pip install -e .``)."""
    here = Path(__file__).resolve().parents[1] / "bundles"
    if not (here / "common").is_dir():
        raise WorkflowError(f"no bundles/ folder beside the tpp_monai package ({here}): install tpp-monai from its "
                            "repository clone (`pip install -e .`) or pass --bundle <path to a bundle folder>")
    return here


def resolve_bundle(bundle: str | None, task: str) -> Path:
    """A bundle folder: a path, a bundle name under bundles/, or the default 2D bundle of ``task``."""
    if bundle and Path(bundle, "configs", "metadata.json").is_file():
        return Path(bundle).resolve()
    name = bundle or BUNDLE_FOR_TASK[task]
    path = bundles_dir() / name
    if not (path / "configs" / "metadata.json").is_file():
        two_d = sorted(p.name for p in bundles_dir().iterdir() if (p / "configs" / "evaluate.json").is_file())
        raise WorkflowError(f"unknown bundle {name!r}: give a bundle folder or one of {two_d}")
    return path


def read_datalist_info(datalist: str | Path) -> dict[str, Any]:
    """``task`` and ``class_names`` of a datalist (written by ``tpp-monai prepare``; else inferred from labels)."""
    p = Path(datalist)
    if not p.is_file():
        raise WorkflowError(f"datalist not found: {p}; write it first with `tpp-monai prepare <folder> --out {p}`")
    try:
        obj = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise WorkflowError(f"datalist {p} is not valid JSON ({e}); re-run `tpp-monai prepare`") from e
    entries = obj.get("training") or [] if isinstance(obj, dict) else []
    if not entries:
        raise WorkflowError(f"datalist {p} has no 'training' entries (format: docs/DATA_FORMAT.md)")
    task = obj.get("task") or ("seg" if isinstance(entries[0].get("label"), str) else "cls")
    names = obj.get("class_names") or []
    if not names and task == "cls":
        names = [f"class_{i}" for i in range(max(int(e["label"]) for e in entries) + 1)]
    if not names:
        raise WorkflowError(f"datalist {p} names no classes: add \"class_names\": [\"background\", ...] to it "
                            "(or re-run `tpp-monai prepare`)")
    return {"task": task, "class_names": list(names)}


def parse_overrides(rest: Sequence[str]) -> dict[str, Any]:
    """``--key value`` / ``--key=value`` pairs -> overrides, values parsed as ``python -m monai.bundle`` (fire)."""
    from fire.parser import DefaultParseValue

    out: dict[str, Any] = {}
    items = list(rest)
    while items:
        key = items.pop(0)
        if not key.startswith("--") or len(key) < 3:
            raise WorkflowError(f"unexpected argument {key!r}: bundle overrides are --key value pairs")
        key, eq, value = key[2:].partition("=")
        if not eq:
            if not items or items[0].startswith("--"):
                raise WorkflowError(f"bundle override --{key} has no value (write --{key} VALUE)")
            value = items.pop(0)
        out[key] = DefaultParseValue(value)
    return out


def stage_overrides(stage: str, args: argparse.Namespace, info: dict[str, Any]) -> dict[str, Any]:
    """What the stage fills in: the work folder, the datalist, the classes, and the stage's own inputs."""
    work = Path(args.workdir).resolve()
    over: dict[str, Any] = {"bundle_root": str(work), "num_classes": len(info["class_names"]),
                            "class_names": info["class_names"]}
    if args.datalist:
        over["datalist"] = str(Path(args.datalist).resolve())
    if stage == "tpp":
        over["tpp_datalist"] = over["datalist"]
    if stage == "train":
        over["tpp_ckpt"] = "" if args.no_tpp else str(work / "models" / "tpp_target_params.pt")
    if stage == "infer" and args.input_dir:
        over["input_dir"] = str(Path(args.input_dir).resolve())
    return over


def command_line(configs: Sequence[Path], meta: Path, overrides: dict[str, Any]) -> str:
    """The ``python -m monai.bundle run`` line doing the same (printed so users can run the bundle directly)."""
    files = str(configs[0]) if len(configs) == 1 else repr([str(c) for c in configs])
    parts = ["python", "-m", "monai.bundle", "run", "--config_file", files, "--meta_file", str(meta)]
    for k, v in overrides.items():
        parts += [f"--{k}", v if isinstance(v, str) else repr(v)]
    return " ".join(shlex.quote(p) for p in parts)


def run_stage(stage: str, args: argparse.Namespace, rest: Sequence[str]) -> int:
    from monai.bundle import run

    work = Path(args.workdir)
    if stage == "infer" and not args.datalist and not args.input_dir:
        raise WorkflowError("infer needs --input-dir <folder of images> or --datalist (its test split)")
    if stage == "infer" and not args.datalist:
        info_file = work / "workflow.json"
        if not info_file.is_file():
            raise WorkflowError(f"{info_file} not found: run `tpp-monai train --workdir {work}` first, or pass "
                                "--datalist (the one training used)")
        info = json.loads(info_file.read_text())
    else:
        if not args.datalist:
            raise WorkflowError(f"{stage} needs --datalist (write one with `tpp-monai prepare <folder> --out ...`)")
        info = read_datalist_info(args.datalist)
    bundle = resolve_bundle(args.bundle or info.get("bundle"), info["task"])
    task = json.loads((bundle / "configs" / "metadata.json").read_text()).get("task", "")
    configs = [bundle / "configs" / f for f in STAGES[stage][0]]
    missing = [c for c in configs if not c.is_file()]
    if missing:
        raise WorkflowError(f"bundle {bundle.name} has no {missing[0].name}: use a 2D bundle "
                            f"({', '.join(BUNDLE_FOR_TASK.values())})")
    overrides = {**stage_overrides(stage, args, info), **parse_overrides(rest)}
    meta = bundle / "configs" / "metadata.json"
    print(f"tpp-monai {stage}: bundle {bundle.name} ({task}), {len(info['class_names'])} classes; writes "
          f"{STAGES[stage][1]} under {work}", flush=True)
    print(f"  = {command_line(configs, meta, overrides)}", flush=True)
    if overrides.get("backbone_ckpt", "") == "" and stage != "infer":
        print("  warning: no --backbone_ckpt: the ViT backbone is random (smoke tests only); pass the pre-trained "
              "checkpoint (MedCoSS / MAE / DINO / timm ViT)", file=sys.stderr, flush=True)
    work.mkdir(parents=True, exist_ok=True)
    if stage == "train":
        from tpp_monai.safe_io import atomic_write

        atomic_write(work / "workflow.json", json.dumps({**info, "bundle": str(bundle)}, indent=1))
    run(config_file=[str(c) for c in configs], meta_file=str(meta), **overrides)
    return 0


def run_prepare(args: argparse.Namespace) -> int:
    from tpp_monai.data.datalist import prepare_folder, write_datalist

    out = Path(args.out)
    dl = prepare_folder(args.folder, task=args.task, val_frac=args.val_frac, test_frac=args.test_frac,
                        seed=args.seed, binarize=args.binarize, mask_out=out.resolve().parent / "masks_binary",
                        class_names=args.class_names.split(",") if args.class_names else None,
                        verify=not args.no_verify)
    write_datalist(out, dl)
    print(f"task {dl['task']}, classes {dl['class_names']}; next: tpp-monai tpp --datalist {out} --workdir "
          f"{out.resolve().parent}")
    return 0


def add_workflow_commands(sub: argparse._SubParsersAction) -> None:
    """Register prepare / tpp / train / evaluate / infer on the ``tpp-monai`` parser."""
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser(
        "prepare", help="2D workflow 1/5: folder of images (+ masks / class folders) -> datalist with splits",
        formatter_class=fmt, epilog=EPILOG, allow_abbrev=False,
        description="Write the datalist JSON (docs/DATA_FORMAT.md) for your own images.\n"
                    "Classification: FOLDER/<class>/*.png (one sub-folder per class, sorted names = class 0, 1, ...).\n"
                    "Segmentation:   FOLDER/images/*.png + FOLDER/masks/*.png (same file stem; a mask holds one class\n"
                    "                index per pixel, 0 = background, or 0/255 for one foreground class).\n"
                    "Either may be split already into FOLDER/train, FOLDER/val, FOLDER/test; missing splits are held\n"
                    "out of train (stratified per class). Every image and mask is decoded and checked first.")
    p.add_argument("folder", help="the folder holding your images")
    p.add_argument("--out", required=True, help="datalist JSON to write (e.g. work/datalist.json)")
    p.add_argument("--task", choices=("auto", "cls", "seg"), default="auto",
                   help="cls or seg (default: seg when FOLDER has images/ and masks/)")
    p.add_argument("--val-frac", type=float, default=0.2, help="validation fraction if no val/ folder (%(default)s)")
    p.add_argument("--test-frac", type=float, default=0.2, help="test fraction if no test/ folder (%(default)s)")
    p.add_argument("--seed", type=int, default=0, help="split seed (%(default)s)")
    p.add_argument("--binarize", action="store_true",
                   help="segmentation: every non-zero mask value -> 1 (instance ids, 0/128/255 drawings); the "
                        "0/1 masks go to masks_binary/ beside --out")
    p.add_argument("--class-names", default="", help="comma-separated class names (default: folder names; "
                   "segmentation: background,class_1,...)")
    p.add_argument("--no-verify", action="store_true", help="skip decoding every image (faster, fewer checks)")
    help_of = {"tpp": "2D workflow 2/5: Target Parameter Pre-training (MAE) of the PEFT parameters on the training images",
               "train": "2D workflow 3/5: PEFT fine-tuning starting from the TPP target parameters",
               "evaluate": "2D workflow 4/5: metrics of the trained model on the test split",
               "infer": "2D workflow 5/5: predictions for new images (--input-dir) or the test split"}
    for stage, (configs, writes) in STAGES.items():
        p = sub.add_parser(
            stage, help=help_of[stage], formatter_class=fmt, epilog=EPILOG, allow_abbrev=False,
            description=f"{help_of[stage].split(': ', 1)[1]}.\nRuns monai.bundle.run on the bundle's "
                        f"{' + '.join(configs)} with the datalist, the classes and --bundle_root <workdir> filled "
                        f"in, and prints the equivalent `python -m monai.bundle run` line.\nWrites {writes}.\n"
                        "Every further --key value is passed to the bundle as an override.")
        p.add_argument("--workdir", required=True, help="work folder: models/, logs/, eval/, predictions/ go here")
        p.add_argument("--datalist", default="", help="datalist from `tpp-monai prepare`"
                       + (" (infer: optional, its test split)" if stage == "infer" else ""))
        p.add_argument("--bundle", default="", help="bundle name or folder (default: mhist_adapter_tpp for "
                       "classification, glas_adapter_tpp for segmentation; infer: the one train used)")
        if stage == "train":
            p.add_argument("--no-tpp", action="store_true", help="fine-tune from the default init (the baseline)")
        if stage == "infer":
            p.add_argument("--input-dir", default="", help="folder of new images to predict")


WORKFLOW_COMMANDS = ("prepare", *STAGES)


def run_workflow_command(args: argparse.Namespace, rest: Sequence[str]) -> int:
    """Run a workflow sub-command; bad input ends in one line naming the file and the fix (exit code 2)."""
    from tpp_monai.bundle.data import BundleDataError
    from tpp_monai.data.datalist import DatalistError

    try:
        if args.command == "prepare":
            if rest:
                raise WorkflowError(f"prepare takes no bundle overrides: {list(rest)}")
            return run_prepare(args)
        return run_stage(args.command, args, rest)
    except (WorkflowError, DatalistError, BundleDataError) as e:
        print(f"tpp-monai {args.command}: error: {e}", file=sys.stderr)
        return 2
