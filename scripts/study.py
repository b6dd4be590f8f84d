#!/usr/bin/env python
"""Does TPP help at the scale you can run? {no TPP, TPP} x label fractions x seeds on real images.

Runs a segmentation bundle (default: the demo bundle on real CT) through MONAI's bundle API:
upstream MAE pre-training of the backbone (cached and re-used), TPP of the target parameters on all
training images once per seed, then for every label fraction and seed two fine-tuning runs on the
same labelled subset, one from the PEFT method's own init and one from the TPP checkpoint, each
tested on the fixed test split. Finished arms are not re-run (resumable); a progress bar counts arms.

Writes to --out: ``study.md`` (mean +- std per arm, paired difference per seed with its sign count,
TPP and upstream loss drops, the command), ``results.json`` (every arm), ``study_dice.png`` (like the
paper's Fig. 4) and ``loss_curves.png``.

    python scripts/study.py --dataset headct                 # the full study (docs/results/)
    python scripts/study.py --quick --out /tmp/study          # CI-sized
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
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: datasets of the demo cache (real images from registry packages, see tpp_monai/data/demo_data.py)
DATASETS = {
    "headct": dict(datalist_name="datalist_headct.json", num_classes=3,
                   class_names=["background", "soft_tissue", "bone"],
                   title="head CT soft tissue + bone (InVesalius)"),
    "tumour": dict(datalist_name="datalist_tumour.json", num_classes=2, class_names=["background", "tumour"],
                   title="lung CT / brain MRI tumour (pyradiomics)"),
    # the small-scale settings of issue 20 (tpp_monai.study.tumour_crops_setting; each version's PROTOCOL.md)
    "tumour_crops": dict(task="cls", title="tumour-crop classification, chest CT / brain MRI (pyradiomics masks)"),
    "tumour_crops_seg": dict(task="seg", title="tumour-crop segmentation, chest CT / brain MRI (pyradiomics masks)"),
}
FULL = dict(image_size=96, vit_size="tiny", depth=6, upstream_epochs=30, tpp_epochs=20, iterations=240, batch=8,
            val_every=45, fractions=(0.1, 0.25, 1.0), seeds=(0, 1, 2))
QUICK = dict(image_size=32, vit_size="tiny", depth=2, upstream_epochs=1, tpp_epochs=1, iterations=4, batch=4,
             val_every=4, fractions=(0.25, 1.0), seeds=(0, 1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=sorted(DATASETS), default="tumour_crops")
    p.add_argument("--bundle", default="bundles/demo_ct_adapter_tpp", help="segmentation bundle folder")
    p.add_argument("--quick", action="store_true", help="CI-sized study (tiny model, few iterations)")
    p.add_argument("--out", default=None, help="results folder (default: docs/results/study_<dataset>)")
    p.add_argument("--work", default=None, help="runs folder, resumable (default: .tpp_cache/study/<dataset>[_quick])")
    p.add_argument("--cache", default=None, help="demo data cache (default: .tpp_cache/demo_ct)")
    p.add_argument("--backbone_ckpt", default="", help="pre-trained backbone to use (default: MAE upstream stage)")
    p.add_argument("--datalist", default=None,
                   help="your data's datalist for --bundle (then the bundle's own model settings are used; "
                        "default: the demo --dataset's)")
    p.add_argument("--method", default="adapter", help="PEFT method (registry name)")
    p.add_argument("--pretext", default="mae", choices=["mae", "dino"])
    p.add_argument("--fractions", type=float, nargs="+", default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--iterations", type=int, default=None, help="fine-tuning iterations per arm")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores, at most 2)")
    a = p.parse_args(argv)
    os.chdir(ROOT)
    import torch

    from tpp_monai.safe_io import atomic_write
    from tpp_monai.data.demo_data import DEFAULT_CACHE, DemoDataError, build_demo_cache
    from tpp_monai.study import (
        StudySpec, loss_drop, loss_plateau, markdown_table, plot_fractions, plot_losses, run_study, summarise,
        target_norms, tpp_loss_change_text,
    )

    torch.set_num_threads(a.threads or min(2, os.cpu_count() or 1))
    s = dict(QUICK if a.quick else FULL)
    ds = DATASETS[a.dataset]
    tag = a.dataset + ("_quick" if a.quick else "")
    if "task" in ds:  # the folder names carry the protocol's version (tumour_crops_v3_mri)
        from tpp_monai.study import tumour_crops_setting

        tag = tumour_crops_setting(a.quick, ds["task"])["work"]
    out = Path(a.out or f"docs/results/study_{tag}").resolve()
    work = Path(a.work or f".tpp_cache/study/{tag}").resolve()
    try:
        cache = Path(build_demo_cache(Path(a.cache) if a.cache else DEFAULT_CACHE, size=96)).resolve()
    except DemoDataError as e:
        print(f"error: could not build the demo data cache: {e}", file=sys.stderr)
        return 2
    if "task" in ds:
        return _tumour_crops(a, argv, cache, out, work)
    spec = StudySpec(
        bundle=str(ROOT / a.bundle), dataset_dir=str(cache), datalist=a.datalist or str(cache / ds["datalist_name"]),
        work=str(work), backbone_ckpt=a.backbone_ckpt,
        fractions=tuple(a.fractions or s["fractions"]), seeds=tuple(a.seeds or s["seeds"]), peft_method=a.method,
        pretext=a.pretext, iterations=a.iterations or s["iterations"], batch_size=s["batch"],
        val_every=s["val_every"], upstream_epochs=s["upstream_epochs"], tpp_epochs=s["tpp_epochs"],
        overrides={} if a.datalist else dict(  # your own data: the bundle's own model and classes
            image_size=s["image_size"], vit_size=s["vit_size"], vit_overrides={"depth": s["depth"]},
            num_classes=ds["num_classes"], class_names=ds["class_names"]))
    t0 = time.time()
    results = run_study(spec)
    minutes = (time.time() - t0) / 60
    rows = summarise(results, "dice")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "results.json", json.dumps({"spec": spec.__dict__, "arms": results}, indent=1, default=str))
    fig = plot_fractions(rows, out / "study_dice.png", title=f"{ds['title']}: {a.method}, TPP {a.pretext}")
    up_log, tpp_logs = work / "upstream" / "logs" / "upstream" / "tpp_log.jsonl", {
        sd: work / "tpp" / f"seed{sd}" / "logs" / "tpp_log.jsonl" for sd in spec.seeds}
    curves = plot_losses({"upstream MAE": up_log, **{f"TPP seed {sd}": lp for sd, lp in tpp_logs.items()}},
                         out / "loss_curves.png")
    drops = {"upstream MAE": loss_drop(up_log), **{f"TPP ({a.pretext}) seed {sd}": loss_drop(lp)
                                                   for sd, lp in tpp_logs.items()}}
    up_flat = loss_plateau(up_log)
    import subprocess

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    cmd = "python scripts/study.py " + " ".join(shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))
    lines = [
        f"# TPP study: {ds['title']}", "",
        f"Command: `{cmd.strip()}` at commit {commit or 'unknown'}; {torch.get_num_threads()} CPU threads. "
        f"Fine-tuning + testing took {sum(r['seconds'] for r in results) / 60:.1f} min summed over the "
        f"{len(results)} arms (this invocation: {minutes:.1f} min; finished arms are read back, not re-run).", "",
        f"Backbone: ViT-{s['vit_size']} depth {s['depth']}, {s['image_size']} px, pre-trained upstream with MAE for "
        f"{spec.upstream_epochs} epochs on the unlabelled pool. PEFT: {a.method}. TPP: {a.pretext}, "
        f"{spec.tpp_epochs} epochs on every training image, once per seed. Fine-tuning: {spec.iterations} iterations, "
        f"batch {spec.batch_size}, on the labelled subset (nested subsets per seed); both inits of a pair use the same "
        f"subset, seed and budget. Metric: test Dice (%), mean +- std over seeds {list(spec.seeds)}.", "",
        markdown_table(rows, "dice"), "",
        "HD95 (px, lower is better):", "", markdown_table(summarise(results, "hd95"), "hd95", "px"), "",
        "Loss (mean of the first vs the last logged iterations):", "",
        "| run | first | last |", "|---|---|---|",
    ]
    lines += [f"| {k} | {v[0]:.4f} | {v[1]:.4f} |" for k, v in drops.items() if v]
    if up_flat:
        lines += ["", f"Upstream MAE plateau: mean loss over the second-to-last 10% of its iterations {up_flat[0]:.4f}, "
                      f"over the last 10% {up_flat[1]:.4f} ({100 * (up_flat[1] / up_flat[0] - 1):+.1f}%)."]
    lines += ["", f"TPP loss change over seeds (last vs first 10% of each seed's TPP run): "
                  f"{tpp_loss_change_text(work, spec.seeds)}."]
    lines += tpp_report_lines(work, spec.seeds)
    norms = {sd: target_norms(p) for sd in spec.seeds
             if (p := work / "tpp" / f"seed{sd}" / "models" / "tpp_target_params.pt").is_file()}
    if norms:
        kinds = sorted(next(iter(norms.values())))
        lines += ["", "What TPP taught the target parameters: mean norm per tensor kind after TPP (an Adapter's "
                      "`up.weight` is zero at insertion, so its norm is how far TPP moved the adapter's output):", "",
                  "| seed | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
        lines += [f"| {sd} | " + " | ".join(f"{n[k]:.4f}" for k in kinds) + " |" for sd, n in norms.items()]
    lines += ["", f"Figures: {fig.name}, {curves.name}; every arm in results.json.", ""]
    md = "\n".join(lines)
    atomic_write(out / "study.md", md)
    print("\n" + md, flush=True)
    return 0


def _tumour_crops(a: argparse.Namespace, argv: list[str] | None, cache: Path, out: Path, work: Path) -> int:
    """The protocol's study (docs/results/study_<setting's work>/PROTOCOL.md): settings from the library."""
    import subprocess

    import torch

    from tpp_monai.safe_io import atomic_write
    from tpp_monai.data.demo_data import DemoDataError
    from tpp_monai.data.upstream_pool import build_upstream_pool
    from tpp_monai.study import run_study, tumour_crops_setting, tumour_crops_spec

    try:
        pool = Path(build_upstream_pool()).resolve()
    except DemoDataError as e:
        print(f"error: could not build the upstream pool: {e}", file=sys.stderr)
        return 2
    ds = DATASETS[a.dataset]
    spec = tumour_crops_spec(ROOT, cache, pool, work, quick=a.quick, task=ds["task"])
    t0 = time.time()
    results = run_study(spec)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    cmd = "python scripts/study.py " + " ".join(shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))
    volumes = tumour_crops_setting(a.quick, ds["task"]).get("volumes")
    what = "classification" if ds["task"] == "cls" else "segmentation"
    title = f"tumour-crop {what}, {', '.join(volumes)} (pyradiomics masks)" if volumes else ds["title"]
    md = write_report(spec, results, out, title, cmd.strip(), commit,
                      (time.time() - t0) / 60, torch.get_num_threads())
    atomic_write(out / "results.json", json.dumps({"spec": spec.__dict__, "arms": results}, indent=1, default=str))
    print("\n" + md, flush=True)
    return 0


def write_report(spec, results: list[dict], out: Path, title: str, cmd: str, commit: str, minutes: float,
                 threads: int) -> str:
    """study.md + figures for a counts study: per-metric tables with the bootstrap interval, pooled pairs,
    the convergence view, TPP and upstream loss drops."""
    from tpp_monai.safe_io import atomic_write
    from tpp_monai.study import (
        LOWER_IS_BETTER, METRIC_NAMES, loss_first_last_10pct, markdown_table, plot_convergence, plot_losses, pooled, summarise,
        target_norms, tpp_loss_change_text, upstream_log,
    )

    out.mkdir(parents=True, exist_ok=True)
    work = Path(spec.work)
    primary = spec.metrics[0]
    conv = plot_convergence(spec, results, primary, out / "convergence.png", title=title)
    tpp_logs = {sd: work / "tpp" / f"seed{sd}" / "logs" / "tpp_log.jsonl" for sd in spec.seeds}
    curves = plot_losses({"upstream MAE": upstream_log(spec), **{f"TPP seed {sd}": lp for sd, lp in tpp_logs.items()}},
                         out / "loss_curves.png")
    n_pairs = len(summarise(results, primary)) and sum(len(r["seeds"]) for r in summarise(results, primary))
    per = " per class" if spec.per_class else ""
    lines = [f"# TPP study: {title}", "",
             f"Protocol: [PROTOCOL.md](PROTOCOL.md) (committed before the run). Command: `{cmd}` at commit "
             f"{commit or 'unknown'}; {threads} CPU thread(s). Fine-tuning + testing took "
             f"{sum(r['seconds'] for r in results) / 60:.1f} min summed over the {len(results)} arms (this "
             f"invocation: {minutes:.1f} min; finished arms are read back, not re-run).", "",
             f"Label counts{per}: {list(spec.counts)}; seeds {list(spec.seeds)}; {n_pairs} finished pairs. "
             f"Each row: mean +- std over seeds per init, the mean paired difference (TPP - no TPP) +- its std, "
             f"its 95% percentile-bootstrap interval (10,000 resamples, seed 0) and the sign count.", ""]
    for m in spec.metrics:
        unit = "px" if m in LOWER_IS_BETTER else "%"
        lines += [f"Test {METRIC_NAMES.get(m, m)} ({unit}):", "", markdown_table(summarise(results, m), m, unit), ""]
        pd = pooled(results, m)
        if pd:
            lines += [f"Pooled over every label count ({pd.n} pairs): TPP - no TPP = {pd.text()}.", ""]
    lines += ["TPP (MAE) and upstream loss (mean of the first vs the last 10% of iterations):", "",
              "| run | iterations | first | last | change |", "|---|---|---|---|---|"]
    for name, log in {"upstream MAE": upstream_log(spec), **{f"TPP seed {sd}": lp for sd, lp in tpp_logs.items()}}.items():
        n = len([1 for r in _jsonl(log) if r.get("kind") == "loss"])
        v = loss_first_last_10pct(log)
        if v:
            lines.append(f"| {name} | {n} | {v[0]:.4f} | {v[1]:.4f} | {100 * (v[1] / v[0] - 1):+.1f}% |")
    lines += ["", f"TPP loss change over seeds (last vs first 10% of each seed's TPP run): "
                  f"{tpp_loss_change_text(work, spec.seeds)}."]
    lines += tpp_report_lines(work, spec.seeds)
    norms = {sd: target_norms(p) for sd in spec.seeds
             if (p := work / "tpp" / f"seed{sd}" / "models" / "tpp_target_params.pt").is_file()}
    if norms:
        kinds = sorted(next(iter(norms.values())))
        lines += ["", "Mean norm per target tensor kind after TPP (an Adapter's `up.weight` is zero at insertion):", "",
                  "| seed | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
        lines += [f"| {sd} | " + " | ".join(f"{n[k]:.4f}" for k in kinds) + " |" for sd, n in norms.items()]
    lines += ["", f"Figures: {conv.name} (validation {METRIC_NAMES.get(primary, primary)} against fine-tuning "
                  f"iteration), {curves.name}; every arm in results.json.", ""]
    md = "\n".join(lines)
    atomic_write(out / "study.md", md)
    return md


def tpp_report_lines(work: Path, seeds) -> list[str]:
    """Markdown lines of the TPP stage's own learning report (tpp_report.json, issue 20 item 1) per seed, where the
    stage wrote one: steps, sum of lr, the loss change and each kind of target tensor's relative change."""
    reports = {sd: tpp_learning_report(work / "tpp" / f"seed{sd}" / "models" / "tpp_report.json") for sd in seeds}
    reports = {sd: r for sd, r in reports.items() if r}
    if not reports:
        return []
    kinds = sorted({k for r in reports.values() for k in r.get("targets", {})})
    lines = ["", "TPP learning report (`tpp_report.json` of the TPP stage): relative change of the loss and, "
                 "per kind of target tensor, ||w - w0|| / ||w0|| (||w|| for zero-initialised kinds):", "",
             "| seed | steps | sum of lr | loss change | " + " | ".join(kinds) + " |",
             "|---|---|---|---|" + "---|" * len(kinds)]
    lines += [f"| {sd} | {r.get('steps')} | {r.get('lr_sum', float('nan')):.3g} | "
              f"{100 * r.get('loss_rel_change', float('nan')):+.1f}% | "
              + " | ".join(f"{r['targets'][k]['rel_change']:.3g}" if k in r.get("targets", {}) else "-"
                           for k in kinds) + " |" for sd, r in reports.items()]
    return lines


def tpp_learning_report(path: Path) -> dict | None:
    """The TPP stage's ``tpp_report.json`` (schema: tpp_monai/engines/tpp_report.py), None when absent."""
    try:
        r = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return r if r.get("format") == "tpp-learning-report" else None


def _jsonl(path):
    from tpp_monai.study import read_jsonl

    return read_jsonl(path)


if __name__ == "__main__":
    raise SystemExit(main())
