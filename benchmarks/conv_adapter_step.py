"""Cost of one 3D Conv-Adapter training step versus full fine-tuning on STU-Net, measured side by side.

    python benchmarks/conv_adapter_step.py                                  # small + base at 64^3 and 128^3
    python benchmarks/conv_adapter_step.py --sizes small --patches 64       # the acceptance configuration
    python benchmarks/conv_adapter_step.py --rounds 5 --batch 2 --threads 1

A training step = STU-Net forward (full-resolution output, deep supervision off), cross-entropy against a
random 3-class label map, backward, AdamW over the trainable parameters. Methods:

* ``full``: every parameter trained (the reference);
* ``conv_adapter``: the original Conv-Adapter (default config) as it runs by default on CPU
  (``impl="taps"``: grouped convolution as matrix products + shifted slices);
* ``conv_adapter[conv]``: the same module and weights computed with ``nn.Conv3d(groups=w)`` (oneDNN), the
  formulation before the taps one, for comparison;
* ``conv_adapter_residual``: tpp-monai's earlier residual-parallel design;
* ``norm_tuning``: the frozen network with nothing inserted (only the norms' affine tensors train): the floor of
  every PEFT method that keeps the backbone frozen, since the frozen convolutions still run forward and pass the
  input gradient back (only their weight gradients are saved). A Conv-Adapter step cannot cost less than this row.

How it is measured: one subprocess per (size, patch) configuration (``run_workers``), ``--threads`` torch
threads (default 1). Inside it the methods' models are built once and their steps are **interleaved round by
round** (round 0 = warm-up, with the FLOP count), so load from other jobs on a shared machine hits every
method alike; the median over ``--rounds`` rounds is reported, and the ratio to ``full`` of the medians.
Beside the wall-clock step the process CPU time of the step (``time.process_time``) is reported: on a shared
machine where a higher-priority job takes the cores, wall time also counts the time the benchmark waited for a
core, CPU time does not (cache and memory-bandwidth contention still show in both).
FLOPs are counted by ``torch.utils.flop_counter`` over one whole step (convolutions and matrix products, forward
and backward, 2 per multiply-add; :func:`tpp_monai.benchmark.flops.count_flops`): the physical cost a PEFT step
should have, beside the time it takes.

Results go to ``benchmarks/results/conv_adapter_step_cpu.md`` with the date, the commit, the load average
before and after, and the command line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tpp_monai.benchmark.workers import run_workers, write_results  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("full", "conv_adapter", "conv_adapter[conv]", "conv_adapter_residual", "norm_tuning")


def worker(config: str, methods: list[str], batch: int, rounds: int, threads: int, device: str) -> dict:
    import torch
    import torch.nn.functional as F

    from tpp_monai.backbones.stunet import STUNet
    from tpp_monai.benchmark.flops import count_flops
    from tpp_monai.peft import apply_peft, parameter_report
    from tpp_monai.peft.conv_adapter import set_conv_adapter_impl

    size, patch = config.split("@")
    patch = int(patch)
    torch.set_num_threads(threads)
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 1, patch, patch, patch, generator=gen).to(dev)
    y = torch.randint(0, 3, (batch, patch, patch, patch), generator=gen).to(dev)
    runs = {}
    for name in methods:
        torch.manual_seed(0)
        net = STUNet(1, 3, size=size, enable_deep_supervision=False)
        method = name.split("[")[0]
        apply_peft(net, method)
        if name.endswith("[conv]"):
            set_conv_adapter_impl(net, "conv")
        net.to(dev).train()
        opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)
        runs[name] = (net, opt, parameter_report(net).ratio)

    def step(net, opt) -> tuple[float, float]:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0, c0 = time.perf_counter(), time.process_time()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter() - t0, time.process_time() - c0

    flops = {name: count_flops(lambda: step(net, opt)) for name, (net, opt, _) in runs.items()}  # round 0
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, (net, opt, _) in runs.items():
            times[name].append(step(net, opt))
    return {"config": config, "rows": [
        {"method": n, "trainable_percent": runs[n][2], "step_s": statistics.median(t for t, _ in times[n]),
         "cpu_s": statistics.median(c for _, c in times[n]), "times": times[n], "flops": flops[n]} for n in runs]}


def table(results: list[dict], header: str) -> str:
    lines = [header, "", "| STU-Net | patch | method | trainable % | step (s), median | time ratio vs full | "
             "process CPU (s), median | CPU-time ratio vs full | GFLOP / step | FLOP ratio vs full |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for res in results:
        size, patch = res["config"].split("@")
        full = next(r for r in res["rows"] if r["method"] == "full")
        for r in res["rows"]:
            lines.append(f"| {size} | {patch}^3 | {r['method']} | {r['trainable_percent']:.2f} | {r['step_s']:.2f} | "
                         f"**{r['step_s'] / full['step_s']:.2f}** | {r['cpu_s']:.2f} | "
                         f"{r['cpu_s'] / full['cpu_s']:.2f} | {r['flops'] / 1e9:.1f} | "
                         f"{r['flops'] / full['flops']:.2f} |")
    return "\n".join(lines) + "\n"


def _commit() -> str:
    try:
        out = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + (" (+ uncommitted changes)" if dirty else "")
    except OSError:
        return "unknown"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", nargs="+", default=["small", "base"], choices=["small", "base", "large", "huge"])
    ap.add_argument("--patches", nargs="+", type=int, default=[64, 128], help="cubic patch edge (multiple of 32)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--batch", type=int, default=2, help="nnU-Net's 3d_fullres batch size")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds after the warm-up round (median reported)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None, help="default benchmarks/results/conv_adapter_step_<device>.md")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    methods = list(dict.fromkeys(["full"] + list(a.methods)))  # full is the reference
    if a.worker:
        print(json.dumps(worker(a.worker, methods, a.batch, a.rounds, a.threads, a.device)))
        return 0
    t0, load0 = time.time(), os.getloadavg()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    args = ["--methods", *methods, "--batch", str(a.batch), "--rounds", str(a.rounds), "--threads", str(a.threads),
            "--device", a.device]
    results = run_workers(__file__, {f"{s}@{p}": args for s in a.sizes for p in a.patches})
    load1 = os.getloadavg()
    import torch

    header = (f"STU-Net 3D training step, batch {a.batch}, {a.device} ({platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores), {a.threads} thread(s), torch {torch.__version__}; methods interleaved "
              f"round by round in one process per row group, median of {a.rounds} rounds after 1 warm-up round; "
              f"FLOPs counted by torch.utils.flop_counter over one step. Measured {started} on commit {_commit()}; "
              f"load average (1/5/15 min) before {load0[0]:.1f}/{load0[1]:.1f}/{load0[2]:.1f}, after "
              f"{load1[0]:.1f}/{load1[1]:.1f}/{load1[2]:.1f}.\n\n`python benchmarks/conv_adapter_step.py "
              + " ".join(sys.argv[1:] if argv is None else argv) + "`")
    md = table(results, header)
    print(md)
    out = a.out or os.path.join(ROOT, "benchmarks", "results", f"conv_adapter_step_{a.device.split(':')[0]}.md")
    write_results(out, md)
    print(f"wrote {out} ({time.time() - t0:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
