"""Throughput of the TPP stage (MAE, DINO) and of fine-tuning, end to end including data loading.

    python benchmarks/tpp_throughput.py                      # ViT-B/16 at 224, batch 8, 1 and 2 processes
    python benchmarks/tpp_throughput.py --size tiny --img 32 --steps 2 --batch 4   # quick check

Every configuration runs the library's own engines (``TPPTrainer`` for TPP, MONAI's
``SupervisedTrainer`` for fine-tuning, Adapter with bottleneck 64) over PNG files read through the
bundles' transforms (``cls_transforms``), in a fresh Python subprocess (``run_workers``); N-process
rows run N gloo processes (``spawn_cpu``; CUDA: one GPU per process is not set up here, use
torchrun) with the *global* batch ``--batch`` split over them. Timing per iteration from ignite's
events on rank 0: data time = ``GET_BATCH_STARTED -> GET_BATCH_COMPLETED`` (reading, decoding,
resizing or the cache fetch, collation), step time = the whole iteration (data + forward + backward
+ optimiser + DDP all-reduce). One warm-up iteration, then the median of ``--steps``.

Printed ratios:
* MAE-TPP step / fine-tuning step, frozen and trainable MAE decoder (8 blocks, width 512, 16 heads,
  as MedCoSS/MAE); the physical estimate is ~0.55 frozen and ~0.7 trainable (encoder on 25% of the
  tokens + decoder on all tokens, against the encoder on all tokens);
* data-loading share of the step, without cache and with the in-memory cache (``cached_dataset``);
* DDP scaling efficiency = (images/s with N processes) / (N x images/s with one).

Results go to ``benchmarks/results/tpp_throughput_<size>_<device>.md``. On a CPU shared with other
jobs the absolute figures move with the load; the ratios of one invocation are what to read.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tpp_monai.benchmark.workers import run_workers  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ("mae_frozen", "mae_trainable", "dino", "finetune")


class StepTimer:
    """Per-iteration data and step times from an ignite engine's events (first iteration = warm-up)."""

    def __init__(self) -> None:
        self.data, self.step = [], []
        self._t0 = self._g0 = 0.0

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.GET_BATCH_STARTED, self._get_started)
        engine.add_event_handler(Events.GET_BATCH_COMPLETED, self._get_done)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iter_done)

    def _now(self) -> float:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def _get_started(self, engine) -> None:
        self._g0 = self._now()

    def _get_done(self, engine) -> None:
        self.data.append(self._now() - self._g0)

    def _iter_done(self, engine) -> None:
        self.step.append(self._now() - self._g0)


def write_images(folder: str, n: int, side: int = 256) -> list[dict]:
    """``n`` RGB PNG crops of real photographs/micrographs bundled with scikit-image (decoding cost of
    natural images, not of noise)."""
    import numpy as np
    from PIL import Image
    from skimage import data as skd

    sources = [skd.immunohistochemistry(), skd.retina(), skd.astronaut(), skd.coffee(), skd.chelsea()]
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        src = sources[i % len(sources)]
        y = int(rng.integers(0, src.shape[0] - side + 1))
        x = int(rng.integers(0, src.shape[1] - side + 1))
        path = os.path.join(folder, f"img{i:04d}.png")
        Image.fromarray(np.ascontiguousarray(src[y:y + side, x:x + side, :3])).save(path)
        out.append({"image": path, "label": i % 2})
    return out


def _run_rank(rank: int, world: int, mode: str, size: str, img: int, batch: int, steps: int, cache: str,
              datalist: list, out_file: str) -> None:
    import torch

    from tpp_monai.backbones.vit import build_vit
    from tpp_monai.data.cache import cached_dataset
    from tpp_monai.data.transforms import cls_transforms
    from tpp_monai.engines.distributed import global_batch_loader
    from tpp_monai.peft import apply_peft

    device = torch.device("cpu")
    torch.manual_seed(0)
    t0 = time.perf_counter()
    ds = cached_dataset(datalist, cls_transforms(train=False, image_size=img, in_channels=3), cache=cache)
    cache_s = time.perf_counter() - t0
    loader = global_batch_loader(ds, batch, seed=0)
    n_iter = steps + 1
    vit = build_vit(size, img_size=img)
    apply_peft(vit, "adapter", {"bottleneck": 64})
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as tmp:
        if mode == "finetune":
            from monai.engines import SupervisedTrainer

            from tpp_monai.bundle.networks import build_classifier, build_optimizer
            from tpp_monai.engines.distributed import wrap_ddp

            net = build_classifier(vit, num_classes=2)
            trainer = SupervisedTrainer(
                device=device, max_epochs=1, epoch_length=n_iter, train_data_loader=loader,
                network=wrap_ddp(net, device, find_unused_parameters=True), optimizer=build_optimizer(net),
                loss_function=torch.nn.CrossEntropyLoss(),
            )
            timer.attach(trainer)
        else:
            from tpp_monai.engines.optim import build_optimizer
            from tpp_monai.engines.tpp_trainer import TPPTrainer
            from tpp_monai.pretext.dino import DINOPretext
            from tpp_monai.pretext.mae import MAEPretext

            if mode == "dino":
                task = DINOPretext(vit)
            else:  # full-size MAE decoder (MedCoSS / MAE: 8 blocks, width 512, 16 heads)
                task = MAEPretext(vit, decoder_dim=512, decoder_depth=8, decoder_heads=16)
                task.set_decoder_trainable(mode == "mae_trainable")
            trainer = TPPTrainer(
                device=device, max_epochs=1, epoch_length=n_iter, data_loader=loader, task=task,
                optimizer=build_optimizer(task), output_dir=tmp, checkpoint_every_epochs=None, tensorboard=False,
                log_every=10**6, seed=0, handlers=[timer],
            )
        if len(loader) < n_iter:
            raise SystemExit(f"{len(datalist)} images give {len(loader)} iterations < {n_iter}; pass more --images")
        trainer.run()
    if rank == 0:
        data, step = timer.data[1:], timer.step[1:]
        row = {"mode": mode, "procs": world, "cache": cache, "batch": batch, "size": size, "img": img,
               "step_s": statistics.median(step), "data_s": statistics.median(data),
               "images_per_s": batch / statistics.median(step), "cache_build_s": cache_s, "steps": len(step)}
        with open(out_file, "w") as f:
            json.dump(row, f)


def worker(mode: str, size: str, img: int, batch: int, steps: int, cache: str, procs: int, images: int) -> dict:
    import torch

    from tpp_monai.engines.distributed import spawn_cpu

    with tempfile.TemporaryDirectory() as tmp:
        datalist = write_images(tmp, images, side=max(img + img // 7, 32))
        out = os.path.join(tmp, "row.json")
        if procs == 1:
            _run_rank(0, 1, mode, size, img, batch, steps, cache, datalist, out)
        else:
            os.environ.setdefault("TPP_THREADS_PER_RANK", str(max(1, torch.get_num_threads() // procs)))
            spawn_cpu(_run_rank, procs, mode, size, img, batch, steps, cache, datalist, out)
        with open(out) as f:
            row = json.load(f)
    row["threads"] = torch.get_num_threads()
    return row


def configurations(args) -> dict[str, list[str]]:
    common = ["--size", args.size, "--img", str(args.img), "--batch", str(args.batch), "--steps", str(args.steps),
              "--images", str(args.images)]
    runs = {}
    for mode in MODES:
        runs[f"{mode}-1-none"] = [*common, "--mode", mode, "--cache", "none", "--procs", "1"]
    runs["mae_frozen-1-memory"] = [*common, "--mode", "mae_frozen", "--cache", "memory", "--procs", "1"]
    runs["finetune-1-memory"] = [*common, "--mode", "finetune", "--cache", "memory", "--procs", "1"]
    for n in args.procs:
        if n > 1:
            for mode in ("mae_frozen", "finetune"):
                runs[f"{mode}-{n}-memory"] = [*common, "--mode", mode, "--cache", "memory", "--procs", str(n)]
    return runs


def table(rows: list[dict], args) -> str:
    def get(mode, procs=1, cache="none"):
        return next((r for r in rows if r["mode"] == mode and r["procs"] == procs and r["cache"] == cache), None)

    lines = [
        f"# TPP throughput, ViT-{args.size}/{args.img}, global batch {args.batch}, CPU "
        f"({platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {rows[0]['threads']})",
        "",
        f"Median of {args.steps} iterations after one warm-up; Adapter (bottleneck 64); {args.images} PNG images "
        "through cls_transforms; step = data + forward + backward + AdamW (+ DDP all-reduce).",
        "",
        "| mode | processes | cache | step s | data s | data share | images/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['procs']} | {r['cache']} | {r['step_s']:.3f} | {r['data_s']:.4f} | "
                     f"{100 * r['data_s'] / r['step_s']:.1f}% | {r['images_per_s']:.2f} |")
    lines += ["", "| ratio | measured | expected |", "|---|---|---|"]
    ft = get("finetune")
    for mode, exp in (("mae_frozen", "~0.55"), ("mae_trainable", "~0.7"), ("dino", "-")):
        r = get(mode)
        if r and ft:
            lines.append(f"| {mode} step / fine-tuning step | {r['step_s'] / ft['step_s']:.3f} | {exp} |")
    for mode in ("mae_frozen", "finetune"):
        a, b = get(mode, 1, "none"), get(mode, 1, "memory")
        if a and b:
            lines.append(f"| {mode} data share, no cache -> memory cache | {100 * a['data_s'] / a['step_s']:.1f}% -> "
                         f"{100 * b['data_s'] / b['step_s']:.1f}% | lower |")
        for n in args.procs:
            one, many = get(mode, 1, "memory"), get(mode, n, "memory")
            if n > 1 and one and many:
                eff = many["images_per_s"] / (n * one["images_per_s"])
                lines.append(f"| {mode} DDP scaling efficiency, {n} processes | {100 * eff:.0f}% | 100% ideal |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="base")
    ap.add_argument("--img", type=int, default=224)
    ap.add_argument("--batch", type=int, default=8, help="global batch (split over the processes)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--images", type=int, default=40)
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="mae_frozen", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--cache", default="none", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.mode, args.size, args.img, args.batch, args.steps, args.cache,
                                args.procs[0], args.images)))
        return
    rows = run_workers(__file__, configurations(args))
    text = table(rows, args)
    print(text)
    out = args.out or os.path.join(ROOT, "benchmarks", "results", f"tpp_throughput_{args.size}_cpu.md")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out + ".tmp", "w") as f:
        f.write(text)
    os.replace(out + ".tmp", out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
