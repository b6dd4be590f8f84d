#!/usr/bin/env python
"""Reproduce one row of the TPP paper end to end through the bundles and print it beside the published value.

    python scripts/reproduce.py --dataset qata --method adapter --tpp mae \\
        --dataset_dir /data/qata --backbone_ckpt /models/medcoss_checkpoint-299.pth --allow_pickle

Stages (each one ``monai.bundle.run`` call, the same as the commands in docs/REPRODUCING.md, which
``--dry_run`` prints): (1) TPP with ``--tpp mae|dino`` (skipped for ``--tpp none``), (2) fine-tuning with the
TPP checkpoint, (3) evaluation on the test split -> ``<work_dir>/eval/metrics.json``; then a table of the
measured test metrics (%, HD95 in pixels) beside the published ones (MedCoSS backbone, TPP paper Tables 3-5, 9).

``--quick``: a smoke run (ViT-Tiny depth 2, 32 px, random backbone unless ``--backbone_ckpt`` is given, one
TPP epoch, 2 fine-tuning iterations) on a tiny synthetic dataset written to ``<work_dir>/data`` unless
``--dataset_dir`` is given.  Its numbers say nothing about the paper: it checks that the row's pipeline runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

DATASETS = {  # bundle, task, number of classes (background included for segmentation)
    "mhist": ("mhist_adapter_tpp", "cls", 2),
    "oct_c8": ("oct_c8_adapter_tpp", "cls", 8),
    "chestxray_pa": ("chestxray_pa_adapter_tpp", "cls", 3),
    "glas": ("glas_adapter_tpp", "seg", 2),
    "qata": ("qata_adapter_tpp", "seg", 2),
}
ALIASES = {"oct": "oct_c8", "cxr": "chestxray_pa", "chestxray": "chestxray_pa"}
METRICS = {"cls": ("acc", "auc", "f1"), "seg": ("dice", "hd95")}
METHODS = ("full", "linear", "evp", "vpt", "ssf", "bitfit", "adapter", "adaptformer", "dtl")

#: Published test results with the MedCoSS ViT-B backbone (TPP paper Tables 3 and 4, via /work/shared/METHOD.md):
#: cls datasets ACC/AUC/F1 (%), seg datasets Dice (%) / HD95 (pixels).  Key: (method, tpp, backbone).
_COLS = ("mhist", "oct_c8", "chestxray_pa", "glas", "qata")
_ROWS = {
    ("full", "none"): ((83.11, 89.78, 81.60), (94.54, 99.64, 94.53), (93.33, 98.97, 93.34), (88.84, 47.41), (78.63, 29.54)),
    ("linear", "none"): ((68.99, 77.08, 66.46), (59.96, 92.64, 59.42), (74.97, 97.45, 70.03), (86.56, 61.85), (73.62, 39.46)),
    ("evp", "none"): ((73.69, 81.34, 71.82), (91.32, 99.34, 91.31), (94.75, 99.21, 94.72), (88.94, 49.10), (78.24, 31.67)),
    ("vpt", "none"): ((72.98, 79.84, 71.35), (89.32, 99.04, 89.25), (84.81, 95.33, 84.58), (86.27, 52.23), (77.03, 33.43)),
    ("ssf", "none"): ((82.29, 89.29, 80.85), (88.68, 98.93, 88.66), (88.20, 97.78, 87.81), (87.64, 54.49), (78.28, 30.53)),
    ("bitfit", "none"): ((82.40, 89.60, 80.86), (87.18, 98.81, 87.13), (87.65, 98.19, 87.18), (87.56, 58.58), (77.99, 32.30)),
    ("adapter", "none"): ((81.58, 89.09, 80.16), (95.36, 99.74, 95.36), (94.54, 99.50, 94.48), (88.98, 49.06), (78.61, 29.91)),
    ("adaptformer", "none"): ((66.02, 74.30, 65.07), (82.32, 98.11, 82.37), (79.23, 92.77, 78.95), (86.62, 61.43), (74.97, 36.23)),
    ("dtl", "none"): ((77.48, 84.85, 75.09), (89.79, 99.13, 89.81), (90.71, 98.40, 90.51), (87.52, 55.11), (73.99, 38.29)),
    ("adapter", "mae"): ((83.42, 91.38, 82.21), (96.61, 99.77, 96.61), (97.38, 99.63, 97.37), (89.41, 44.25), (79.50, 29.28)),
}
PUBLISHED: dict[tuple[str, str, str, str], dict[str, float]] = {
    (method, tpp, "medcoss", ds): dict(zip(METRICS[DATASETS[ds][1]], vals))
    for (method, tpp), row in _ROWS.items() for ds, vals in zip(_COLS, row)
}
# Table 9 (Path_DINO backbone, Adapter, MHIST): only the ACC is quoted in METHOD.md.
PUBLISHED[("adapter", "none", "path_dino", "mhist")] = {"acc": 82.91}
PUBLISHED[("adapter", "mae", "path_dino", "mhist")] = {"acc": 85.67}

#: Rough single-GPU hours (fine-tuning, TPP) for a ViT-B/16 on one H100-class GPU at fp32/TF32 speed; an ESTIMATE
#: from the iteration counts and image sizes (docs/REPRODUCING.md explains it), not a measurement.
GPU_HOURS_ESTIMATE = {"mhist": (0.1, 0.2), "oct_c8": (1.1, 1.8), "chestxray_pa": (0.1, 0.4),
                      "glas": (0.5, 0.2), "qata": (0.4, 1.2)}

QUICK = {"vit_size": "tiny", "vit_overrides": {"depth": 2}, "image_size": 32, "num_workers": 0, "batch_size": 2,
         "num_iterations": 2, "val_interval": 1, "tpp_epochs": 1, "tpp_batch_size": 4}


def published(dataset: str, method: str, tpp: str, backbone: str = "medcoss") -> dict[str, float]:
    """The paper's test metrics for a row, {} when METHOD.md does not quote it."""
    return dict(PUBLISHED.get((method, tpp, backbone, dataset), {}))


def plan(dataset: str, method: str, tpp: str, work_dir: Path, overrides: dict) -> list[tuple[str, list[str], dict]]:
    """The row's stages: (title, config files relative to the repository root, overrides)."""
    bundle = DATASETS[dataset][0]
    cfg = f"bundles/{bundle}/configs"
    work = str(work_dir)
    common = {"bundle_root": work, "peft_method": method, **overrides}
    tpp_ckpt = str(work_dir / "models" / "tpp_target_params.pt") if tpp != "none" else ""
    stages = []
    if tpp != "none":
        stages.append((f"TPP ({tpp})", [f"{cfg}/train.json", f"{cfg}/tpp_pretrain.json"], {**common, "pretext": tpp}))
    stages.append(("fine-tuning", [f"{cfg}/train.json"], {**common, "tpp_ckpt": tpp_ckpt}))
    stages.append(("evaluation (test)", [f"{cfg}/train.json", f"{cfg}/evaluate.json"], dict(common)))
    return stages


def command(files: list[str], overrides: dict) -> str:
    """The equivalent shell command of one stage."""
    cfg = files[0] if len(files) == 1 else '"[' + ",".join(f"'{f}'" for f in files) + ']"'
    parts = ["python", "-m", "monai.bundle", "run", "--config_file", cfg]
    for k, v in overrides.items():
        parts += [f"--{k}", shlex.quote(v if isinstance(v, str) else repr(v))]  # fire parses Python literals
    return " ".join(parts)


def make_synthetic(dataset: str, out: Path, n_train: int = 6, n_eval: int = 2, size: int = 40) -> Path:
    """A tiny dataset in the bundles' datalist format: class-dependent brightness (cls) or squares (seg)."""
    import numpy as np
    from PIL import Image

    from tpp_monai.data.datalist import write_datalist

    _, task, k = DATASETS[dataset]
    rng = np.random.default_rng(0)
    dl: dict[str, list[dict]] = {}
    for split, n in (("training", n_train), ("validation", n_eval), ("test", n_eval)):
        rows = []
        for i in range(n * (k if task == "cls" else 1)):
            img = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
            path = out / split / f"img_{i:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            if task == "cls":
                img += np.uint8(190 * (i % k) // max(1, k - 1))
                Image.fromarray(img).save(path)
                rows.append({"image": str(path), "label": int(i % k)})
            else:
                mask = np.zeros((size, size), np.uint8)
                r, c = rng.integers(2, size // 2, 2)
                mask[r:r + size // 3, c:c + size // 3] = 255
                img[mask > 0] += 150
                Image.fromarray(img).save(path)
                mpath = out / split / f"img_{i:03d}_mask.png"
                Image.fromarray(mask).save(mpath)
                rows.append({"image": str(path), "label": str(mpath)})
        dl[split] = rows
    write_datalist(out / "datalist.json", dl, verbose=False)
    return out


def report(dataset: str, method: str, tpp: str, backbone: str, measured: dict[str, float]) -> str:
    """Markdown table: measured test metrics beside the published ones."""
    task = DATASETS[dataset][1]
    pub = published(dataset, method, tpp, backbone)
    lines = [f"{dataset} | {method} | TPP {tpp} | backbone {backbone}", "", "| metric | measured | published |",
             "|---|---|---|"]
    for m in METRICS[task]:
        unit = 1.0 if m == "hd95" else 100.0
        got = measured.get(m)
        got_s = "n/a" if got is None else f"{unit * got:.2f}"
        lines.append(f"| {m}{' (px)' if m == 'hd95' else ' (%)'} | {got_s} | {pub.get(m, 'not quoted'):} |")
    ft, tp = GPU_HOURS_ESTIMATE[dataset]
    lines.append("")
    lines.append(f"expected GPU time at full scale (estimate): fine-tuning ~{ft} h"
                 + (f", TPP ~{tp} h" if tpp != "none" else "") + " on one H100-class GPU")
    return "\n".join(lines)


def run(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", required=True, help=f"one of {sorted(DATASETS)}")
    p.add_argument("--method", default="adapter", choices=METHODS)
    p.add_argument("--tpp", default="mae", choices=("mae", "dino", "none"))
    p.add_argument("--backbone", default="medcoss", choices=("medcoss", "path_dino"),
                   help="which published row to compare with (the weights come from --backbone_ckpt)")
    p.add_argument("--dataset_dir", default=None, help="folder with datalist.json (scripts/prepare_<dataset>.py)")
    p.add_argument("--backbone_ckpt", default=None, help="pre-trained ViT (MedCoSS checkpoint-299.pth, ...)")
    p.add_argument("--allow_pickle", action="store_true", help="legacy pickled checkpoints (MedCoSS .pth): trusted only")
    p.add_argument("--work_dir", default=None, help="outputs (default: runs/reproduce/<dataset>_<method>_<tpp>)")
    p.add_argument("--quick", action="store_true", help="tiny smoke run (see the module docstring)")
    p.add_argument("--dry_run", action="store_true", help="print the commands only")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    a = p.parse_args(argv)
    dataset = ALIASES.get(a.dataset.lower(), a.dataset.lower())
    if dataset not in DATASETS:
        p.error(f"unknown --dataset {a.dataset!r}; choose from {sorted(DATASETS)}")
    if a.tpp != "none" and a.method in ("full", "linear"):
        p.error(f"--method {a.method} has no target parameters to pre-train: use --tpp none")
    work = Path(a.work_dir or ROOT / "runs" / "reproduce" / f"{dataset}_{a.method}_{a.tpp}").resolve()
    over: dict = dict(QUICK) if a.quick else {}
    if a.quick and dataset == "glas":
        over["val_interval"] = 1
    data_dir = a.dataset_dir
    if data_dir is None and a.quick and not a.dry_run:
        data_dir = str(make_synthetic(dataset, work / "data"))
    if data_dir is None:
        if not a.dry_run:
            p.error("--dataset_dir is required (the folder holding datalist.json; see docs/REPRODUCING.md)")
        data_dir = f"/data/{dataset}"
    over["dataset_dir"] = str(data_dir)
    over["backbone_ckpt"] = a.backbone_ckpt or ""
    if a.allow_pickle:
        over["allow_pickle"] = True
    if not a.backbone_ckpt and not a.quick and not a.dry_run:
        p.error("--backbone_ckpt is required for a real run (or use --quick for a random-backbone smoke run)")
    stages = plan(dataset, a.method, a.tpp, work, over)
    if a.dry_run:
        for title, files, o in stages:
            print(f"# {title}\n{command(files, o)}")
        return {}
    os.chdir(ROOT)  # bundle_root resolves to bundles/<name> from the repository root
    import torch
    from monai.bundle import run as bundle_run

    torch.set_num_threads(a.threads or min(2, os.cpu_count() or 1))
    for title, files, o in stages:
        print(f"\n=== {title}: {command(files, o)}", flush=True)
        t0 = time.time()
        bundle_run(config_file=files, meta_file=files[0].replace("train.json", "metadata.json"), **o)
        print(f"=== {title}: {time.time() - t0:.0f} s", flush=True)
    measured = json.loads((work / "eval" / "metrics.json").read_text())
    print("\n" + report(dataset, a.method, a.tpp, a.backbone, measured))
    if a.quick:
        print("(--quick: a smoke run on tiny data with a tiny model; the measured numbers are not comparable)")
    return measured


def main(argv: list[str] | None = None) -> int:
    try:
        run(argv)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
