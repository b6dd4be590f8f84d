"""Efficiency metrics of FPT+ (Huang et al.): parameter ratio, peak training memory, PPE and PME.

    PPE = score * exp(-log10(r + 1)),  r = trainable parameters / all parameters   (a fraction)
    PME = score * exp(-log10(m + 1)),  m = peak training memory / that of full fine-tuning (a fraction)

``r`` and ``m`` are fractions, not percentages: the worked example of the paper (AUC 87.12 with
1.03 % parameters, r = 0.0103) gives PPE 86.73 only with a fraction (with r = 1.03 it would be 64.02).

Peak training memory
--------------------
* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` -- every tensor the
  caching allocator handed out on that device, weights included (exact, in-process).
* CPU, ``cpu_method="profiler"`` (default): ``torch.profiler`` with ``profile_memory=True`` records every
  tensor allocation and free inside the block; the peak of their running sum is the peak of tensor
  memory allocated *during* the block (activations, gradients, optimiser state; tensors that existed
  before entering, such as the weights, are not counted). Exact for tensors, deterministic, works
  in a long-lived process; it does not see non-tensor memory (allocator slack, Python objects).
* CPU, ``cpu_method="rss"``: the peak resident set size of the process (``VmHWM`` in ``/proc/self/status``). The kernel's
  high-water mark is reset on entry by writing ``5`` to ``/proc/self/clear_refs`` (Linux >= 4.0),
  and the reported value is ``VmHWM - baseline`` where ``baseline`` defaults to the RSS on entry.
  In a long-lived process this under-counts when the C allocator reuses memory it kept from earlier
  work, so for honest numbers run each configuration in a fresh process and pass the RSS measured
  right after ``import torch`` as ``baseline_bytes`` (what ``benchmarks/fpt_memory.py`` does).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from tpp_monai.peft.api import ParameterReport, count_parameters, parameter_report


def parameter_ratio(backbone: nn.Module, head: nn.Module | None = None) -> float:
    """Trainable / all parameters as a *fraction* (``parameter_report(...).ratio`` is in %).

    For sparse methods (SH-PEFT: whole tensors require grad but only selected entries train) the
    method's ``num_selected()`` replaces the count of the backbone's trainable parameters.
    """
    rep: ParameterReport = parameter_report(backbone, head)
    trainable = rep.trainable
    method = getattr(backbone, "tpp_peft", None)
    if method is not None and hasattr(method, "num_selected"):
        trainable = method.num_selected() + count_parameters(head)[0]
    return trainable / max(rep.total, 1)


def _efficiency(score: float, fraction: float) -> float:
    if fraction < 0:
        raise ValueError(f"the ratio must be a non-negative fraction; got {fraction}")
    return float(score) * math.exp(-math.log10(float(fraction) + 1.0))


def ppe(score: float, param_fraction: float) -> float:
    """Performance-Parameter Efficiency; ``param_fraction`` e.g. 0.0103 for 1.03 % trainable parameters."""
    return _efficiency(score, param_fraction)


def pme(score: float, memory_fraction: float) -> float:
    """Performance-Memory Efficiency; ``memory_fraction`` = peak memory / full fine-tuning's peak memory."""
    return _efficiency(score, memory_fraction)


# ---------------------------------------------------------------------------------------- memory
def current_rss_bytes() -> int:
    """Resident set size of this process now (Linux ``/proc/self/statm``; ``ru_maxrss`` elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # pragma: no cover - non-Linux
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_rss_bytes() -> int:
    """Peak resident set size (``VmHWM``) since start or the last :func:`reset_peak_rss`."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # pragma: no cover
        pass
    import resource  # pragma: no cover

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # pragma: no cover


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (Linux); False when not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def warm_up_runtime(device: torch.device | str = "cpu") -> None:
    """Run a tiny network through the kernels a ViT training step uses (conv, norm, GELU, attention,
    FFT, bicubic resize, AdamW), so that lazy library initialisation does not count as training memory."""
    dev = torch.device(device)
    net = nn.Sequential(nn.Conv2d(3, 4, 2, 2), nn.Flatten(), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 2)).to(dev)
    opt = torch.optim.AdamW(net.parameters())
    q = torch.randn(1, 2, 4, 8, device=dev)
    for _ in range(2):
        out = net(torch.randn(2, 3, 4, 4, device=dev)).sum()
        out = out + torch.nn.functional.scaled_dot_product_attention(q, q, q).sum() * 0
        out = out + torch.fft.fft2(torch.randn(1, 3, 4, 4, device=dev)).real.sum() * 0
        torch.nn.functional.interpolate(torch.randn(1, 3, 8, 8, device=dev), size=(4, 4), mode="bicubic")
        out.backward()
        opt.step()


@dataclass
class PeakMemory:
    """Context manager measuring peak training memory in bytes (see the module docstring).

        with PeakMemory(device) as pm:
            train_step()
        pm.peak_bytes, pm.peak_mb
    """

    device: torch.device | str = "cpu"
    baseline_bytes: int | None = None
    cpu_method: str = "profiler"
    peak_bytes: int = 0
    method: str = field(default="", init=False)

    def __post_init__(self) -> None:
        if self.cpu_method not in ("profiler", "rss"):
            raise ValueError(f"cpu_method must be 'profiler' or 'rss'; got {self.cpu_method!r}")
        self._prof = None

    def __enter__(self) -> "PeakMemory":
        self.device = torch.device(self.device)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            if self.baseline_bytes is None:
                self.baseline_bytes = int(torch.cuda.memory_allocated(self.device))
            self.method = "cuda.max_memory_allocated - baseline"
        elif self.cpu_method == "profiler":
            from torch.profiler import ProfilerActivity, profile

            self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._prof.__enter__()
            self.method = "torch.profiler tensor peak"
        else:
            reset_peak_rss()
            if self.baseline_bytes is None:
                self.baseline_bytes = current_rss_bytes()
            self.method = "VmHWM - baseline RSS"
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device)) - int(self.baseline_bytes or 0)
        elif self._prof is not None:
            self._prof.__exit__(*exc)
            self.peak_bytes = _profiler_peak(self._prof)
            self._prof = None
        else:
            self.peak_bytes = max(0, peak_rss_bytes() - int(self.baseline_bytes or 0))

    @property
    def peak_mb(self) -> float:
        return self.peak_bytes / 2 ** 20


def _profiler_peak(prof) -> int:
    """Peak of the running sum of the profiler's allocation (+) / free (-) events."""
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += int(e.nbytes())
        peak = max(peak, cur)
    return peak


def measure_peak_memory(step: Callable[[], object], device: torch.device | str = "cpu", repeats: int = 1,
                        baseline_bytes: int | None = None, cpu_method: str = "profiler") -> int:
    """Peak memory (bytes) of running ``step()`` ``repeats`` times (e.g. forward + backward + optimiser step)."""
    with PeakMemory(device, baseline_bytes, cpu_method) as pm:
        for _ in range(repeats):
            step()
    return pm.peak_bytes
