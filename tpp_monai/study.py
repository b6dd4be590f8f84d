"""The label-efficiency study: {no TPP, TPP} x label fractions x seeds through a segmentation bundle.

The paper's claim that is testable at small scale (its Fig. 4 and Table 8): with the backbone frozen,
pre-training the target parameters on the downstream *training images* (no labels) before fine-tuning
helps, at every label fraction and most when labels are few. One *arm* is one fine-tuning run:
(fraction, seed, init) with init "random" (the PEFT method's own init) or "tpp".

Fairness of the comparison, by construction:
* both inits of a (fraction, seed) pair fine-tune on the *same* labelled subset, with the same seed,
  iterations, batch and learning rate; only the target parameters' starting values differ;
* label subsets are nested (the 10% subset of a seed is inside its 25% subset), drawn from one
  permutation of the training split per seed;
* TPP sees every training image (labels unused), once per seed; validation and test splits are fixed.

Every stage runs the bundle through MONAI's bundle API (``monai.bundle.run``), exactly as the command
line would. Resumable: an arm whose ``metrics.json`` exists is not re-run; a TPP run whose
checkpoint exists is reused; the upstream backbone is cached with its settings and re-used when they match.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

from tpp_monai.checkpoint import atomic_write

if TYPE_CHECKING:
    import torch


INITS = ("random", "tpp")
INIT_LABEL = {"random": "no TPP", "tpp": "TPP"}


def run_bundle_stage(cfg_dir: str | os.PathLike, files: list[str], title: str = "", quiet: bool = False,
                     **overrides: Any) -> float:
    """Run ``files`` of a bundle's ``configs`` folder merged in order (MONAI's ``monai.bundle.run``); seconds."""
    from monai.bundle import run

    cfg_dir = Path(cfg_dir)
    if title and not quiet:
        print(f"\n=== {title} ===", flush=True)
    t0 = time.time()
    logging_conf = cfg_dir / "logging.conf"
    run(config_file=[str(cfg_dir / f) for f in files], meta_file=str(cfg_dir / "metadata.json"),
        logging_file=str(logging_conf) if logging_conf.is_file() else None, **overrides)
    dt = time.time() - t0
    if title and not quiet:
        print(f"=== {title}: {dt:.0f} s ===", flush=True)
    return dt


def bundle_network(spec: "StudySpec", **overrides: Any) -> "torch.nn.Module":
    """The bundle's ``network_def`` built exactly as its ``train.json`` builds it (for parameter reports)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(spec.cfg_dir / "train.json"))
    parser.update({**spec.common(), **overrides})
    return parser.get_parsed_content("network_def")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Records of a JSON-lines log (``JsonlLogger``); [] when the file does not exist."""
    p = Path(path)
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def label_subset(entries: list[dict], fraction: float, seed: int, min_count: int = 1) -> list[dict]:
    """The first ``ceil(fraction * n)`` entries of a seeded permutation (nested across fractions)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
    import numpy as np

    order = np.random.default_rng(seed).permutation(len(entries))
    k = min(len(entries), max(min_count, math.ceil(fraction * len(entries))))
    return [entries[i] for i in sorted(order[:k])]


def write_subset_datalist(datalist: str | os.PathLike, out: str | os.PathLike, fraction: float, seed: int,
                          split: str = "training") -> int:
    """Copy ``datalist`` to ``out`` with its ``split`` reduced to a label subset; paths made absolute."""
    src = Path(datalist)
    obj = json.loads(src.read_text())
    base = src.parent
    absolute = {}
    for name, entries in obj.items():
        if not isinstance(entries, list):
            absolute[name] = entries
            continue
        absolute[name] = [{k: (str((base / v).resolve()) if k in ("image", "label") and isinstance(v, str)
                               and not os.path.isabs(v) else v) for k, v in e.items()} for e in entries]
    absolute[split] = label_subset(absolute[split], fraction, seed)
    atomic_write(out, json.dumps(absolute, indent=1))
    return len(absolute[split])


@dataclass
class StudySpec:
    """What one study runs. ``overrides`` are bundle overrides common to every stage (sizes, model)."""

    bundle: str
    dataset_dir: str
    datalist: str
    work: str
    fractions: tuple[float, ...] = (0.1, 0.25, 1.0)
    seeds: tuple[int, ...] = (0, 1, 2)
    peft_method: str = "adapter"
    pretext: str = "mae"
    iterations: int = 240
    batch_size: int = 8
    #: validate about every ``val_every`` iterations (converted to epochs per arm: small label fractions have
    #: short epochs, and validating every few epochs would spend the budget on validation)
    val_every: int = 45
    upstream_epochs: int = 30
    tpp_epochs: int = 20
    overrides: dict[str, Any] = field(default_factory=dict)
    #: a pre-trained backbone to use as is (a real MedCoSS / MAE checkpoint); empty: pre-train one upstream
    #: with the bundle's ``pretrain_backbone.json`` (the demo bundle has one)
    backbone_ckpt: str = ""

    @property
    def cfg_dir(self) -> Path:
        return Path(self.bundle) / "configs"

    def common(self) -> dict[str, Any]:
        return dict(self.overrides, dataset_dir=str(self.dataset_dir), datalist=str(self.datalist),
                    peft_method=self.peft_method, num_workers=0)

    def arms(self) -> list[tuple[float, int, str]]:
        return [(f, s, i) for f in self.fractions for s in self.seeds for i in INITS]


def _arm_dir(spec: StudySpec, fraction: float, seed: int, init: str) -> Path:
    return Path(spec.work) / "arms" / f"frac{fraction:g}_seed{seed}_{init}"


def ensure_upstream(spec: StudySpec, log: Callable[[str], None] = print) -> Path:
    """The upstream MAE backbone (stage 1), cached in ``work/upstream`` and re-used when its settings match."""
    if spec.backbone_ckpt:
        return Path(spec.backbone_ckpt)
    if not (spec.cfg_dir / "pretrain_backbone.json").is_file():
        raise FileNotFoundError(f"{spec.cfg_dir} has no pretrain_backbone.json to pre-train a backbone upstream: "
                                "pass the pre-trained backbone (--backbone_ckpt, e.g. MedCoSS's checkpoint-299.pth)")
    up = Path(spec.work) / "upstream"
    ckpt, stamp = up / "models" / "backbone_mae.pt", up / "settings.json"
    settings = {"overrides": spec.overrides, "epochs": spec.upstream_epochs, "dataset_dir": str(spec.dataset_dir)}
    if ckpt.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == settings:
        log(f"upstream backbone: re-using {ckpt}")
        return ckpt
    run_bundle_stage(spec.cfg_dir, ["train.json", "tpp_pretrain.json", "pretrain_backbone.json"],
                     "upstream MAE pre-training of the backbone on the unlabelled pool",
                     **{**spec.common(), "bundle_root": str(up), "peft_method": "full",
                        "tpp_epochs": spec.upstream_epochs, "seed": 0,
                        "resume": False})  # new settings (or none recorded): start over, not resume
    atomic_write(stamp, json.dumps(settings, indent=1))
    return ckpt


def ensure_tpp(spec: StudySpec, backbone: Path, seed: int) -> Path:
    """TPP of the target parameters on every training image for ``seed``; re-used when it exists."""
    root = Path(spec.work) / "tpp" / f"seed{seed}"
    ckpt = root / "models" / "tpp_target_params.pt"
    if not ckpt.is_file():
        run_bundle_stage(spec.cfg_dir, ["train.json", "tpp_pretrain.json"], quiet=True, bundle_root=str(root),
                         **spec.common(), backbone_ckpt=str(backbone), pretext=spec.pretext,
                         tpp_epochs=spec.tpp_epochs, seed=seed)
    return ckpt


def run_arm(spec: StudySpec, backbone: Path, fraction: float, seed: int, init: str) -> dict[str, Any]:
    """Fine-tune and test one arm; returns its result record (read back from its ``metrics.json``)."""
    d = _arm_dir(spec, fraction, seed, init)
    done = d / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    subset = d / "datalist.json"
    n_labelled = write_subset_datalist(spec.datalist, subset, fraction, seed)
    tpp = str(ensure_tpp(spec, backbone, seed)) if init == "tpp" else ""
    its_per_epoch = math.ceil(n_labelled / spec.batch_size)
    rc = dict(spec.common(), bundle_root=str(d), backbone_ckpt=str(backbone), tpp_ckpt=tpp, seed=seed,
              num_iterations=spec.iterations, batch_size=spec.batch_size,
              val_interval=max(1, round(spec.val_every / its_per_epoch)))
    t0 = time.time()
    rc["datalist"] = str(subset)
    run_bundle_stage(spec.cfg_dir, ["train.json"], quiet=True, **rc)
    run_bundle_stage(spec.cfg_dir, ["train.json", "evaluate.json"], quiet=True, **rc)
    m = json.loads((d / "eval" / "metrics.json").read_text())
    rec = {"fraction": fraction, "seed": seed, "init": init, "n_labelled": n_labelled,
           "dice": 100 * float(m["dice"]), "hd95": float(m["hd95"]), "seconds": round(time.time() - t0, 1)}
    atomic_write(done, json.dumps(rec, indent=1))
    return rec


#: spec fields that may change between runs into one work folder (more seeds or fractions add arms)
EXTENDABLE = ("fractions", "seeds")


def check_resumable(spec: StudySpec) -> None:
    """Refuse a work folder whose finished arms were run with other settings (they would be mixed in)."""
    stamp = Path(spec.work) / "spec.json"
    if not stamp.is_file():
        return
    old, new = json.loads(stamp.read_text()), json.loads(json.dumps(asdict(spec)))
    changed = sorted(k for k in set(old) | set(new) if k not in EXTENDABLE and old.get(k) != new.get(k))
    if changed:
        raise ValueError(f"{spec.work} holds a study run with other settings ({', '.join(changed)} differ: "
                         + "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
                         + "). Use another --work folder, or delete that one to start again.")


def run_study(spec: StudySpec, progress: bool = True) -> list[dict[str, Any]]:
    """Every arm of ``spec`` (finished arms are read back, not re-run), with a progress bar over arms."""
    from tqdm import tqdm

    check_resumable(spec)
    atomic_write(Path(spec.work) / "spec.json", json.dumps(asdict(spec), indent=1))
    backbone = ensure_upstream(spec)
    results = []
    bar = tqdm(spec.arms(), desc="study arms", unit="arm", disable=not progress)
    for fraction, seed, init in bar:
        bar.set_postfix_str(f"{fraction:g} labels, seed {seed}, {INIT_LABEL[init]}")
        results.append(run_arm(spec, backbone, fraction, seed, init))
    return results


def mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for a single value) of a result column."""
    a = [float(x) for x in xs]
    m = math.fsum(a) / len(a)
    return m, math.sqrt(math.fsum((x - m) ** 2 for x in a) / (len(a) - 1)) if len(a) > 1 else 0.0


def summarise(results: Iterable[dict[str, Any]], metric: str = "dice") -> list[dict[str, Any]]:
    """Per label fraction: mean/std of each init and the paired (TPP - no TPP) difference per seed."""
    by = {(r["fraction"], r["seed"], r["init"]): r for r in results}
    rows = []
    for f in sorted({k[0] for k in by}):
        seeds = sorted({k[1] for k in by if k[0] == f and (f, k[1], "random") in by and (f, k[1], "tpp") in by})
        if not seeds:
            continue
        base = [by[(f, s, "random")][metric] for s in seeds]
        tpp = [by[(f, s, "tpp")][metric] for s in seeds]
        diff = [t - b for t, b in zip(tpp, base)]
        better = sum(d > 0 for d in diff) if metric == "dice" else sum(d < 0 for d in diff)
        rows.append({"fraction": f, "n_labelled": by[(f, seeds[0], "random")]["n_labelled"], "seeds": seeds,
                     "random": mean_std(base), "tpp": mean_std(tpp), "diff": mean_std(diff),
                     "diff_per_seed": diff, "tpp_better": better})
    return rows


def markdown_table(rows: list[dict[str, Any]], metric: str = "dice", unit: str = "%") -> str:
    """The study table: mean +- std per arm, paired difference and its sign count per label fraction."""
    name = {"dice": "Dice", "hd95": "HD95"}.get(metric, metric)
    better = "higher" if metric == "dice" else "lower"
    lines = [f"| labels | n | no TPP {name} ({unit}) | TPP {name} ({unit}) | paired diff (TPP - no TPP) | "
             f"per seed | TPP {better} |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        per_seed = ", ".join(f"{d:+.2f}" for d in r["diff_per_seed"])
        lines.append(f"| {100 * r['fraction']:g}% | {r['n_labelled']} | {r['random'][0]:.2f} +- {r['random'][1]:.2f} | "
                     f"{r['tpp'][0]:.2f} +- {r['tpp'][1]:.2f} | {r['diff'][0]:+.2f} +- {r['diff'][1]:.2f} | "
                     f"{per_seed} | {r['tpp_better']}/{len(r['seeds'])} |")
    return "\n".join(lines)


def plot_fractions(rows: list[dict[str, Any]], path: str | os.PathLike, metric: str = "dice",
                   title: str = "") -> Path:
    """Metric against label fraction, with and without TPP (mean +- std over seeds), like the paper's Fig. 4."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    xs = [100 * r["fraction"] for r in rows]
    for init, colour, shift in (("random", "tab:blue", 0.97), ("tpp", "tab:red", 1.03)):
        ax.errorbar([x * shift for x in xs], [r[init][0] for r in rows], yerr=[r[init][1] for r in rows], marker="o", capsize=3,
                    color=colour, label=f"Adapter {'w/ TPP' if init == 'tpp' else 'w/o TPP'}")
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks(xs)
    ax.set_xticklabels([f"{x:g}%" for x in xs])
    ax.set_xlabel("labelled training images")
    ax.set_ylabel({"dice": "test Dice (%)", "hd95": "test HD95 (px)"}.get(metric, metric))
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend()
    fig.tight_layout()
    out = atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    return out


def loss_drop(log: str | os.PathLike, head: int = 10) -> tuple[float, float] | None:
    """(mean of the first ``head`` logged losses, mean of the last ``head``) of a JSON-lines loss log."""
    losses = [r["loss"] for r in read_jsonl(log) if r.get("kind") == "loss"]
    if len(losses) < 2:
        return None
    k = max(1, min(head, len(losses) // 2))
    return sum(losses[:k]) / k, sum(losses[-k:]) / k


def loss_plateau(log: str | os.PathLike, frac: float = 0.1) -> tuple[float, float] | None:
    """(mean loss of the second-to-last ``frac`` of iterations, of the last ``frac``): equal when flattened."""
    losses = [r["loss"] for r in read_jsonl(log) if r.get("kind") == "loss"]
    k = max(1, int(len(losses) * frac))
    if len(losses) < 2 * k:
        return None
    return sum(losses[-2 * k:-k]) / k, sum(losses[-k:]) / k


def target_norms(ckpt: str | os.PathLike) -> dict[str, float]:
    """Mean Frobenius norm of a target-parameter checkpoint's tensors, grouped by their last two name parts.

    What TPP taught the target parameters, in one line per kind: e.g. an Adapter's ``up.weight`` is zero
    at insertion, so its norm after TPP is how far the pretext moved the adapter's output.
    """
    from tpp_monai.checkpoint import read_target_checkpoint

    groups: dict[str, list[float]] = {}
    for name, t in read_target_checkpoint(ckpt)["state_dict"].items():
        groups.setdefault(".".join(name.split(".")[-2:]), []).append(float(t.float().norm()))
    return {k: sum(v) / len(v) for k, v in sorted(groups.items())}


def plot_losses(logs: dict[str, str | os.PathLike], path: str | os.PathLike) -> Path:
    """One loss-vs-iteration panel per JSON-lines log (upstream, TPP, fine-tuning runs), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(logs), figsize=(4.2 * len(logs), 3.4), squeeze=False)
    for ax, (name, log) in zip(axes[0], logs.items()):
        recs = [r for r in read_jsonl(log) if r.get("kind") == "loss"]
        ax.plot([r["iteration"] for r in recs], [r["loss"] for r in recs], lw=1)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("iteration")
        ax.set_ylabel("loss")
    fig.tight_layout()
    out = atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    return out
