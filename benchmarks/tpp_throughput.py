"""Throughput of the TPP stage (MAE, DINO) and of fine-tuning, end to end including data loading.

    python benchmarks/tpp_throughput.py                      # ViT-B/16 at 224: step ratio at batch 64, engine rows at 8
    python benchmarks/tpp_throughput.py --size tiny --img 32 --steps 2 --ratio_batch 4 --batch 4   # quick check

Two parts, each in fresh Python subprocesses (``run_workers``):

1. **Step ratio** (``--ratio_batch``, default 64 as the paper's TPP batch; 0 skips it): one process, one
   thread, an Adapter (bottleneck 64) ViT with a linear head (fine-tuning) and two MAE tasks (decoder 8
   blocks x 512, 16 heads, frozen / trained) on one in-memory batch. Each round runs the three steps
   (forward + backward + AdamW) one after the other, so load from other jobs on a shared machine hits
   the three alike; round 0 is the warm-up and counts the FLOPs (:mod:`tpp_monai.benchmark.flops`),
   then the median of ``--steps`` rounds. Printed: MAE-TPP step / fine-tuning step as measured time,
   counted FLOPs, the shape estimate and the issue's physical estimate (~0.55 frozen, ~0.7 trained:
   encoder on 25% of the tokens + decoder on all tokens, against the encoder on all tokens).
2. **Engine rows** (``--batch``, global batch, default 8; 0 skips them): the library's own engines
   (``TPPTrainer`` for TPP, MONAI's ``SupervisedTrainer`` for fine-tuning, Adapter bottleneck 64) over PNG
   files read through the bundles' transforms (``cls_transforms``); N-process rows run N gloo processes
   (``spawn_cpu``; CUDA: use torchrun) with the global batch split over them. Timing per iteration from
   ignite's events on rank 0: data time = ``GET_BATCH_STARTED -> GET_BATCH_COMPLETED`` (reading,
   decoding, resizing or the cache fetch, collation), step time = the whole iteration. One warm-up
   iteration, then the median of ``--steps``. Printed: data-loading share without cache and with the
   in-memory cache (``cached_dataset``); DDP scaling efficiency = (images/s with N processes) / (N x
   images/s with one); these configurations run one after another, so on a shared CPU their step times
   (and the ratios between rows) move with the load.

Results go to ``benchmarks/results/tpp_throughput_<size>_cpu.md`` with the date, the load average and
the command line.
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
from tpp_monai.benchmark.workers import run_workers, write_results  # noqa: E402

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

            from tpp_monai.bundle.networks import build_classifier
            from tpp_monai.engines.optim import build_optimizer
            from tpp_monai.engines.distributed import wrap_ddp

            net = build_classifier(vit, num_classes=2)
            trainer = SupervisedTrainer(
                device=device, max_epochs=1, epoch_length=n_iter, train_data_loader=loader,
                network=wrap_ddp(net, device, find_unused_parameters=True), optimizer=build_optimizer(net, lr=1e-4),
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
                optimizer=build_optimizer(task, lr=1.5e-3), output_dir=tmp, checkpoint_every_epochs=None, tensorboard=False,
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


def interleaved_ratio(size: str, img: int, batch: int, steps: int, bottleneck: int = 64, threads: int = 1) -> dict:
    """MAE-TPP (frozen and trained decoder) vs fine-tuning, the three steps interleaved in one process.

    ``threads`` torch threads (1: the rule on a shared machine); round ``r`` runs one fine-tuning step, one
    frozen-decoder MAE step and one trained-decoder MAE step on the same in-memory batch, so a load change
    on a shared machine hits the three alike. The first round is the warm-up and also counts the FLOPs
    (``count_flops``); the median of the next ``steps`` rounds is reported, with the FLOP ratios and the
    shape estimate (``mae_finetune_ratio``).
    """
    import torch
    import torch.nn.functional as F

    from tpp_monai.backbones.vit import build_vit
    from tpp_monai.benchmark.flops import StepShape, count_flops, mae_finetune_ratio
    from tpp_monai.bundle.networks import build_classifier
    from tpp_monai.engines.optim import build_optimizer
    from tpp_monai.peft import apply_peft
    from tpp_monai.pretext.mae import MAEPretext

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    x = torch.rand(batch, 3, img, img)
    y = torch.randint(0, 2, (batch,))

    def adapter_vit():
        vit = build_vit(size, img_size=img)
        apply_peft(vit, "adapter", {"bottleneck": bottleneck})
        return vit

    net = build_classifier(adapter_vit(), num_classes=2).train()
    ft_opt = build_optimizer(net, lr=1e-4)
    steps_fn = {}

    def ft_step() -> None:
        ft_opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
        ft_opt.step()

    steps_fn["finetune"] = ft_step
    for mode in ("mae_frozen", "mae_trainable"):
        task = MAEPretext(adapter_vit(), decoder_dim=512, decoder_depth=8, decoder_heads=16).train()
        task.set_decoder_trainable(mode == "mae_trainable")
        opt = build_optimizer(task, lr=1.5e-3)

        def mae_step(task=task, opt=opt) -> None:
            opt.zero_grad(set_to_none=True)
            task(x)["loss"].backward()
            opt.step()

        steps_fn[mode] = mae_step
    times: dict[str, list[float]] = {m: [] for m in steps_fn}
    flops: dict[str, int] = {}
    for r in range(steps + 1):
        for mode, fn in steps_fn.items():
            if r == 0:
                flops[mode] = count_flops(fn)
                continue
            t0 = time.perf_counter()
            fn()
            times[mode].append(time.perf_counter() - t0)
    cfg = net.backbone.cfg
    shape = StepShape(cfg.embed_dim, cfg.depth, (img // cfg.patch_size) ** 2, cfg.patch_size ** 2 * cfg.in_chans,
                      mlp_ratio=cfg.mlp_ratio, bottleneck=bottleneck)
    med = {m: statistics.median(t) for m, t in times.items()}
    # ratio per round (the three steps of one round ran under the same load), then the median over rounds
    ratio = {m: statistics.median(a / b for a, b in zip(times[m], times["finetune"])) for m in times}
    return {"kind": "interleaved", "size": size, "img": img, "batch": batch, "steps": steps, "threads": threads,
            "step_s": med, "all_s": times, "time_ratio": ratio, "flops": flops,
            "estimate": {m: mae_finetune_ratio(shape, m == "mae_trainable") for m in ("mae_frozen", "mae_trainable")}}


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
            # more than one thread a rank needs freshly started processes (OpenMP does not survive fork)
            method = "spawn" if int(os.environ["TPP_THREADS_PER_RANK"]) > 1 else "fork"
            spawn_cpu(_run_rank, procs, mode, size, img, batch, steps, cache, datalist, out, start_method=method)
        with open(out) as f:
            row = json.load(f)
    row["threads"] = torch.get_num_threads()
    return row


def configurations(args) -> dict[str, list[str]]:
    common = ["--size", args.size, "--img", str(args.img), "--batch", str(args.batch), "--steps", str(args.steps),
              "--images", str(args.images)]
    runs = {}
    for mode in args.modes:
        runs[f"{mode}-1-none"] = [*common, "--mode", mode, "--cache", "none", "--procs", "1"]
    runs["mae_frozen-1-memory"] = [*common, "--mode", "mae_frozen", "--cache", "memory", "--procs", "1"]
    runs["finetune-1-memory"] = [*common, "--mode", "finetune", "--cache", "memory", "--procs", "1"]
    for n in args.procs:
        if n > 1:
            for mode in ("mae_frozen", "finetune"):
                runs[f"{mode}-{n}-memory"] = [*common, "--mode", mode, "--cache", "memory", "--procs", str(n)]
    return runs


def header(args) -> str:
    """Date, load average and settings: figures from a shared machine mean little without them."""
    load = " / ".join(f"{v:.2f}" for v in os.getloadavg())
    return (f"# TPP throughput, ViT-{args.size}/{args.img}, CPU ({platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} cores)\n\n"
            f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average (1/5/15 min) at the end "
            f"{load}; `python benchmarks/tpp_throughput.py --size {args.size} --img {args.img} "
            f"--ratio_batch {args.ratio_batch} --ratio_threads {args.ratio_threads} --batch {args.batch} "
            f"--steps {args.steps} --images {args.images} "
            f"--procs {' '.join(map(str, args.procs))} --modes {' '.join(args.modes)}`\n\n")


def ratio_table(r: dict) -> str:
    """MAE-TPP step / fine-tuning step: measured time, counted FLOPs, shape estimate, issue estimate."""
    ft_s, ft_f = r["step_s"]["finetune"], r["flops"]["finetune"]
    lines = [
        f"## MAE-TPP step / fine-tuning step (batch {r['batch']}, {r['threads']} thread(s), the three steps "
        f"interleaved, median of {r['steps']} rounds after one warm-up round)",
        "",
        "Step = forward + backward + AdamW on an in-memory batch; Adapter (bottleneck 64) in both; MAE decoder "
        "8 blocks x 512, 16 heads, mask ratio 0.75. Time ratio: the median over rounds of (MAE step / fine-tuning "
        "step of the same round). FLOPs: `torch.utils.flop_counter` on the warm-up round; shape estimate: "
        "`tpp_monai.benchmark.flops.mae_finetune_ratio`.",
        "",
        "| step | median time s (all rounds) | TFLOP | time ratio | FLOP ratio | shape estimate | issue estimate |",
        "|---|---|---|---|---|---|---|",
        f"| finetune | {ft_s:.2f} ({', '.join(f'{t:.2f}' for t in r['all_s']['finetune'])}) | {ft_f / 1e12:.3f} "
        "| 1 | 1 | 1 | 1 |",
    ]
    for mode, issue in (("mae_frozen", "~0.55"), ("mae_trainable", "~0.7")):
        t, f, tr = r["step_s"][mode], r["flops"][mode], r["time_ratio"][mode]
        lines.append(
            f"| {mode} | {t:.2f} ({', '.join(f'{v:.2f}' for v in r['all_s'][mode])}) | {f / 1e12:.3f} "
            f"| {tr:.3f} | {f / ft_f:.3f} | {r['estimate'][mode]:.3f} | {issue} |")
    return "\n".join(lines) + "\n\n"


def table(rows: list[dict], args) -> str:
    def get(mode, procs=1, cache="none"):
        return next((r for r in rows if r["mode"] == mode and r["procs"] == procs and r["cache"] == cache), None)

    lines = [
        f"## Engine rows: global batch {args.batch}, torch threads {rows[0]['threads']}, configurations one after "
        "another (each in a fresh process)",
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
    ap.add_argument("--batch", type=int, default=8,
                    help="global batch of the engine rows (split over the processes); 0: skip them")
    ap.add_argument("--ratio_batch", type=int, default=64,
                    help="batch of the interleaved one-thread step ratio (paper: 64); 0: skip it")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--images", type=int, default=40)
    ap.add_argument("--ratio_threads", type=int, default=1, help="torch threads of the step-ratio process")
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES, help="engine rows to run")
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="mae_frozen", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--cache", default="none", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker == "interleaved":
        print(json.dumps(interleaved_ratio(args.size, args.img, args.ratio_batch, args.steps,
                                           threads=args.ratio_threads)))
        return
    if args.worker:
        print(json.dumps(worker(args.mode, args.size, args.img, args.batch, args.steps, args.cache,
                                args.procs[0], args.images)))
        return
    ratio = None
    if args.ratio_batch:
        common = ["--size", args.size, "--img", str(args.img), "--steps", str(args.steps),
                  "--ratio_batch", str(args.ratio_batch), "--ratio_threads", str(args.ratio_threads)]
        ratio = run_workers(__file__, {"interleaved": common})[0]
    rows = run_workers(__file__, configurations(args)) if args.batch else []
    text = header(args) + (ratio_table(ratio) if ratio else "") + (table(rows, args) if rows else "")
    print(text)
    out = args.out or os.path.join(ROOT, "benchmarks", "results", f"tpp_throughput_{args.size}_cpu.md")
    write_results(out, text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
