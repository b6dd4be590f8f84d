"""Peak training memory of FPT+ at 512 px versus full fine-tuning (and a PEFT baseline, Adapter) at 512 px.

    python benchmarks/fpt_memory.py                      # ViT-Base, 512 px, batch 1, CPU
    python benchmarks/fpt_memory.py --size tiny --device cuda

Configurations (one training iteration = forward, cross-entropy backward, AdamW step; 2 iterations):

* ``full``: every ViT parameter trains on the 512 px image.
* ``adapter``: Adapter (bottleneck 64) on the frozen ViT at 512 px (activations of the whole ViT kept).
* ``fpt_plus_online``: FPT+, frozen ViT run under ``torch.no_grad()`` at 512 px each step (keys/values of
  its top 6 layers, top 20% tokens per head by mean attention received), side network (width D/8,
  6 layers, 128 px) with the fusion module (16 prompts per layer at the frozen width) trains.
* ``fpt_plus_cached``: FPT+ as trained in practice: the frozen features were pre-computed once
  (``FeatureCache``), so training holds only the side network, the head and one batch of cached
  key/value features (here random tensors of the cached shape); the frozen ViT is not in memory.

How memory is measured: each configuration runs in a **fresh Python subprocess**.
On CUDA, ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (everything the
configuration allocates on the GPU, weights and optimiser state included). On CPU, the process's peak
resident set size (``VmHWM``) minus its RSS right after importing torch and tpp_monai (before any model
is built), so weights, gradients, optimiser state, activations and the allocator's overhead all count.
Ratios are relative to ``full``. Results are printed as a Markdown table (``--out`` also writes it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tpp_monai.benchmark.workers import run_workers  # noqa: E402

CONFIGS = ("full", "adapter", "fpt_plus_online", "fpt_plus_cached")


def _worker(config: str, size: str, device: str, img: int, side_img: int, steps: int) -> dict:
    import torch
    import torch.nn.functional as F

    from tpp_monai.metrics.efficiency import PeakMemory, warm_up_runtime
    from tpp_monai.backbones.vit import build_vit
    from tpp_monai.peft import apply_peft, parameter_report
    from tpp_monai.peft.fpt_plus import FPTPlusClassifier, FPTPlusConfig, FPTSideNetwork, num_kept_tokens

    dev = torch.device(device)
    torch.manual_seed(0)
    warm_up_runtime(dev)  # lazy library initialisation (kernels, thread pools) is not training memory
    memory = PeakMemory(dev, cpu_method="rss").__enter__()  # baseline: before any model is built
    t0 = time.perf_counter()

    x = torch.randn(1, 3, img, img, device=dev)
    y = torch.tensor([1], device=dev)
    side_cfg = dict(side_img_size=side_img)
    if config in ("full", "adapter", "fpt_plus_online"):
        vit = build_vit(size, img_size=img)
        d = vit.embed_dim
        if config == "full":
            head = torch.nn.Linear(d, 2)
            model = torch.nn.ModuleDict({"vit": vit, "head": head}).to(dev)

            def logits():
                return head(vit(x)[:, 0])
        elif config == "adapter":
            apply_peft(vit, "adapter")
            head = torch.nn.Linear(d, 2)
            model = torch.nn.ModuleDict({"vit": vit, "head": head}).to(dev)

            def logits():
                return head(vit(x)[:, 0])
        else:
            model = FPTPlusClassifier(vit, num_classes=2, **side_cfg).to(dev)
            head = model.head

            def logits():
                return model(x)
        rep = parameter_report(vit, head)
    else:  # cached features: no frozen model in memory
        sizes = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12), "large": (1024, 16)}
        d, heads = sizes[size]
        cfg = FPTPlusConfig(**side_cfg)
        side = FPTSideNetwork(cfg, d, heads).to(dev)
        head = torch.nn.Linear(side.embed_dim, 2).to(dev)
        model = torch.nn.ModuleDict({"side": side, "head": head})
        n_tok = num_kept_tokens(1 + (img // 16) ** 2, cfg.keep_ratio)  # per head, class token ranked too
        feats = [(torch.randn(1, n_tok, d, device=dev), torch.randn(1, n_tok, d, device=dev)) for _ in range(cfg.side_depth)]
        x_lr = torch.randn(1, 3, side_img, side_img, device=dev)

        def logits():
            return head(side(x_lr, feats))

        rep = None
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    if config == "fpt_plus_online":
        model.train()  # FPTPlusClassifier keeps the frozen ViT in eval
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(logits(), y)
        loss.backward()
        opt.step()
    memory.__exit__(None, None, None)
    peak = memory.peak_bytes
    trainable = sum(p.numel() for p in params)
    return {
        "config": config, "peak_bytes": int(peak), "trainable": trainable,
        "param_ratio_percent": rep.ratio if rep is not None else None,
        "seconds": time.perf_counter() - t0,
    }


def run(size: str, device: str, img: int, side_img: int, steps: int, configs=CONFIGS) -> list[dict]:
    args = ["--size", size, "--device", device, "--img", str(img), "--side-img", str(side_img), "--steps", str(steps)]
    return run_workers(__file__, {c: args for c in configs})


def table(rows: list[dict], size: str, device: str, img: int, side_img: int) -> str:
    full = next((r["peak_bytes"] for r in rows if r["config"] == "full"), None)
    n_all = next((r["trainable"] for r in rows if r["config"] == "full"), None)
    lines = [
        f"Peak training memory, ViT-{size} at {img} px (side branch {side_img} px), batch 1, {device}",
        "",
        "| configuration | trainable params | params (% of full) | peak memory (MB) | memory vs full FT |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = f"{100 * r['peak_bytes'] / full:.2f}%" if full else "-"
        pr = f"{100 * r['trainable'] / n_all:.2f}%" if n_all else "-"
        lines.append(f"| {r['config']} | {r['trainable']:,} | {pr} | {r['peak_bytes'] / 2 ** 20:,.1f} | {ratio} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="base", choices=["tiny", "small", "base", "large"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--img", type=int, default=512)
    ap.add_argument("--side-img", type=int, default=128)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--out", default=None, help="also write the Markdown table (and a .json) here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        print(json.dumps(_worker(a.worker, a.size, a.device, a.img, a.side_img, a.steps)))
        return
    rows = run(a.size, a.device, a.img, a.side_img, a.steps, [c for c in a.configs.split(",") if c])
    md = table(rows, a.size, a.device, a.img, a.side_img)
    print(md)
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            f.write(md + "\n")
        with open(os.path.splitext(a.out)[0] + ".json", "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
