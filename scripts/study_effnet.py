#!/usr/bin/env python
"""TPP on real pre-trained weights (issue 24): EfficientNet-Lite0 (ImageNet) + Conv-Adapter, with and without
DINO-TPP, on tumour-crop classification and segmentation; Dutt et al.'s CNN PEFT baselines beside them.

The protocol is fixed in docs/results/study_effnet_tumour_crops/PROTOCOL.md (settings:
``tpp_monai.study.EFFNET_SETTING``). Every arm runs the bundles through MONAI's bundle API
(``tpp_monai.study.run_arm``); finished arms are read back (resumable); a progress bar counts arms.

    python scripts/study_effnet.py                        # the study (both tasks, one after the other)
    python scripts/study_effnet.py --tasks cls            # one task (two processes can run the two tasks)
    python scripts/study_effnet.py --report_only          # rewrite the report from the finished arms
    python scripts/study_effnet.py --quick --out /tmp/s   # CI-sized

Writes to --out: ``study.md`` (per task: paired tables with bootstrap intervals, the Dutt-style table, the
TPP learning report), ``results.json``, ``convergence_<task>.png`` and ``tpp_loss_<task>.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TASK_TITLES = {"cls": "C: tumour-crop classification (tumour / no tumour)", "seg": "S: tumour-crop segmentation"}


def run(specs, progress: bool = True) -> dict[tuple[str, str], list[dict]]:
    """Every arm of every spec, in order; {(task, method): results}."""
    from tpp_monai.study import check_resumable, run_arm
    from tpp_monai.safe_io import atomic_write
    from dataclasses import asdict
    from tqdm import tqdm

    arms = [(t, m, sp, a) for t, m, sp in specs for a in sp.arms()]
    for _, _, sp in specs:
        check_resumable(sp)
        atomic_write(Path(sp.work) / "spec.json", json.dumps(asdict(sp), indent=1))
    out: dict[tuple[str, str], list[dict]] = {(t, m): [] for t, m, _ in specs}
    bar = tqdm(arms, desc="study arms", unit="arm", disable=not progress)
    for task, method, sp, (amount, seed, init) in bar:
        bar.set_postfix_str(f"{task} {method} {amount:g} labels seed {seed} {init}")
        out[(task, method)].append(run_arm(sp, sp.backbone_ckpt, amount, seed, init))
    return out


def finished(specs) -> dict[tuple[str, str], list[dict]]:
    """The finished arms' records (result.json) of every spec, without running anything."""
    from tpp_monai.study import _arm_dir

    out = {}
    for task, method, sp in specs:
        recs = []
        for amount, seed, init in sp.arms():
            f = _arm_dir(sp, amount, seed, init) / "result.json"
            if f.is_file():
                recs.append(json.loads(f.read_text()))
        out[(task, method)] = recs
    return out


def trainable_percent(spec) -> float | None:
    """Trainable % of the fine-tuned network (target parameters + task head / decoder), from a finished arm's
    training log if it recorded it, else by building the bundle's network."""
    try:
        from tpp_monai.peft import parameter_report
        from tpp_monai.study import bundle_network

        net = bundle_network(spec, backbone_ckpt="")
        return float(parameter_report(net).ratio)
    except Exception as e:  # reported as missing, never invented
        print(f"trainable % of {spec.peft_method}: not available ({type(e).__name__}: {e})", file=sys.stderr)
        return None


def write_report(specs, results, out: Path, cmd: str, commit: str, name: str = "study.md",
                 protocol: str = "PROTOCOL.md") -> str:
    from tpp_monai.reporting import mean_std
    from tpp_monai.safe_io import atomic_write
    from tpp_monai.study import (
        LOWER_IS_BETTER, METRIC_NAMES, markdown_table, plot_convergence, plot_losses, pooled, summarise,
        tpp_loss_change_text,
    )

    sys.path.insert(0, str(ROOT / "scripts"))
    from study import tpp_report_lines  # the TPP learning report table (scripts/study.py)

    out.mkdir(parents=True, exist_ok=True)
    lines = ["# TPP on real ImageNet weights: EfficientNet-Lite0 + Conv-Adapter (+ DINO-TPP), tumour crops", "",
             f"Protocol: [{protocol}]({protocol}) (committed before the run). Command: `{cmd}` at commit "
             f"{commit or 'unknown'}. Each paired row: mean +- std over seeds per init, the mean paired difference "
             "(TPP - no TPP) +- its std, its 95% percentile-bootstrap interval (10,000 resamples, seed 0) and the "
             "sign count.", ""]
    for task in dict.fromkeys(t for t, _, _ in specs):
        tspecs = [(m, sp) for t, m, sp in specs if t == task]
        method, pair = tspecs[0]
        res = results.get((task, method), [])
        lines += [f"## {TASK_TITLES.get(task, task)}", ""]
        n_arms = len(pair.arms())
        minutes = sum(r["seconds"] for r in res) / 60
        lines += [f"Conv-Adapter, {len(res)}/{n_arms} arms finished ({minutes:.1f} min of fine-tuning + testing)."
                  f" Label counts{' per class' if pair.per_class else ''}: {list(pair.counts)}; seeds "
                  f"{list(pair.seeds)}.", ""]
        for m in pair.metrics:
            unit = "px" if m in LOWER_IS_BETTER else "%"
            rows = summarise(res, m)
            if rows:
                lines += [f"Test {METRIC_NAMES.get(m, m)} ({unit}):", "", markdown_table(rows, m, unit), ""]
            pd = pooled(res, m)
            if pd:
                lines += [f"Pooled over the label counts ({pd.n} pairs): TPP - no TPP = {pd.text()}.", ""]
        if res:
            conv = plot_convergence(pair, res, pair.metrics[0], out / f"convergence_{task}.png",
                                    title=TASK_TITLES.get(task, task))
            lines += [f"Convergence view: [{conv.name}]({conv.name}) (validation {METRIC_NAMES.get(pair.metrics[0])} "
                      "against fine-tuning iteration, mean +- std over seeds).", ""]
        work = Path(pair.work)
        logs = {f"TPP seed {sd}": work / "tpp" / f"seed{sd}" / "logs" / "tpp_log.jsonl" for sd in pair.seeds}
        logs = {k: v for k, v in logs.items() if v.is_file()}
        if logs:
            curve = plot_losses(logs, out / f"tpp_loss_{task}.png")
            lines += [f"TPP (DINO) loss change over seeds (mean of the last vs the first 10% of each seed's "
                      f"iterations): {tpp_loss_change_text(work, pair.seeds)}; curves: [{curve.name}]({curve.name})."]
            lines += tpp_report_lines(work, pair.seeds) + [""]
        # Dutt-style table at the largest count: every method, F1 (C) / Dice (S), trainable %
        big = max(pair.counts)
        # C: F1 (Dutt et al.'s metric) beside AUC; S: Dice beside HD95
        cols = ("f1", pair.metrics[0]) if "f1" in pair.metrics else tuple(pair.metrics[:2])
        heads = [f"{METRIC_NAMES.get(k, k)} ({'px' if k in LOWER_IS_BETTER else '%'})" for k in cols]
        lines += [f"Methods at {big} labels{' per class' if pair.per_class else ''} (Dutt et al.-style), test "
                  f"{' and '.join(heads)}, mean +- std over seeds; trainable % of the whole network (target "
                  "parameters + task head / decoder):", "", f"| method | trainable % | n | {' | '.join(heads)} |",
                  "|---|---:|---:|" + "---:|" * len(cols)]
        for m, sp in tspecs:
            arms = results.get((task, m), [])
            tp = trainable_percent(sp) if arms else None  # the same network for both inits: built once
            for init in sp.inits:
                sel = [r for r in arms if r["init"] == init
                       and r["n_labelled"] == big * (2 if sp.per_class else 1)]
                if not sel:
                    continue
                label = {"random": m, "tpp": f"{m} + TPP"}[init]
                cells = []
                for k in cols:
                    mu, sd = mean_std([r[k] for r in sel])
                    cells.append(f"{mu:.2f} +- {sd:.2f}")
                lines.append(f"| {label} | {'-' if tp is None else f'{tp:.2f}'} | {len(sel)} | {' | '.join(cells)} |")
        lines.append("")
    md = "\n".join(lines)
    atomic_write(out / name, md)
    atomic_write(out / name.replace("study", "results").replace(".md", ".json"), json.dumps({f"{t}/{m}": r for (t, m), r in results.items()}, indent=1))
    return md


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CI-sized (tiny inputs, a few iterations)")
    p.add_argument("--tasks", nargs="+", default=["cls", "seg"], choices=["cls", "seg"])
    p.add_argument("--out", default=None, help="results folder (default: docs/results/study_effnet_tumour_crops)")
    p.add_argument("--work", default=None, help="runs folder, resumable (default: .tpp_cache/study/effnet_tumour_crops)")
    p.add_argument("--cache", default=None, help="demo data cache (default: .tpp_cache/demo_ct)")
    p.add_argument("--weights", default=None, help="EfficientNet-Lite0 weights file (default: fetched into the cache)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of this process")
    p.add_argument("--report_only", action="store_true", help="write the report from the finished arms")
    p.add_argument("--v1", action="store_true", help="protocol version 1 (PROTOCOL_v1.md, stopped; report in <out>/v1)")
    a = p.parse_args(argv)

    import torch

    torch.set_num_threads(a.threads)
    os.chdir(ROOT)
    from tpp_monai.backbones.efficientnet_weights import fetch_efficientnet_lite0_weights
    from tpp_monai.data.demo_data import DEFAULT_CACHE, build_demo_cache
    from tpp_monai.study import EFFNET_QUICK, EFFNET_SETTING, EFFNET_V1, effnet_specs

    setting = EFFNET_QUICK if a.quick else EFFNET_V1 if a.v1 else EFFNET_SETTING
    tag = setting["work"]
    out = Path(a.out or ROOT / "docs" / "results" / "study_effnet_tumour_crops")
    work = Path(a.work or ROOT / ".tpp_cache" / "study" / tag)
    cache = Path(a.cache or DEFAULT_CACHE)
    cache = Path(build_demo_cache(cache, size=96)).resolve()
    weights = Path(a.weights) if a.weights else fetch_efficientnet_lite0_weights()
    specs = effnet_specs(ROOT, cache, weights, work, tasks=a.tasks, setting=setting)
    t0 = time.time()
    results = finished(specs) if a.report_only else run(specs)
    if not a.report_only:
        print(f"study: {(time.time() - t0) / 60:.1f} min", file=sys.stderr)
    all_specs = effnet_specs(ROOT, cache, weights, work, setting=setting)  # the report covers both tasks
    results = {**finished(all_specs), **{k: v for k, v in results.items() if v}}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    cmd = "python scripts/study_effnet.py " + " ".join(shlex.quote(x) for x in (sys.argv[1:] if argv is None else argv))
    if a.v1:  # version 1's report and figures in their own folder
        out = out / "v1"
    print(write_report(all_specs, results, out, cmd.strip(), commit, protocol="../PROTOCOL_v1.md" if a.v1 else "PROTOCOL.md"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
