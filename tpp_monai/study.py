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
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

from tpp_monai.reporting import PairedDifference, mean_std, paired_difference
from tpp_monai.safe_io import atomic_write

if TYPE_CHECKING:
    import torch


INITS = ("random", "tpp")
METRIC_NAMES = {"dice": "Dice", "hd95": "HD95", "auc": "AUC", "acc": "accuracy", "f1": "F1"}
#: metrics where lower is better (and that are not percentages)
LOWER_IS_BETTER = ("hd95",)
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


def label_subset(entries: list[dict], fraction: float, seed: int, min_count: int = 1,
                 exact: int | None = None) -> list[dict]:
    """The first ``ceil(fraction * n)`` (or ``exact``) entries of a seeded permutation (nested across amounts)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
    import numpy as np

    order = np.random.default_rng(seed).permutation(len(entries))
    k = exact if exact is not None else min(len(entries), max(min_count, math.ceil(fraction * len(entries))))
    return [entries[i] for i in sorted(order[:k])]


def read_datalist_absolute(datalist: str | os.PathLike) -> dict[str, Any]:
    """``datalist``'s content with relative ``image`` / ``label`` paths made absolute (against its folder), for a
    derived datalist written elsewhere."""
    src = Path(datalist)
    base = src.parent
    absolute = {}
    for name, entries in json.loads(src.read_text()).items():
        if not isinstance(entries, list):
            absolute[name] = entries
            continue
        absolute[name] = [{k: (str((base / v).resolve()) if k in ("image", "label") and isinstance(v, str)
                               and not os.path.isabs(v) else v) for k, v in e.items()} for e in entries]
    return absolute


def write_subset_datalist(datalist: str | os.PathLike, out: str | os.PathLike, fraction: float, seed: int,
                          split: str = "training", exact: int | None = None, per_class: bool = False) -> int:
    """Copy ``datalist`` to ``out`` with its ``split`` reduced to a label subset; paths made absolute."""
    absolute = read_datalist_absolute(datalist)
    if per_class:  # the same rule within each class: balanced, nested subsets
        classes = sorted({e["label"] for e in absolute[split]})
        keep = {id(e) for c in classes
                for e in label_subset([e for e in absolute[split] if e["label"] == c], fraction, seed, exact=exact)}
        absolute[split] = [e for e in absolute[split] if id(e) in keep]
    else:
        absolute[split] = label_subset(absolute[split], fraction, seed, exact=exact)
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
    #: label counts (labelled training images per arm); when given they replace ``fractions``
    counts: tuple[int, ...] = ()
    #: upstream MAE: the unlabelled pool's datalist (empty: ``dataset_dir/unlabelled.json``), the folder the
    #: backbone is cached in (empty: ``work/upstream``; shared by the demo and the study) and its warm-up
    upstream_datalist: str = ""
    upstream_dir: str = ""
    upstream_warmup_epochs: int = 5
    #: TPP warm-up epochs and batch, fine-tuning lr (None: the bundle's)
    tpp_warmup_epochs: int | None = None
    tpp_batch_size: int | None = None
    lr: float | None = None
    #: TPP stage learning rate and pretext settings (None: the bundle's / the pretext's defaults)
    tpp_lr: float | None = None
    pretext_config: dict[str, Any] | None = None
    #: the test metrics recorded per arm (keys of the bundle's metrics.json; all but hd95 in %)
    metrics: tuple[str, ...] = ("dice", "hd95")
    #: ``counts`` are per class (balanced subsets of a classification datalist with integer labels)
    per_class: bool = False
    #: the bundle with ``pretrain_backbone.json`` (empty: ``bundle``)
    upstream_bundle: str = ""
    #: the inits each (amount, seed) runs: both for TPP pairs, ``("random",)`` for a baseline method's arms
    inits: tuple[str, ...] = INITS

    @property
    def cfg_dir(self) -> Path:
        return Path(self.bundle) / "configs"

    def common(self) -> dict[str, Any]:
        return dict(self.overrides, dataset_dir=str(self.dataset_dir), datalist=str(self.datalist),
                    peft_method=self.peft_method, num_workers=0)

    def arms(self) -> list[tuple[float, int, str]]:
        """(label amount, seed, init): the amount is a count when ``counts`` is set, else a fraction."""
        amounts = self.counts or self.fractions
        return [(f, s, i) for f in amounts for s in self.seeds for i in self.inits]

    def num_classes(self) -> int:
        return int(self.overrides.get("num_classes", 2))

    def upstream_root(self) -> Path:
        return Path(self.upstream_dir) if self.upstream_dir else Path(self.work) / "upstream"

    def upstream_settings(self) -> dict[str, Any]:
        """What the cached upstream backbone depends on (a change re-trains it)."""
        if not self.upstream_datalist:  # the pool is the task's own unlabelled.json
            return {"overrides": self.overrides, "epochs": self.upstream_epochs, "dataset_dir": str(self.dataset_dir)}
        model = {k: self.overrides[k] for k in ("image_size", "vit_size", "vit_overrides") if k in self.overrides}
        return {"overrides": model, "epochs": self.upstream_epochs, "warmup_epochs": self.upstream_warmup_epochs,
                "upstream_datalist": str(Path(self.upstream_datalist).resolve())}


def _arm_dir(spec: StudySpec, fraction: float, seed: int, init: str) -> Path:
    tag = f"n{int(fraction)}" if spec.counts else f"frac{fraction:g}"
    return Path(spec.work) / "arms" / f"{tag}_seed{seed}_{init}"


def ensure_upstream(spec: StudySpec, log: Callable[[str], None] = print) -> Path:
    """The upstream MAE backbone (stage 1), cached in ``work/upstream`` and re-used when its settings match."""
    if spec.backbone_ckpt:
        return Path(spec.backbone_ckpt)
    cfg_dir = Path(spec.upstream_bundle) / "configs" if spec.upstream_bundle else spec.cfg_dir
    if not (cfg_dir / "pretrain_backbone.json").is_file():
        raise FileNotFoundError(f"{cfg_dir} has no pretrain_backbone.json to pre-train a backbone upstream: "
                                "pass the pre-trained backbone (--backbone_ckpt, e.g. MedCoSS's checkpoint-299.pth)")
    up = spec.upstream_root()
    ckpt, stamp = up / "models" / "backbone_mae.pt", up / "settings.json"
    settings = spec.upstream_settings()
    if ckpt.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == settings:
        log(f"upstream backbone: re-using {ckpt}")
        return ckpt
    extra: dict[str, Any] = {}
    if spec.upstream_datalist:
        extra = {"tpp_datalist": str(spec.upstream_datalist), "tpp_warmup_epochs": spec.upstream_warmup_epochs}
    # train into <up>.partial and swap it in when complete: a cached backbone of other settings (and its log)
    # survives a rebuild that is killed or fails; a killed rebuild of the same settings resumes.
    partial = up.with_name(up.name + ".partial")
    partial_stamp = partial / "settings.json"
    same = partial_stamp.is_file() and json.loads(partial_stamp.read_text()) == settings
    if partial.exists() and not same:
        shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    atomic_write(partial_stamp, json.dumps(settings, indent=1))
    t0 = time.time()
    common = spec.common()
    if spec.upstream_bundle:  # another bundle: only the model settings carry over
        common = {k: v for k, v in common.items() if k not in ("datalist", "class_names", "num_classes")}
    run_bundle_stage(cfg_dir, ["train.json", "tpp_pretrain.json", "pretrain_backbone.json"],
                     "upstream MAE pre-training of the backbone on the unlabelled pool",
                     **{**common, "bundle_root": str(partial), "peft_method": "full",
                        "tpp_epochs": spec.upstream_epochs, "seed": 0, **extra, "resume": "auto"})
    write_upstream_provenance(spec, partial, time.time() - t0)
    if up.exists():
        old = up.with_name(up.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        up.rename(old)
        partial.rename(up)
        shutil.rmtree(old)
    else:
        partial.rename(up)
    return ckpt


def upstream_log(spec: StudySpec) -> Path:
    """The upstream MAE run's loss log beside the cached backbone."""
    return spec.upstream_root() / "logs" / "upstream" / "tpp_log.jsonl"


def write_upstream_provenance(spec: StudySpec, up: Path, seconds: float) -> Path:
    """``provenance.json`` (settings, pool, loss start / end / plateau, time, commit) and the loss curve
    (``loss_curve.png`` + ``loss_curve.json``) beside the cached upstream backbone."""
    import subprocess

    log = up / "logs" / "upstream" / "tpp_log.jsonl"
    losses = [r["loss"] for r in read_jsonl(log) if r.get("kind") == "loss"]
    pool_manifest = Path(spec.upstream_datalist).parent / "manifest.json" if spec.upstream_datalist else None
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parents[1],
                            capture_output=True, text=True).stdout.strip()
    drop, flat = loss_first_last_10pct(log), loss_plateau(log)
    prov = {"settings": spec.upstream_settings(), "bundle": str(spec.bundle), "iterations": len(losses),
            "seconds": round(seconds, 1), "torch_threads": _threads(), "commit": commit or "unknown",
            "loss_first_10pct": drop[0] if drop else None, "loss_last_10pct": drop[1] if drop else None,
            "plateau_second_to_last_10pct": flat[0] if flat else None,
            "pool": json.loads(pool_manifest.read_text()) if pool_manifest and pool_manifest.is_file() else None}
    if prov["pool"]:
        prov["pool"].pop("files", None)
    atomic_write(up / "loss_curve.json", json.dumps({"loss": losses}))
    plot_losses({"upstream MAE (pool)": log}, up / "loss_curve.png")
    return atomic_write(up / "provenance.json", json.dumps(prov, indent=1))


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def ensure_tpp(spec: StudySpec, backbone: Path | str, seed: int) -> Path:
    """TPP of the target parameters on every training image for ``seed``; re-used when it exists.
    ``backbone`` ``""``: the bundle's seeded random backbone (smoke tests, the benchmark grid's tiny specs)."""
    root = Path(spec.work) / "tpp" / f"seed{seed}"
    ckpt = root / "models" / "tpp_target_params.pt"
    if not ckpt.is_file():
        run_bundle_stage(spec.cfg_dir, ["train.json", "tpp_pretrain.json"], quiet=True, bundle_root=str(root),
                         **spec.common(), backbone_ckpt=str(backbone), pretext=spec.pretext,
                         tpp_epochs=spec.tpp_epochs, seed=seed, **_set(tpp_warmup_epochs=spec.tpp_warmup_epochs,
                                                                        tpp_batch_size=spec.tpp_batch_size,
                                                                        tpp_lr=spec.tpp_lr,
                                                                        pretext_config=spec.pretext_config))
    return ckpt


def save_final_model(network: "torch.nn.Module", path: str | os.PathLike) -> Path:
    """The network as training left it, in the bundle's model.pt format ({"model": state dict}), atomically."""
    import torch

    state = {"model": network.state_dict()}
    return atomic_write(path, lambda f: torch.save(state, f))


def _set(**kw: Any) -> dict[str, Any]:
    """The keyword arguments that are not None (bundle overrides only where the spec sets them)."""
    return {k: v for k, v in kw.items() if v is not None}


def write_count_datalist(datalist: str | os.PathLike, out: str | os.PathLike, count: int, seed: int,
                         per_class: bool = False) -> int:
    """:func:`write_subset_datalist` for an absolute label count (``count`` training entries, or ``count``
    of each class with ``per_class``: the classes of integer labels); returns the subset's size."""
    train = json.loads(Path(datalist).read_text())["training"]
    sizes = [sum(e["label"] == c for e in train) for c in {e["label"] for e in train}] if per_class else [len(train)]
    if not 1 <= count <= min(sizes):
        raise ValueError(f"label count {count} must be in [1, {min(sizes)}] (the training split of {datalist}"
                         + (", per class)" if per_class else ")"))
    return write_subset_datalist(datalist, out, 1.0, seed, exact=count, per_class=per_class)


def run_arm(spec: StudySpec, backbone: Path | str, fraction: float, seed: int, init: str) -> dict[str, Any]:
    """Fine-tune and test one arm; returns its result record (read back from its ``metrics.json``).
    Also one cell of the benchmark grid (:mod:`tpp_monai.benchmark.grid`); ``backbone`` as in :func:`ensure_tpp`."""
    d = _arm_dir(spec, fraction, seed, init)
    done = d / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    subset = d / "datalist.json"
    if spec.counts:
        n_labelled = write_count_datalist(spec.datalist, subset, int(fraction), seed, spec.per_class)
    else:
        n_labelled = write_subset_datalist(spec.datalist, subset, fraction, seed)
    tpp = str(ensure_tpp(spec, backbone, seed)) if init == "tpp" else ""
    its_per_epoch = math.ceil(n_labelled / spec.batch_size)
    rc = dict(spec.common(), bundle_root=str(d), backbone_ckpt=str(backbone), tpp_ckpt=tpp, seed=seed,
              num_iterations=spec.iterations, batch_size=spec.batch_size,
              val_interval=max(1, round(spec.val_every / its_per_epoch)), **_set(lr=spec.lr))
    t0 = time.time()
    rc["datalist"] = str(subset)
    # one process: fine-tune, then test the FINAL model (models/final_model.pt, written after training):
    # the bundle's model.pt is the best one on the validation split, and the study selects nothing
    # (its validation split may be the test split, for the convergence view). rc's tpp_ckpt overrides
    # evaluate.json's "" so the TPP init still applies to the training.
    final = d / "models" / "final_model.pt"
    run_bundle_stage(spec.cfg_dir, ["train.json", "evaluate.json"], quiet=True, **rc, model_ckpt=str(final), run=[
        "$@train#trainer.run()",
        f"$tpp_monai.study.save_final_model(@network, {str(final)!r})",
        "$@evaluate#evaluator.run()",
        "$tpp_monai.bundle.save_metrics_json(@evaluate#evaluator, @output_dir + '/metrics.json')"])
    m = json.loads((d / "eval" / "metrics.json").read_text())
    if spec.counts:  # the record's fraction: of the training split
        fraction = n_labelled / len(json.loads(Path(spec.datalist).read_text())["training"])
    rec = {"fraction": fraction, "seed": seed, "init": init, "n_labelled": n_labelled,
           **{k: float(m[k]) * (1 if k in LOWER_IS_BETTER else 100) for k in spec.metrics},
           "seconds": round(time.time() - t0, 1)}
    atomic_write(done, json.dumps(rec, indent=1))
    return rec


#: spec fields that may change between runs into one work folder (more seeds or amounts add arms)
EXTENDABLE = ("fractions", "seeds", "counts")

#: The small-scale setting of the demo and the study, version 3 (fixed in
#: docs/results/study_tumour_crops_v3_mri/PROTOCOL.md before its run): version 2's upstream ViT-tiny (MAE on a
#: pool without the downstream domain: 64 px, 8-px patches, 1400 iterations) and task, restricted to the brain-MRI
#: crops (``volumes``: the modality the pool lacks, where a mechanism pilot saw TPP's loss fall 4x more than on
#: the chest-CT crops); TPP of the Adapter for the paper's 500 epochs (40 warm-up) on all 25 training crops,
#: Adapter fine-tuning for 300 iterations on 4, 1 or 2 labelled crops per class, five seeds. ``quick``: CI-sized.
TUMOUR_CROPS_SETTING: dict[str, Any] = dict(
    bundle="bundles/mhist_adapter_tpp", datalist_name="datalist_tumour_crops_cls.json", num_classes=2,
    class_names=["no_tumour", "tumour"], metrics=("auc", "acc"), per_class=True, lr=1e-3,
    image_size=64, patch_size=8, vit_size="tiny", depth=6, upstream_epochs=100, upstream_warmup_epochs=2,
    tpp_epochs=500, tpp_warmup_epochs=40, tpp_batch_size=16, iterations=300, batch_size=8, val_every=50,
    counts=(4, 1, 2), seeds=(0, 1, 2, 3, 4), volumes=("brain1", "brain2"), work="tumour_crops_v3_mri")
#: Version 2 (docs/results/study_tumour_crops_v2/PROTOCOL.md, run in December 2026): chest CT and brain MRI crops,
#: TPP 200 epochs = 1000 iterations; its TPP loss fell by ~1% and fine-tuning stayed at chance.
TUMOUR_CROPS_V2: dict[str, Any] = dict(
    TUMOUR_CROPS_SETTING, tpp_epochs=200, tpp_warmup_epochs=16, counts=(1, 2, 4, 8), volumes=None,
    work="tumour_crops_v2")
#: Version 1 (docs/results/study_tumour_crops/PROTOCOL.md, run in December 2026): kept so that study can be
#: re-run (``tumour_crops_spec(..., **TUMOUR_CROPS_V1)``); its TPP loss did not fall and fine-tuning stayed at chance.
TUMOUR_CROPS_V1: dict[str, Any] = dict(
    TUMOUR_CROPS_V2, image_size=128, patch_size=16, upstream_epochs=12, upstream_warmup_epochs=2,
    tpp_epochs=15, tpp_warmup_epochs=2, iterations=40, val_every=20, counts=(1, 4), work="tumour_crops")
TUMOUR_CROPS_QUICK: dict[str, Any] = dict(
    TUMOUR_CROPS_SETTING, image_size=64, patch_size=16, depth=2, upstream_epochs=1, upstream_warmup_epochs=0,
    tpp_epochs=2, tpp_warmup_epochs=0, iterations=4, batch_size=4, val_every=2, counts=(1, 2), seeds=(0, 1),
    work="tumour_crops_quick")
#: The segmentation counterpart of version 3 (version 4, fixed in
#: docs/results/study_tumour_crops_seg_v4_mri/PROTOCOL.md before its run): the same upstream ViT-tiny and brain-MRI
#: volumes, the tumour *masks* of the crops (``datalist_tumour_crops.json``: brain1's 7 tumour crops for training,
#: brain2's for test), the demo's ViT + Adapter + UNETR-decoder segmentation bundle, TPP as the paper does it for
#: segmentation (MAE decoder inherited and trained, 1000 epochs, 40 warm-up), fine-tuning 300 iterations on 4, 1
#: or 2 labelled crops, five seeds.
TUMOUR_CROPS_SEG: dict[str, Any] = dict(
    TUMOUR_CROPS_SETTING, bundle="bundles/demo_ct_adapter_tpp", datalist_name="datalist_tumour_crops.json",
    class_names=["background", "tumour"], metrics=("dice", "hd95"), per_class=False, tpp_epochs=1000,
    tpp_warmup_epochs=40, work="tumour_crops_seg_v4_mri")
TUMOUR_CROPS_SEG_QUICK: dict[str, Any] = dict(
    TUMOUR_CROPS_QUICK, **{k: TUMOUR_CROPS_SEG[k] for k in ("bundle", "datalist_name", "class_names", "metrics",
                                                             "per_class")}, work="tumour_crops_seg_quick")
#: task -> (full setting, CI-sized setting) of the demo's and the study's tumour-crop studies
TUMOUR_CROPS_TASKS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "cls": (TUMOUR_CROPS_SETTING, TUMOUR_CROPS_QUICK), "seg": (TUMOUR_CROPS_SEG, TUMOUR_CROPS_SEG_QUICK)}


def tumour_crops_setting(quick: bool = False, task: str = "cls") -> dict[str, Any]:
    """The tumour-crop setting of ``task`` (``cls``: :data:`TUMOUR_CROPS_SETTING`, ``seg``:
    :data:`TUMOUR_CROPS_SEG`), or its CI-sized variant with ``quick``."""
    if task not in TUMOUR_CROPS_TASKS:
        raise ValueError(f"unknown tumour-crop task {task!r}; use one of {sorted(TUMOUR_CROPS_TASKS)}")
    return TUMOUR_CROPS_TASKS[task][1 if quick else 0]


#: the bundle that pre-trains the backbone upstream (it has pretrain_backbone.json)
UPSTREAM_BUNDLE = "bundles/demo_ct_adapter_tpp"
UPSTREAM_CACHE = Path(".tpp_cache/upstream")


def write_volume_datalist(datalist: str | os.PathLike, out: str | os.PathLike, volumes: Iterable[str]) -> Path:
    """``datalist`` with only the entries of ``volumes`` (their ``"volume"`` field) in every split, written
    atomically to ``out``; relative image / label paths are made absolute (against ``datalist``'s folder), as
    the new file lives elsewhere."""
    keep = set(volumes)
    sub = {k: [e for e in v if e.get("volume") in keep] if isinstance(v, list) else v
           for k, v in read_datalist_absolute(datalist).items()}
    if not sub.get("training"):
        raise ValueError(f"{datalist} has no training entry of the volumes {sorted(keep)}")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    return Path(atomic_write(out, json.dumps(sub, indent=1)))


def tumour_crops_spec(root: str | os.PathLike, cache: str | os.PathLike, pool: str | os.PathLike,
                      work: str | os.PathLike, quick: bool = False, task: str = "cls", **changes: Any) -> StudySpec:
    """The study spec of :func:`tumour_crops_setting` (bundles under the repository ``root``); the upstream backbone
    is cached under ``.tpp_cache/upstream/<model>-e<epochs>`` (shared by the demo, the studies and
    scripts/build_upstream.py: every task's setting has the same upstream model)."""
    s = dict(tumour_crops_setting(quick, task), **changes)
    datalist = Path(cache) / s["datalist_name"]
    if s.get("volumes"):  # the task restricted to some volumes (every split), written beside the runs
        datalist = write_volume_datalist(datalist, Path(work) / f"datalist_{'_'.join(s['volumes'])}.json",
                                         s["volumes"])
    patch = s.get("patch_size", 16)
    tag = f"vit-{s['vit_size']}-d{s['depth']}-{s['image_size']}px" + (f"-p{patch}" if patch != 16 else "") \
        + f"-e{s['upstream_epochs']}"
    root = Path(root)
    return StudySpec(
        bundle=str(root / s["bundle"]), upstream_bundle=str(root / UPSTREAM_BUNDLE), metrics=tuple(s["metrics"]),
        per_class=s["per_class"], lr=s["lr"],
        dataset_dir=str(cache), datalist=str(datalist), work=str(work),
        fractions=(1.0,), counts=tuple(s["counts"]), seeds=tuple(s["seeds"]), iterations=s["iterations"],
        batch_size=s["batch_size"], val_every=s["val_every"], upstream_epochs=s["upstream_epochs"],
        upstream_warmup_epochs=s["upstream_warmup_epochs"], tpp_epochs=s["tpp_epochs"],
        tpp_warmup_epochs=s["tpp_warmup_epochs"], tpp_batch_size=s["tpp_batch_size"],
        upstream_datalist=str(Path(pool) / "unlabelled.json"),
        upstream_dir=str((UPSTREAM_CACHE / tag).resolve()),
        overrides=dict(image_size=s["image_size"], vit_size=s["vit_size"],
                       vit_overrides={"depth": s["depth"], **({"patch_size": patch} if patch != 16 else {})},
                       num_classes=s["num_classes"], class_names=s["class_names"]))


#: Issue 24's study, version 2 (docs/results/study_effnet_tumour_crops/PROTOCOL.md, fixed before its run): the
#: ImageNet EfficientNet-Lite0 of a registry package, frozen; Conv-Adapter fine-tuned from its own init and from
#: DINO-TPP (lr 4e-4, 4096-way head, 250 steps), tumour-crop classification (C, 8 and 2 labels per class) and
#: segmentation (S, 8 labels) at 64 px, 5 seeds; Dutt et al.'s CNN PEFT baselines at 8 labels without TPP.
EFFNET_SETTING: dict[str, Any] = dict(
    image_size=64, iterations=200, batch_size=8, lr=1e-3, val_every=50, seeds=(0, 1, 2, 3, 4),
    tpp_batch_size=16, tpp_lr=4e-4, pretext="dino", method="conv_adapter",
    baselines=("tsa", "norm_tuning", "bitfit", "ssf_cnn"),
    tasks={
        "cls": dict(bundle="bundles/tumour_crops_cls_effnet_convadapter_tpp", counts=(8, 2),
                    datalist_name="datalist_tumour_crops_cls.json", per_class=True, metrics=("auc", "f1", "acc"),
                    tpp_epochs=50, tpp_warmup_epochs=5),
        "seg": dict(bundle="bundles/tumour_crops_effnet_convadapter_tpp", datalist_name="datalist_tumour_crops.json",
                    counts=(8,), per_class=False, metrics=("dice", "hd95"), tpp_epochs=250, tpp_warmup_epochs=25),
    },
    pretext_config={"global_size": 64, "local_size": 28, "out_dim": 4096}, work="effnet_tumour_crops_v2")
#: Version 1 (PROTOCOL_v1.md; stopped: its TPP stage was inert, see PROTOCOL.md): kept so that it can be re-run
EFFNET_V1: dict[str, Any] = dict(
    EFFNET_SETTING, iterations=300, tpp_lr=None, pretext_config=None, work="effnet_tumour_crops", tasks={
        "cls": dict(EFFNET_SETTING["tasks"]["cls"], counts=(8, 2)),
        "seg": dict(EFFNET_SETTING["tasks"]["seg"], counts=(8, 2), tpp_epochs=150, tpp_warmup_epochs=15)})
#: CI-sized: the same code path, a few iterations
EFFNET_QUICK: dict[str, Any] = dict(
    EFFNET_SETTING, image_size=32, iterations=3, batch_size=4, val_every=3, seeds=(0, 1), tpp_batch_size=4,
    baselines=("bitfit",), pretext_config={"global_size": 32, "local_size": 16, "out_dim": 256},
    work="effnet_tumour_crops_quick",
    tasks={k: dict(v, counts=(2,), tpp_epochs=1, tpp_warmup_epochs=0) for k, v in EFFNET_SETTING["tasks"].items()})


def effnet_specs(root: str | os.PathLike, cache: str | os.PathLike, weights: str | os.PathLike,
                 work: str | os.PathLike, quick: bool = False, tasks: Iterable[str] = ("cls", "seg"),
                 setting: dict[str, Any] | None = None) -> list[tuple[str, str, StudySpec]]:
    """(task, method, spec) of :data:`EFFNET_SETTING` (or ``setting``) in the protocol's order: per task, the
    Conv-Adapter TPP pairs (``counts`` in order), then each baseline method's arms (no TPP) at the largest count."""
    s = setting or (EFFNET_QUICK if quick else EFFNET_SETTING)
    out = []
    for task in tasks:
        t = s["tasks"][task]
        base = dict(bundle=str(Path(root) / t["bundle"]), dataset_dir=str(cache),
                    datalist=str(Path(cache) / t["datalist_name"]), fractions=(1.0,), seeds=tuple(s["seeds"]),
                    pretext=s["pretext"], iterations=s["iterations"], batch_size=s["batch_size"],
                    val_every=s["val_every"], tpp_epochs=t["tpp_epochs"], tpp_warmup_epochs=t["tpp_warmup_epochs"],
                    tpp_batch_size=s["tpp_batch_size"], lr=s["lr"], metrics=tuple(t["metrics"]),
                    per_class=t["per_class"], backbone_ckpt=str(weights), tpp_lr=s.get("tpp_lr"),
                    pretext_config=s.get("pretext_config"), overrides={"image_size": s["image_size"]})
        out.append((task, s["method"], StudySpec(**base, work=str(Path(work) / task / s["method"]),
                                                 peft_method=s["method"], counts=tuple(t["counts"]))))
        for m in s["baselines"]:
            out.append((task, m, StudySpec(**base, work=str(Path(work) / task / m), peft_method=m,
                                           counts=(max(t["counts"]),), inits=("random",))))
    return out


def check_resumable(spec: StudySpec) -> None:
    """Refuse a work folder whose finished arms were run with other settings (they would be mixed in)."""
    stamp = Path(spec.work) / "spec.json"
    if not stamp.is_file():
        return
    old, new = json.loads(stamp.read_text()), json.loads(json.dumps(asdict(spec)))
    defaults = json.loads(json.dumps(asdict(StudySpec(bundle="", dataset_dir="", datalist="", work=""))))
    # a field added to StudySpec after the stamp was written counts as its default there
    changed = sorted(k for k in set(old) | set(new)
                     if k not in EXTENDABLE and old.get(k, defaults.get(k)) != new.get(k))
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
        paired = paired_difference(base, tpp, higher_is_better=metric not in LOWER_IS_BETTER)
        rows.append({"fraction": f, "n_labelled": by[(f, seeds[0], "random")]["n_labelled"], "seeds": seeds,
                     "random": mean_std(base), "tpp": mean_std(tpp), "diff": mean_std(diff),
                     "diff_per_seed": diff, "tpp_better": paired.better, "ci": (paired.lo, paired.hi)})
    return rows


def pooled(results: Iterable[dict[str, Any]], metric: str) -> PairedDifference | None:
    """The paired statistic over every (label amount, seed) pair of ``results``."""
    rows = summarise(results, metric)
    if not rows:
        return None
    by = {(r["fraction"], r["seed"], r["init"]): r[metric] for r in results}
    keys = [(r["fraction"], s) for r in rows for s in r["seeds"]]
    return paired_difference([by[(f, s, "random")] for f, s in keys], [by[(f, s, "tpp")] for f, s in keys],
                             higher_is_better=metric not in LOWER_IS_BETTER)


def markdown_table(rows: list[dict[str, Any]], metric: str = "dice", unit: str = "%") -> str:
    """The study table: mean +- std per arm, paired difference and its sign count per label fraction."""
    name = METRIC_NAMES.get(metric, metric)
    better = "lower" if metric in LOWER_IS_BETTER else "higher"
    lines = [f"| labels | n | no TPP {name} ({unit}) | TPP {name} ({unit}) | paired diff (TPP - no TPP) | "
             f"95% CI (bootstrap) | per seed | TPP {better} |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        per_seed = ", ".join(f"{d:+.2f}" for d in r["diff_per_seed"])
        lo, hi = r["ci"]
        lines.append(f"| {100 * r['fraction']:.3g}% | {r['n_labelled']} | {r['random'][0]:.2f} +- {r['random'][1]:.2f} | "
                     f"{r['tpp'][0]:.2f} +- {r['tpp'][1]:.2f} | {r['diff'][0]:+.2f} +- {r['diff'][1]:.2f} | "
                     f"[{lo:+.2f}, {hi:+.2f}] | {per_seed} | {r['tpp_better']}/{len(r['seeds'])} |")
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


def loss_first_last_10pct(log: str | os.PathLike) -> tuple[float, float] | None:
    """(mean of the first 10% of a loss log's iterations, mean of the last 10%): the start / end that every
    report of this project quotes (the TPP learning report computes the same from its own records)."""
    n = sum(1 for r in read_jsonl(log) if r.get("kind") == "loss")
    return loss_drop(log, head=max(1, n // 10)) if n else None


def loss_plateau(log: str | os.PathLike, frac: float = 0.1) -> tuple[float, float] | None:
    """(mean loss of the second-to-last ``frac`` of iterations, of the last ``frac``): equal when flattened."""
    losses = [r["loss"] for r in read_jsonl(log) if r.get("kind") == "loss"]
    k = max(1, int(len(losses) * frac))
    if len(losses) < 2 * k:
        return None
    return sum(losses[-2 * k:-k]) / k, sum(losses[-k:]) / k


def tpp_loss_changes(work: str | os.PathLike, seeds: Iterable[int]) -> dict[int, float]:
    """Relative change of the TPP pretext loss per seed (last vs first 10% of its iterations; negative: it fell),
    from each seed's TPP loss log under ``work/tpp/seed<N>``; seeds without a finished log are left out."""
    out = {}
    for sd in seeds:
        log = Path(work) / "tpp" / f"seed{sd}" / "logs" / "tpp_log.jsonl"
        v = loss_first_last_10pct(log)
        if v:
            out[sd] = v[1] / v[0] - 1
    return out


def tpp_loss_change_text(work: str | os.PathLike, seeds: Iterable[int]) -> str:
    """e.g. ``-1.2% [95% CI -1.5%, -0.9%], fell in 5/5 seeds`` (bootstrap over seeds, tpp_monai.reporting)."""
    from tpp_monai.reporting import bootstrap_mean_ci

    ch = list(tpp_loss_changes(work, seeds).values())
    if not ch:
        return "no finished TPP run"
    lo, hi = bootstrap_mean_ci(ch)
    return (f"{100 * sum(ch) / len(ch):+.2f}% [95% CI {100 * lo:+.2f}%, {100 * hi:+.2f}%], "
            f"fell in {sum(c < 0 for c in ch)}/{len(ch)} seeds")


def target_norms(ckpt: str | os.PathLike) -> dict[str, float]:
    """Mean Frobenius norm of a target-parameter checkpoint's tensors, grouped by their last two name parts.

    What TPP taught the target parameters, in one line per kind: e.g. an Adapter's ``up.weight`` is zero
    at insertion, so its norm after TPP is how far the pretext moved the adapter's output.
    """
    from tpp_monai.peft.target_checkpoint import read_target_checkpoint

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
        its, losses = [r["iteration"] for r in recs], [r["loss"] for r in recs]
        ax.plot(its, losses, lw=0.6, alpha=0.45 if len(recs) >= 100 else 1.0)
        if len(recs) >= 100:  # a running mean over 5% of the run, so a fall of a few per cent is visible
            import numpy as np

            w = max(5, len(recs) // 20)
            ax.plot(its[w - 1:], np.convolve(losses, np.ones(w) / w, mode="valid"), lw=1.6,
                    label=f"running mean ({w} its)")
            ax.legend(fontsize=7)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("iteration")
        ax.set_ylabel("loss")
    fig.tight_layout()
    out = atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    return out


def val_curve(arm_dir: str | os.PathLike, metric: str, batch_size: int, n_labelled: int) -> list[tuple[int, float]]:
    """(fine-tuning iteration, validation metric) of one arm, from its ``logs/val_log.jsonl``."""
    per_epoch = math.ceil(n_labelled / batch_size)
    scale = 1 if metric in LOWER_IS_BETTER else 100
    return [(int(r["epoch"]) * per_epoch, scale * float(r[metric])) for r in read_jsonl(Path(arm_dir) / "logs" / "val_log.jsonl")
            if r.get("kind") == "metrics" and metric in r]


def plot_convergence(spec: StudySpec, results: list[dict[str, Any]], metric: str, path: str | os.PathLike,
                     title: str = "") -> Path:
    """Validation metric against fine-tuning iteration, mean +- std over seeds, both inits, one panel per
    label amount: an init effect shows first as faster convergence."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    amounts = sorted({r["fraction"] for r in results})
    fig, axes = plt.subplots(1, len(amounts), figsize=(4.2 * len(amounts), 3.4), squeeze=False)
    for ax, f in zip(axes[0], amounts):
        for init, colour in (("random", "tab:blue"), ("tpp", "tab:red")):
            curves = []
            for r in (r for r in results if r["fraction"] == f and r["init"] == init):
                amount = r["n_labelled"] // (spec.num_classes() if spec.per_class else 1) if spec.counts else f
                curves.append(dict(val_curve(_arm_dir(spec, amount, r["seed"], init), metric, spec.batch_size,
                                             r["n_labelled"])))
            its = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
            if not its:
                continue
            vals = np.array([[c[i] for i in its] for c in curves])
            m, sd = vals.mean(0), vals.std(0, ddof=1) if len(vals) > 1 else np.zeros(len(its))
            ax.plot(its, m, marker="o", color=colour, label=f"{INIT_LABEL[init]} (n={len(curves)} seeds)")
            ax.fill_between(its, m - sd, m + sd, color=colour, alpha=0.15)
        n = next(r["n_labelled"] for r in results if r["fraction"] == f)
        ax.set_title(f"{n} labelled images", fontsize=10)
        ax.set_xlabel("fine-tuning iteration")
        ax.set_ylabel(f"validation {METRIC_NAMES.get(metric, metric)}" + ("" if metric in LOWER_IS_BETTER else " (%)"))
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out = atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    return out
