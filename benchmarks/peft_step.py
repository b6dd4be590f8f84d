"""Cost of one training step of each PEFT method versus full fine-tuning on a ViT classifier.

    python benchmarks/peft_step.py --size base             # ViT-B/16 at 224 px, batch 2, CPU or CUDA
    python benchmarks/peft_step.py --size tiny --steps 5   # quick run
    python benchmarks/peft_step.py --methods full lora ssf --device cpu

A training step = forward of backbone (+ target parameters) and a linear head on the class token,
cross-entropy backward, AdamW step over the trainable parameters (target parameters + head). Every
method uses its default config; ``full`` trains every backbone parameter, ``linear`` only the head.

How it is measured. Each method runs in a **fresh Python subprocess** (one after the other, same
invocation and settings), so one method's allocator cache or page high-water mark cannot leak into
another's number:

* time: one warm-up step (lazy initialisation, optimiser state allocation), then ``--steps`` timed
  steps (``time.perf_counter``, with ``torch.cuda.synchronize`` on CUDA); the median is reported.
* peak memory, CUDA: ``torch.cuda.max_memory_allocated`` over warm-up + timed steps, minus the memory
  allocated before the model was built (so weights, gradients, AdamW state and activations count).
* peak memory, CPU: the process's peak resident set size (``VmHWM`` from ``/proc/self/status``,
  reset through ``/proc/self/clear_refs``) minus its RSS right before the model was built, after a
  tiny warm-up network has initialised torch's kernels and thread pools. It counts weights,
  gradients, optimiser state, activations and allocator overhead (glibc may keep freed pages).

"trainable %" is the paper's Ratio: trainable / all parameters (backbone + inserted + head).
The Markdown table is printed and written to ``benchmarks/results/peft_step_<size>_<device>.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tpp_monai.benchmark.workers import run_workers, write_results  # noqa: E402

DEFAULT_METHODS = ("full", "linear", "adapter", "adaptformer", "vpt", "evp", "ssf", "bitfit", "lora", "dtl")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker(method: str, size: str, device: str, img: int, batch: int, steps: int) -> dict:
    import torch
    import torch.nn.functional as F

    from tpp_monai.backbones.vit import build_vit
    from tpp_monai.metrics.efficiency import PeakMemory, warm_up_runtime
    from tpp_monai.peft import apply_peft, parameter_report

    dev = torch.device(device)
    torch.manual_seed(0)
    warm_up_runtime(dev)
    memory = PeakMemory(dev, cpu_method="rss").__enter__()  # baseline: before the model is built

    vit = build_vit(size, img_size=img)
    apply_peft(vit, method)
    head = torch.nn.Linear(vit.embed_dim, 10)
    vit.to(dev).train()
    head.to(dev)
    rep = parameter_report(vit, head)
    params = [p for p in vit.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4)
    x = torch.randn(batch, 3, img, img, device=dev)
    y = torch.randint(0, 10, (batch,), device=dev)

    def step() -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(head(vit(x)[:, 0]), y)
        loss.backward()
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter() - t0

    step()  # warm-up
    times = [step() for _ in range(steps)]
    memory.__exit__(None, None, None)
    return {"method": method, "trainable_percent": rep.ratio, "trainable": rep.trainable, "total": rep.total,
            "step_s": statistics.median(times), "peak_bytes": int(memory.peak_bytes)}


def run(methods, size: str, device: str, img: int, batch: int, steps: int) -> list[dict]:
    args = ["--size", size, "--device", device, "--img", str(img), "--batch", str(batch), "--steps", str(steps)]
    return run_workers(__file__, {m: args for m in methods})


def table(rows: list[dict], header: str) -> str:
    full = next((r for r in rows if r["method"] == "full"), None)
    lines = [header, "", "| method | trainable % | step time (s) | time ratio vs full | peak mem (MB) | mem ratio vs full |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        tr = f"{r['step_s'] / full['step_s']:.2f}" if full else "-"
        mr = f"{r['peak_bytes'] / full['peak_bytes']:.2f}" if full and full["peak_bytes"] > 0 else "-"
        lines.append(f"| {r['method']} | {r['trainable_percent']:.3f} | {r['step_s']:.3f} | {tr} | "
                     f"{r['peak_bytes'] / 2**20:.0f} | {mr} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="base", choices=["tiny", "small", "base", "large"])
    ap.add_argument("--img", type=int, default=224)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step (median reported)")
    ap.add_argument("--device", default=None, help="cuda if available, else cpu")
    ap.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS))
    ap.add_argument("--out", default=None, help="default benchmarks/results/peft_step_<size>_<device>.md")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.device is None:
        import torch

        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.worker:
        print(json.dumps(worker(a.worker, a.size, a.device, a.img, a.batch, a.steps)))
        return 0
    methods = list(dict.fromkeys(["full"] + list(a.methods)))  # full is the reference
    t0 = time.time()
    rows = run(methods, a.size, a.device, a.img, a.batch, a.steps)
    import torch

    dev_name = torch.cuda.get_device_name(0) if a.device.startswith("cuda") else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    header = (f"ViT-{a.size} at {a.img} px, batch {a.batch}, {a.device} [{dev_name}], torch {torch.__version__}; "
              f"median of {a.steps} step(s) after 1 warm-up; memory: "
              + ("max_memory_allocated - allocated before the model" if a.device.startswith("cuda")
                 else "peak RSS (VmHWM) - RSS before the model") + "; one subprocess per method")
    md = table(rows, header)
    print(md)
    out = a.out or os.path.join(ROOT, "benchmarks", "results", f"peft_step_{a.size}_{a.device.split(':')[0]}.md")
    write_results(out, md)
    print(f"wrote {out} ({time.time() - t0:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
