"""PEFT benchmark grid (Dutt et al. protocol, small): methods x datasets x seeds, with or without TPP.

Every cell is a bundle run: one arm of the study runner (:func:`tpp_monai.study.run_arm`), i.e. the bundle's
``train.json`` + ``evaluate.json`` in-process through ``monai.bundle.run`` (after its ``tpp_pretrain.json``,
:func:`tpp_monai.study.ensure_tpp`, for TPP cells). A cell's metric is therefore the metric that
``python -m monai.bundle run`` gives with the same overrides (``tests/test_benchmark_grid.py`` checks it
exactly): the backbone goes through the bundle's checkpoint converter and ``input_norm``, the head is the
bundle's, the schedule, clipping and resume are the bundle's. There is no training loop here.

One JSON/YAML spec describes the grid (see ``benchmarks/specs/tiny_grid.json``)::

    {"bundle": "bundles/mhist_adapter_tpp", "backbone_ckpt": "",
     "overrides": {"vit_size": "tiny", "image_size": 32, "vit_overrides": {"patch_size": 8, "depth": 2}},
     "methods": ["linear", {"name": "full", "train": {"lr": 3e-4}}, {"name": "adapter", "config": {"bottleneck": 8}}],
     "datasets": [{"name": "synthetic", "num_classes": 2, "n_train": 64, "n_val": 32},
                  {"name": "mhist", "datalist": "data/mhist/datalist.json", "num_classes": 2}],
     "seeds": [0, 1], "tpp": [false, true], "metric": "f1", "eval_split": "validation",
     "train": {"iterations": 30, "batch_size": 16, "lr": 1e-3},
     "tpp_train": {"epochs": 1, "batch_size": 16, "warmup_epochs": 0, "pretext": "mae"}}

* ``bundle``: a classification bundle (relative paths: to the working folder, else to the repository);
  ``backbone_ckpt``: the pre-trained backbone ("" : the bundle's seeded random ViT, smoke tests only).
* ``overrides``: bundle config ids for every cell (also per dataset and per method: ``"overrides"``);
  a method's ``config`` is the bundle's ``peft_config`` (absent: the bundle's per-method default).
* ``train``: ``iterations`` / ``batch_size`` / ``lr`` (absent ``lr``: the bundle's ``lr_per_method``), per
  method overridable; ``tpp_train``: ``epochs`` / ``batch_size`` / ``warmup_epochs`` / ``pretext`` of the TPP
  stage (its other options, e.g. ``tpp_lr`` or ``pretext_config``, are bundle ``overrides``).
* A dataset is a MONAI datalist (``{"training": [{"image": path, "label": int}], "validation": [...]}``) or
  ``synthetic*``: learnable toy PNGs written once under ``out/data/<name>`` (class ``c`` brightens quadrant
  ``c % 4`` of channel ``c % 3``). The metric is the bundle's evaluation of the *final* model on
  ``eval_split`` (default "validation"), in %.

Cells are the product methods x datasets x tpp x seeds in that order; ``cell.index`` is stable, so
``--cell i`` can run one cell as an independent job. Each finished cell writes
``out/cells/<cell_id>.json`` atomically; reruns skip cells whose file exists (resumable; the bundle runs
themselves resume too), and after every cell ``results.csv``, ``results.md`` (mean ± std over seeds and the
paired TPP effect with its bootstrap interval, :mod:`tpp_monai.reporting`, as the study reports it) and the
plots ``perf_vs_params.png`` / ``perf_vs_memory.png`` are rewritten from all cell files.

Cells the bundles cannot run are recorded, not run: ``status: "unsupported"`` for TPP cells of methods
without a TPP stage (full, linear, ``tpp_supported = False``) and for every cell of the methods the bundles
do not train (:data:`NOT_IN_BUNDLES`: SH-PEFT needs its importance mask and masked optimiser, FPT+ its side
network; ``tpp_monai.peft.sh_peft`` / ``fpt_plus`` and ``benchmarks/fpt_memory.py`` measure those).

Parameters: the bundle's own network (``network_def``), task head included. Memory: ``memory_mb`` is the peak
memory of the fine-tuning run (train + evaluate) above what the process held before it (CUDA
``max_memory_allocated``; CPU peak RSS via ``VmHWM``, approximate, see :mod:`tpp_monai.metrics.efficiency`).
"""

from __future__ import annotations

import copy
import csv
import io
import itertools
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from tpp_monai.safe_io import atomic_write
from tpp_monai.reporting import mean_std, paired_difference

REPO = Path(__file__).resolve().parents[2]
DEFAULT_BUNDLE = "bundles/mhist_adapter_tpp"
TPP_UNSUPPORTED = ("full", "linear")
#: methods the bundles do not fine-tune (why, for the cell's record)
NOT_IN_BUNDLES = {
    "sh_peft": "SH-PEFT needs its importance mask and masked optimiser, which the bundles do not build",
    "fpt_plus": "FPT+ trains a side network the bundles' classifier does not call",
}
METRICS = ("acc", "auc", "f1")
TRAIN_KEYS = ("iterations", "batch_size", "lr")
TPP_KEYS = {"epochs": "tpp_epochs", "batch_size": "tpp_batch_size", "warmup_epochs": "tpp_warmup_epochs",
            "pretext": "pretext"}
#: bundle ids the runner sets per cell (an override of them would be ignored or clash)
RUNNER_IDS = ("bundle_root", "dataset_dir", "datalist", "peft_method", "backbone_ckpt", "tpp_ckpt", "seed",
              "num_iterations", "batch_size", "val_interval", "model_ckpt", "run", "pretext", "tpp_epochs",
              "tpp_batch_size", "tpp_warmup_epochs", "num_workers")
CSV_FIELDS = [
    "cell", "index", "method", "dataset", "seed", "tpp", "status", "score", "metric", "acc", "auc", "f1",
    "trainable", "total", "param_percent", "memory_mb", "memory_method", "seconds", "error",
]


# ------------------------------------------------------------------------------ spec and cells
@dataclass
class Cell:
    index: int
    method: str
    method_config: dict
    dataset: dict
    seed: int
    tpp: bool
    train: dict = field(default_factory=dict)  # per-method overrides of spec["train"] (e.g. a learning rate)
    overrides: dict = field(default_factory=dict)  # per-method bundle overrides

    @property
    def label(self) -> str:
        return self.method_config.get("label", self.method) if isinstance(self.method_config, dict) else self.method

    @property
    def cell_id(self) -> str:
        return f"{self.index:04d}__{self.label}__{self.dataset['name']}__{'tpp' if self.tpp else 'notpp'}__s{self.seed}"


def load_spec(spec: str | os.PathLike | dict) -> dict:
    if isinstance(spec, dict):
        return copy.deepcopy(spec)
    text = Path(spec).read_text()
    if str(spec).endswith((".yaml", ".yml")):
        import yaml

        return yaml.safe_load(text)
    return json.loads(text)


def _method_entry(m: Any) -> tuple[str, dict, dict, dict]:
    if isinstance(m, str):
        return m, {}, {}, {}
    if isinstance(m, dict) and "name" in m:
        cfg = dict(m.get("config", {}))
        if "label" in m:
            cfg["label"] = m["label"]
        return m["name"], cfg, dict(m.get("train", {})), dict(m.get("overrides", {}))
    raise ValueError(f"method entries are names or {{'name', 'config', 'train', 'overrides'}} dicts; got {m!r}")


def expand_cells(spec: dict) -> list[Cell]:
    methods = [_method_entry(m) for m in spec["methods"]]
    datasets = spec["datasets"]
    for d in datasets:
        if "name" not in d:
            raise ValueError(f"dataset entries need a 'name': {d!r}")
    tpp = spec.get("tpp", [False])
    tpp = [bool(t) for t in (tpp if isinstance(tpp, list) else [tpp])]
    seeds = [int(s) for s in spec.get("seeds", [0])]
    cells = []
    for i, ((m, cfg, tr, ov), d, t, s) in enumerate(itertools.product(methods, datasets, tpp, seeds)):
        cells.append(Cell(i, m, cfg, d, s, t, tr, ov))
    return cells


# ------------------------------------------------------------------------------ data
def _quadrant_images(num_classes: int, n: int, size: int, noise: float, g: Any) -> tuple[Any, list[int]]:
    import torch

    y = torch.randint(0, num_classes, (n,), generator=g)
    x = noise * torch.randn(n, 3, size, size, generator=g)
    h = size // 2
    for i, c in enumerate(y.tolist()):
        q = c % 4
        r, col = (q // 2) * h, (q % 2) * h
        x[i, c % 3, r:r + h, col:col + h] += 1.5
    return (127.5 + 40.0 * x).round().clamp(0, 255).to(torch.uint8), y.tolist()


def write_synthetic_dataset(root: str | os.PathLike, num_classes: int = 2, n_train: int = 64, n_val: int = 32,
                            image_size: int = 32, seed: int = 0, noise: float = 1.0) -> Path:
    """Learnable toy RGB PNGs and their datalist (``training``, ``validation``, ``test`` = ``validation``)
    under ``root``; written once (re-used while ``root/settings.json``, written last and atomically, matches:
    an interrupted write is redone). Returns the datalist."""
    import torch
    from PIL import Image

    root = Path(root)
    settings = {"num_classes": num_classes, "n_train": n_train, "n_val": n_val, "image_size": image_size,
                "seed": seed, "noise": noise, "format": 1}
    datalist, stamp = root / "datalist.json", root / "settings.json"
    if datalist.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == settings:
        return datalist
    g = torch.Generator().manual_seed(seed)
    lists: dict[str, list[dict]] = {}
    for split, n in (("training", n_train), ("validation", n_val)):
        images, labels = _quadrant_images(num_classes, n, image_size, noise, g)
        lists[split] = []
        for i, (img, lab) in enumerate(zip(images, labels)):
            name = f"{split}/{i:04d}.png"
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(root / name, format="PNG")  # valid once stamped
            lists[split].append({"image": name, "label": int(lab)})
    lists["test"] = lists["validation"]
    atomic_write(datalist, json.dumps(lists, indent=1))
    atomic_write(stamp, json.dumps(settings))
    return datalist


def dataset_files(ds: dict, spec: dict, out_dir: str | os.PathLike) -> tuple[Path, int]:
    """The dataset's datalist (synthetic ones written first) and its number of classes."""
    if ds.get("datalist"):
        p = Path(ds["datalist"])
        if not p.is_file():
            raise FileNotFoundError(f"dataset {ds['name']!r}: datalist {p} not found; prepare it first "
                                    "(scripts/prepare_<dataset>.py) or fix the spec's path")
        k = ds.get("num_classes")
        if k is None:
            lists = json.loads(p.read_text())
            k = 1 + max(int(e["label"]) for split in ("training", "validation") for e in lists.get(split, []))
        return p, int(k)
    if ds.get("kind", ds["name"]).startswith("synthetic"):
        k = int(ds.get("num_classes", 2))
        size = int(ds.get("image_size", spec.get("overrides", {}).get("image_size", 224)))
        p = write_synthetic_dataset(Path(out_dir) / "data" / ds["name"], k, int(ds.get("n_train", 64)),
                                    int(ds.get("n_val", 32)), size, int(ds.get("seed", 0)),
                                    float(ds.get("noise", 1.0)))
        return p, k
    raise ValueError(f"dataset {ds['name']!r}: give a 'datalist' JSON path or name it synthetic*")


# ------------------------------------------------------------------------------ cells as bundle runs
def bundle_dir(spec: dict) -> Path:
    """The spec's bundle folder (relative: to the working folder, else to the repository)."""
    b = Path(spec.get("bundle", DEFAULT_BUNDLE))
    if not b.is_absolute() and not (b / "configs").is_dir():
        b = REPO / b
    if not (b / "configs" / "train.json").is_file():
        raise FileNotFoundError(f"the grid's bundle {b} has no configs/train.json; set \"bundle\" in the spec to a "
                                "classification bundle folder, e.g. bundles/mhist_adapter_tpp")
    return b.resolve()


def _checked_overrides(where: str, overrides: dict) -> dict:
    clash = sorted(set(overrides) & set(RUNNER_IDS))
    if clash:
        raise ValueError(f"the grid spec's {where} overrides {clash}, which the grid sets per cell; use "
                         "'train' (iterations, batch_size, lr), 'tpp_train' (epochs, batch_size, warmup_epochs, "
                         "pretext), 'seeds' or 'backbone_ckpt' instead")
    return dict(overrides)


def cell_study_spec(cell: Cell, spec: dict, out_dir: str | os.PathLike) -> Any:
    """The :class:`~tpp_monai.study.StudySpec` whose arm ``(1.0, cell.seed, init)`` is this cell."""
    from tpp_monai.study import StudySpec

    datalist, k = dataset_files(cell.dataset, spec, out_dir)
    train = {**spec.get("train", {}), **cell.train}
    tpp = dict(spec.get("tpp_train", {}))
    for where, keys, given in (("train", TRAIN_KEYS, train), ("tpp_train", tuple(TPP_KEYS), tpp)):
        unknown = sorted(set(given) - set(keys))
        if unknown:
            raise ValueError(f"the grid spec's {where!r} has {unknown}; it takes {list(keys)} (other bundle "
                             "settings go in 'overrides', under their bundle ids)")
    overrides = {"num_classes": k, "class_names": [f"class_{i}" for i in range(k)],
                 "eval_split": spec.get("eval_split", "validation"),
                 **_checked_overrides("overrides", spec.get("overrides", {})),
                 **_checked_overrides(f"dataset {cell.dataset['name']!r}", cell.dataset.get("overrides", {})),
                 **_checked_overrides(f"method {cell.label!r}", cell.overrides)}
    peft_config = {k_: v for k_, v in cell.method_config.items() if k_ != "label"}
    if peft_config:
        overrides["peft_config"] = peft_config
    if spec.get("device"):
        overrides["device"] = f"$torch.device({str(spec['device'])!r})"
    iterations = int(train.get("iterations", 30))
    return StudySpec(
        bundle=str(bundle_dir(spec)), dataset_dir=str(datalist.parent), datalist=str(datalist),
        work=str(Path(out_dir) / "work" / cell.cell_id), fractions=(1.0,), seeds=(cell.seed,),
        peft_method=cell.method, pretext=str(tpp.get("pretext", "mae")), iterations=iterations,
        batch_size=int(train.get("batch_size", 16)), val_every=iterations,  # validate once, at the end
        tpp_epochs=int(tpp.get("epochs", 1)), tpp_batch_size=tpp.get("batch_size"),
        tpp_warmup_epochs=tpp.get("warmup_epochs"), lr=train.get("lr"),
        backbone_ckpt=str(spec.get("backbone_ckpt") or ""), metrics=METRICS, overrides=overrides)


def tpp_supported(method: str) -> bool:
    """False for methods without a TPP stage (``TPP_UNSUPPORTED`` or ``tpp_supported = False``)."""
    from tpp_monai.peft import PEFT_METHODS

    if method in TPP_UNSUPPORTED:
        return False
    return method not in PEFT_METHODS or bool(getattr(PEFT_METHODS.get(method), "tpp_supported", True))


def run_cell(cell: Cell, spec: dict, out_dir: str | os.PathLike) -> dict:
    """Run one cell through the bundle (TPP stage, fine-tuning, evaluation); returns its result row."""
    from tpp_monai.bundle.networks import trainable_report
    from tpp_monai.metrics.efficiency import PeakMemory
    from tpp_monai.study import bundle_network, ensure_tpp, run_arm

    t0 = time.perf_counter()
    row: dict[str, Any] = {
        "cell": cell.cell_id, "index": cell.index, "method": cell.label, "dataset": cell.dataset["name"],
        "seed": cell.seed, "tpp": cell.tpp, "metric": spec.get("metric", "f1"), "status": "ok", "error": "",
    }
    if cell.method in NOT_IN_BUNDLES:
        row.update(status="unsupported", error=f"not run by the bundles: {NOT_IN_BUNDLES[cell.method]}")
        return row
    if cell.tpp and not tpp_supported(cell.method):
        row.update(status="unsupported", error=f"'{cell.method}' has no target parameters for a TPP stage")
        return row
    if row["metric"] not in METRICS:
        raise ValueError(f"the grid spec's metric {row['metric']!r} is not one of {list(METRICS)}")
    s = cell_study_spec(cell, spec, out_dir)
    backbone = s.backbone_ckpt
    if cell.tpp:
        ensure_tpp(s, backbone, cell.seed)  # outside the memory measurement: it is the fine-tuning's
    import torch

    device = torch.device(spec.get("device", "cpu"))
    with PeakMemory(device, cpu_method="rss") as pm:
        rec = run_arm(s, backbone, 1.0, cell.seed, "tpp" if cell.tpp else "random")
    rep = trainable_report(bundle_network(s, backbone_ckpt=backbone, seed=cell.seed))
    row.update(score=rec[row["metric"]], **{m: rec[m] for m in METRICS}, trainable=int(rep["trainable"]),
               total=int(rep["total"]), param_percent=rep["ratio_percent"], memory_mb=pm.peak_mb,
               memory_method=pm.method, seconds=time.perf_counter() - t0)
    return row


# ------------------------------------------------------------------------------ grid
def cell_path(out_dir: str | os.PathLike, cell: Cell) -> Path:
    return Path(out_dir) / "cells" / f"{cell.cell_id}.json"


def run_grid(spec: str | os.PathLike | dict, out_dir: str | os.PathLike, cells: Sequence[int] | None = None,
             rerun_failed: bool = True, log: Callable[[str], None] = print) -> list[str]:
    """Run the (selected) cells not finished yet, rewriting the reports after each; returns the cell ids run."""
    spec = load_spec(spec)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "spec.json", json.dumps(spec, indent=1))
    all_cells = expand_cells(spec)
    todo = all_cells if cells is None else [all_cells[i] for i in cells]
    ran = []
    for cell in todo:
        path = cell_path(out, cell)
        if path.is_file():
            prev = json.loads(path.read_text())
            if prev.get("status") != "error" or not rerun_failed:
                continue
        log(f"[grid] cell {cell.index + 1}/{len(all_cells)}: {cell.cell_id}")
        try:
            row = run_cell(cell, spec, out)
        except Exception as e:  # keep going; the error is recorded and the cell reruns next time
            row = {"cell": cell.cell_id, "index": cell.index, "method": cell.label, "dataset": cell.dataset["name"],
                   "seed": cell.seed, "tpp": cell.tpp, "status": "error", "error": f"{type(e).__name__}: {e}"}
            log(f"[grid]   failed: {row['error']}")
        atomic_write(path, json.dumps(row, indent=1))
        ran.append(cell.cell_id)
        write_reports(out, spec)
    if not ran:
        write_reports(out, spec)
    return ran


def collect(out_dir: str | os.PathLike) -> list[dict]:
    rows = [json.loads(p.read_text()) for p in sorted((Path(out_dir) / "cells").glob("*.json"))]
    return sorted(rows, key=lambda r: r["index"])


def summarise(rows: list[dict]) -> list[dict]:
    """One entry per (method, tpp): per-dataset mean/std of the score over seeds, params %, memory."""
    ok = [r for r in rows if r.get("status") == "ok"]
    groups: dict[tuple[str, bool], list[dict]] = {}
    for r in ok:
        groups.setdefault((r["method"], bool(r["tpp"])), []).append(r)
    out = []
    for (m, t), rs in groups.items():
        per_ds = {}
        for ds in dict.fromkeys(r["dataset"] for r in rs):
            per_ds[ds] = mean_std([r["score"] for r in rs if r["dataset"] == ds])
        out.append({
            "method": m, "tpp": t, "per_dataset": per_ds,
            "avg": sum(v[0] for v in per_ds.values()) / len(per_ds),
            "param_percent": sum(r["param_percent"] for r in rs) / len(rs),
            "memory_mb": sum(r["memory_mb"] for r in rs) / len(rs),
        })
    return out


def tpp_effects(rows: list[dict]) -> list[dict]:
    """Per (method, dataset): the paired TPP - no-TPP difference of the score over the seeds that have both."""
    by = {(r["method"], r["dataset"], bool(r["tpp"]), r["seed"]): r["score"] for r in rows if r.get("status") == "ok"}
    out = []
    for m, ds in dict.fromkeys((k[0], k[1]) for k in by):
        seeds = sorted(s for (m_, d_, t, s) in by if (m_, d_, t) == (m, ds, False) and (m, ds, True, s) in by)
        if seeds:
            d = paired_difference([by[(m, ds, False, s)] for s in seeds], [by[(m, ds, True, s)] for s in seeds])
            out.append({"method": m, "dataset": ds, "seeds": seeds, "diff": d})
    return out


def markdown_table(rows: list[dict], metric: str = "f1") -> str:
    summ = summarise(rows)
    datasets = list(dict.fromkeys(r["dataset"] for r in rows if r.get("status") == "ok"))
    head = ["Method", "TPP", "Params (%)", "Mem (MB)"] + datasets + ["Avg"]
    lines = [f"{metric.upper()} (%) of the bundle runs, mean ± std over seeds", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    for s in summ:
        cells = [s["method"], "✓" if s["tpp"] else "", f"{s['param_percent']:.2f}", f"{s['memory_mb']:.1f}"]
        for ds in datasets:
            cells.append(f"{s['per_dataset'][ds][0]:.2f} ± {s['per_dataset'][ds][1]:.2f}" if ds in s["per_dataset"] else "-")
        cells.append(f"{s['avg']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    effects = tpp_effects(rows)
    if effects:
        lines += ["", f"TPP effect on {metric.upper()} (TPP - no TPP, paired by seed; 95% bootstrap interval)", "",
                  "| Method | Dataset | seeds | paired diff | 95% CI | TPP better |", "|---|---|---:|---:|---|---:|"]
        for e in effects:
            d = e["diff"]
            lines.append(f"| {e['method']} | {e['dataset']} | {d.n} | {d.mean:+.2f} | [{d.lo:+.2f}, {d.hi:+.2f}] | "
                         f"{d.better}/{d.n} |")
    other = [r for r in rows if r.get("status") != "ok"]
    if other:
        lines += ["", "Cells not reported: " + "; ".join(f"{r['cell']} ({r['status']})" for r in other)]
    return "\n".join(lines) + "\n"


def _plot(summ: list[dict], key: str, xlabel: str, path: Path, metric: str, log_x: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for s in summ:
        x = max(s[key], 1e-4) if log_x else s[key]
        ax.scatter([x], [s["avg"]], marker="*" if s["tpp"] else "o", s=60)
        ax.annotate(s["method"] + (" +TPP" if s["tpp"] else ""), (x, s["avg"]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"average {metric.upper()} (%)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)


def write_reports(out_dir: str | os.PathLike, spec: dict) -> dict[str, Path]:
    """Rewrite ``results.csv``, ``results.md`` and the two plots from the cell files."""
    out = Path(out_dir)
    rows = collect(out)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow(r)
    paths = {"csv": out / "results.csv", "md": out / "results.md",
             "params_png": out / "perf_vs_params.png", "memory_png": out / "perf_vs_memory.png"}
    atomic_write(paths["csv"], buf.getvalue())
    metric = spec.get("metric", "f1")
    atomic_write(paths["md"], markdown_table(rows, metric))
    summ = summarise(rows)
    _plot(summ, "param_percent", "trainable parameters (%)", paths["params_png"], metric, log_x=True)
    _plot(summ, "memory_mb", "peak training memory (MB)", paths["memory_png"], metric, log_x=False)
    return paths
