"""PEFT benchmark grid (Dutt et al. protocol, small): methods x datasets x seeds, with or without TPP.

One JSON/YAML spec describes the grid (see ``benchmarks/specs/tiny_grid.json``)::

    {"backbone": {"size": "tiny", "img_size": 32, "patch_size": 8, "depth": 2, "checkpoint": null},
     "methods": ["adapter", {"name": "sh_peft", "config": {"top_percent": 1.0}},
                 {"name": "full", "train": {"lr": 1e-4}}],
     "datasets": [{"name": "synthetic", "num_classes": 2, "n_train": 64, "n_val": 32},
                  {"name": "mhist", "datalist": "data/mhist.json", "num_classes": 2}],
     "seeds": [0, 1], "tpp": [false, true], "metric": "f1",
     "train": {"iterations": 30, "batch_size": 16, "lr": 1e-3, "weight_decay": 0.05},
     "tpp_train": {"iterations": 10, "batch_size": 16, "lr": 1.5e-4}}

Cells are the product methods x datasets x tpp x seeds in that order; ``cell.index`` is stable, so
``--cell i`` can run one cell as an independent job. Each finished cell writes
``out/cells/<cell_id>.json`` atomically; reruns skip cells whose file exists (resumable), and after
every cell ``results.csv``, ``results.md`` (mean ± std over seeds, papers' style) and the plots
``perf_vs_params.png`` / ``perf_vs_memory.png`` are rewritten from all cell files.

Cell runner: a ViT (from scratch, or ``backbone.checkpoint``: a state dict / ``{"model"|"state_dict"}``
file), the PEFT method, a linear head on the class token, ``train.iterations`` AdamW iterations on
random mini-batches, metrics ACC / AUC / macro-F1 on the validation split (in %).
"full" and "linear" fall back to built-in handling when no such PEFT method is registered;
"sh_peft" estimates the importance with the task loss over one epoch of the training split (or
``config.importance_batches`` batches) and trains with the paper's optimiser
(:func:`~tpp_monai.peft.sh_peft.build_sh_optimizer`: masked SGD lr 1e-3 with a cosine schedule;
``config.optimizer: "adamw"`` for :class:`~tpp_monai.peft.sh_peft.MaskedAdamW`; a cell's ``train.lr`` wins); "fpt_plus" trains an
:class:`~tpp_monai.peft.fpt_plus.FPTPlusClassifier` (frozen branch at ``img_size``).

TPP cells call ``tpp_hook(backbone, cell, spec, train_images, work_dir)`` before fine-tuning; the
default hook is :func:`default_tpp_hook` (``tpp_monai.tpp.tpp_pretrain`` with MAE, the method's
target parameters stay in the backbone). Methods whose targets TPP cannot pre-train here (full,
linear, and methods with ``tpp_supported = False``: sh_peft, fpt_plus) are recorded with
``status: "unsupported"``.

Memory: ``memory_mb`` is the peak memory during training above what was held once the model was
built (CUDA ``max_memory_allocated``; CPU peak RSS via ``VmHWM``, approximate in a long process, see
:mod:`tpp_monai.metrics.efficiency`).
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

import torch
import torch.nn.functional as F
from torch import nn

from tpp_monai.safe_io import atomic_write
from tpp_monai.study import mean_std

TPP_UNSUPPORTED = ("full", "linear", "sh_peft", "fpt_plus")
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


def _method_entry(m: Any) -> tuple[str, dict, dict]:
    if isinstance(m, str):
        return m, {}, {}
    if isinstance(m, dict) and "name" in m:
        cfg = dict(m.get("config", {}))
        if "label" in m:
            cfg["label"] = m["label"]
        return m["name"], cfg, dict(m.get("train", {}))
    raise ValueError(f"method entries are names or {{'name', 'config'}} dicts; got {m!r}")


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
    for i, ((m, cfg, tr), d, t, s) in enumerate(itertools.product(methods, datasets, tpp, seeds)):
        cells.append(Cell(i, m, cfg, d, s, t, tr))
    return cells


# ------------------------------------------------------------------------------ data
@dataclass
class Split:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    num_classes: int


def synthetic_dataset(num_classes: int = 2, n_train: int = 64, n_val: int = 32, img_size: int = 32,
                      in_chans: int = 3, seed: int = 0, noise: float = 1.0) -> Split:
    """Learnable toy images: class c brightens quadrant ``c % 4`` of channel ``c % in_chans`` plus noise."""
    g = torch.Generator().manual_seed(seed)

    def make(n):
        y = torch.randint(0, num_classes, (n,), generator=g)
        x = noise * torch.randn(n, in_chans, img_size, img_size, generator=g)
        h = img_size // 2
        for i, c in enumerate(y.tolist()):
            q = c % 4
            r, col = (q // 2) * h, (q % 2) * h
            x[i, c % in_chans, r:r + h, col:col + h] += 1.5
        return x, y

    xt, yt = make(n_train)
    xv, yv = make(n_val)
    return Split(xt, yt, xv, yv, num_classes)


def datalist_dataset(path: str | os.PathLike, img_size: int, in_chans: int = 3, num_classes: int | None = None,
                     train_key: str = "training", val_key: str = "validation", image_key: str = "image",
                     label_key: str = "label", max_items: int | None = None) -> Split:
    """A MONAI datalist JSON (``{"training": [{"image": path, "label": int}], "validation": [...]}``),
    loaded with MONAI, scaled to [0, 1] and resized to ``img_size``; grey images are repeated to 3 channels."""
    from monai.transforms import Compose, EnsureChannelFirst, LoadImage, Resize, ScaleIntensity

    from tpp_monai.data.transforms import upright_image_reader

    lists = json.loads(Path(path).read_text())
    base = Path(path).parent
    tf = Compose([LoadImage(reader=upright_image_reader(), image_only=True), EnsureChannelFirst(), ScaleIntensity(),
                  Resize((img_size, img_size))])

    def load(items):
        xs, ys = [], []
        for it in items[:max_items]:
            p = Path(it[image_key])
            img = torch.as_tensor(tf(str(p if p.is_absolute() else base / p))).float()
            if img.ndim == 4:  # (C, H, W, 1)
                img = img[..., 0]
            if img.shape[0] != in_chans:
                img = img[:1].repeat(in_chans, 1, 1) if img.shape[0] in (1, 4) and in_chans == 3 else img[:in_chans]
            xs.append(img)
            lab = it[label_key]
            ys.append(int(lab if not isinstance(lab, (list, tuple)) else max(range(len(lab)), key=lambda i: lab[i])))
        return torch.stack(xs), torch.tensor(ys)

    xt, yt = load(lists[train_key])
    xv, yv = load(lists.get(val_key) or lists.get("test"))
    k = num_classes or int(max(yt.max(), yv.max())) + 1
    return Split(xt, yt, xv, yv, k)


def load_dataset(ds: dict, img_size: int, in_chans: int) -> Split:
    if ds.get("datalist"):
        return datalist_dataset(ds["datalist"], img_size, in_chans, ds.get("num_classes"),
                                max_items=ds.get("max_items"))
    if ds.get("kind", ds["name"]).startswith("synthetic"):
        return synthetic_dataset(int(ds.get("num_classes", 2)), int(ds.get("n_train", 64)), int(ds.get("n_val", 32)),
                                 img_size, in_chans, int(ds.get("seed", 0)), float(ds.get("noise", 1.0)))
    raise ValueError(f"dataset {ds['name']!r}: give a 'datalist' JSON path or name it synthetic*")


# ------------------------------------------------------------------------------ model
def build_backbone(spec: dict) -> nn.Module:
    from tpp_monai.backbones.vit import build_vit
    from tpp_monai.safe_io import safe_load

    b = dict(spec.get("backbone", {}))
    size = b.pop("size", "tiny")
    ckpt = b.pop("checkpoint", None)
    vit = build_vit(size, **b)
    if ckpt:
        state = safe_load(ckpt)
        if isinstance(state, dict):
            for key in ("model", "state_dict", "network_weights"):
                if key in state and isinstance(state[key], dict):
                    state = state[key]
                    break
        missing, unexpected = vit.load_state_dict(state, strict=False)
        if len(missing) > 2:  # a final norm / head may differ; more means the wrong checkpoint
            raise ValueError(f"backbone checkpoint {ckpt} misses {len(missing)} tensors, e.g. {missing[:4]}")
    return vit


def default_tpp_hook(backbone: nn.Module, cell: Cell, spec: dict, train_images: torch.Tensor,
                     work_dir: Path) -> None:
    """TPP stage with ``tpp_monai.tpp.tpp_pretrain`` (MAE) on the cell's training images."""
    from tpp_monai.tpp import tpp_pretrain

    t = dict(spec.get("tpp_train", {}))
    cfg = {k: v for k, v in cell.method_config.items() if k != "label"}
    tpp_pretrain(
        backbone, cell.method, t.get("pretext", "mae"), train_images, peft_config=cfg or None,
        pretext_config=t.get("pretext_config"), epochs=int(t.get("epochs", 1)),
        batch_size=int(t.get("batch_size", 16)), lr=t.get("lr"), max_iterations=t.get("iterations"),
        output_dir=work_dir, seed=cell.seed, device=spec.get("device", "cpu"), tensorboard=False, log_every=10 ** 9,
        checkpoint_every_epochs=None,
    )


class _ClsModel(nn.Module):
    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x):
        return self.head(self.backbone(x)[:, 0])


def _prepare(cell: Cell, spec: dict, split: Split, backbone: nn.Module, device: torch.device, tpp_done: bool):
    """Model, trainable parameters and optimiser factory for the cell's method."""
    from tpp_monai.peft import PEFT_METHODS, apply_peft, get_peft

    cfg = {k: v for k, v in cell.method_config.items() if k != "label"}
    name = cell.method
    head = nn.Linear(backbone.embed_dim, split.num_classes)
    tr = {**spec.get("train", {}), **cell.train}
    lr, wd = float(tr.get("lr", 1e-3)), float(tr.get("weight_decay", 0.05))

    def adamw(params):
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)

    if name == "fpt_plus":
        from tpp_monai.peft.fpt_plus import FPTPlusClassifier

        model = FPTPlusClassifier(backbone, num_classes=split.num_classes, **cfg)
        return model.to(device), model.frozen, model.head, adamw
    if name in ("full", "linear") and name not in PEFT_METHODS:
        for p in backbone.parameters():
            p.requires_grad_(name == "full")
        model = _ClsModel(backbone, head)
        return model.to(device), backbone, head, adamw
    if name == "sh_peft":
        from tpp_monai.peft.sh_peft import PAPER_DEFAULTS, build_mask, build_sh_optimizer, estimate_importance

        model = _ClsModel(backbone, head).to(device)
        bs = int(tr.get("batch_size", 16))
        xs, ys = split.x_train, split.y_train
        nb = cfg.pop("importance_batches", None)  # None: one epoch (the paper's)
        n_imp = len(xs) if nb is None else min(len(xs), int(nb) * bs)
        batches = [(xs[i:i + bs].to(device), ys[i:i + bs].to(device)) for i in range(0, n_imp, bs)]
        opt_name = cfg.pop("optimizer", PAPER_DEFAULTS["optimizer"])
        sh_lr = float(cell.train["lr"]) if "lr" in cell.train else PAPER_DEFAULTS["lr"]

        def loss_fn(m, b):
            return F.cross_entropy(m(b[0]), b[1])

        imp = estimate_importance(model, loss_fn, batches, variant=cfg.get("variant", "l2"),
                                  lam=float(cfg.get("lam", 1.0)), module=backbone)
        mask = build_mask(imp, float(cfg.get("top_percent", 1.0)))
        apply_peft(backbone, "sh_peft", {k: v for k, v in cfg.items() if k in ("top_percent", "variant", "lam")}, mask=mask)

        def masked(params):
            opt = build_sh_optimizer(backbone, head.parameters(), optimizer=opt_name, lr=sh_lr,
                                     weight_decay=float(cell.train["weight_decay"]) if "weight_decay" in cell.train
                                     else None)
            opt.cosine = PAPER_DEFAULTS["schedule"] == "cosine"  # the run loop anneals it over its iterations
            return opt

        return model, backbone, head, masked
    if not tpp_done:
        apply_peft(backbone, name, cfg or None)
    else:
        get_peft(backbone)
    model = _ClsModel(backbone, head)
    return model.to(device), backbone, head, adamw


def tpp_supported(method: str) -> bool:
    """False for methods the TPP stage cannot pre-train here (``TPP_UNSUPPORTED`` or ``tpp_supported = False``)."""
    from tpp_monai.peft import PEFT_METHODS

    if method in TPP_UNSUPPORTED:
        return False
    return method not in PEFT_METHODS or bool(getattr(PEFT_METHODS.get(method), "tpp_supported", True))


def run_cell(cell: Cell, spec: dict, out_dir: str | os.PathLike, tpp_hook: Callable | None = None) -> dict:
    """Train and evaluate one cell; returns the result row (also what is written to the cell file)."""
    from tpp_monai.metrics.classification import classification_metrics
    from tpp_monai.metrics.efficiency import PeakMemory
    from tpp_monai.peft import parameter_report

    t0 = time.perf_counter()
    row: dict[str, Any] = {
        "cell": cell.cell_id, "index": cell.index, "method": cell.label, "dataset": cell.dataset["name"],
        "seed": cell.seed, "tpp": cell.tpp, "metric": spec.get("metric", "f1"), "status": "ok", "error": "",
    }
    if cell.tpp and not tpp_supported(cell.method):
        row.update(status="unsupported", error=f"TPP is not available for '{cell.method}' in this runner")
        return row
    device = torch.device(spec.get("device", "cpu"))
    b = spec.get("backbone", {})
    img, chans = int(b.get("img_size", 224)), int(b.get("in_chans", 3))
    split = load_dataset(cell.dataset, img, chans)
    torch.manual_seed(int(spec.get("backbone_seed", 0)))
    backbone = build_backbone(spec)
    torch.manual_seed(cell.seed)
    tpp_done = False
    if cell.tpp:
        hook = tpp_hook or default_tpp_hook
        hook(backbone, cell, spec, split.x_train, Path(out_dir) / "work" / cell.cell_id)
        tpp_done = True
        torch.manual_seed(cell.seed)
    model, bb, head, make_opt = _prepare(cell, spec, split, backbone, device, tpp_done)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_opt(params)
    tr = {**spec.get("train", {}), **cell.train}
    iters, bs = int(tr.get("iterations", 30)), int(tr.get("batch_size", 16))
    g = torch.Generator().manual_seed(cell.seed)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iters) if getattr(opt, "cosine", False) else None
    baseline = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    model.train()
    with PeakMemory(device, baseline) as pm:
        for _ in range(iters):
            idx = torch.randint(0, len(split.x_train), (min(bs, len(split.x_train)),), generator=g)
            x, y = split.x_train[idx].to(device), split.y_train[idx].to(device)
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
    model.eval()
    with torch.no_grad():
        scores = torch.cat([model(split.x_val[i:i + bs].to(device)).softmax(-1).cpu()
                            for i in range(0, len(split.x_val), bs)])
    m = classification_metrics(split.y_val.numpy(), scores.numpy(), percent=True)
    rep = parameter_report(bb, head)
    trainable = rep.trainable
    if cell.method == "sh_peft":  # whole tensors require grad, but only the selected entries train
        from tpp_monai.peft import get_peft

        trainable = get_peft(bb).num_selected() + sum(p.numel() for p in head.parameters())
    row.update(
        score=m[row["metric"]], acc=m["acc"], auc=m["auc"], f1=m["f1"], trainable=trainable, total=rep.total,
        param_percent=100.0 * trainable / max(rep.total, 1), memory_mb=pm.peak_mb, memory_method=pm.method, seconds=time.perf_counter() - t0,
    )
    return row


# ------------------------------------------------------------------------------ grid
def cell_path(out_dir: str | os.PathLike, cell: Cell) -> Path:
    return Path(out_dir) / "cells" / f"{cell.cell_id}.json"


def run_grid(spec: str | os.PathLike | dict, out_dir: str | os.PathLike, cells: Sequence[int] | None = None,
             tpp_hook: Callable | None = None, rerun_failed: bool = True, log: Callable[[str], None] = print) -> list[str]:
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
            row = run_cell(cell, spec, out, tpp_hook)
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


def markdown_table(rows: list[dict], metric: str = "f1") -> str:
    summ = summarise(rows)
    datasets = list(dict.fromkeys(r["dataset"] for r in rows if r.get("status") == "ok"))
    head = ["Method", "TPP", "Params (%)", "Mem (MB)"] + datasets + ["Avg"]
    lines = [f"{metric.upper()} (%) on the validation split, mean ± std over seeds", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    for s in summ:
        cells = [s["method"], "✓" if s["tpp"] else "", f"{s['param_percent']:.2f}", f"{s['memory_mb']:.1f}"]
        for ds in datasets:
            cells.append(f"{s['per_dataset'][ds][0]:.2f} ± {s['per_dataset'][ds][1]:.2f}" if ds in s["per_dataset"] else "-")
        cells.append(f"{s['avg']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
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
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write(path, buf.getvalue())


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
