"""The nnU-Net TPP stage under DDP, at module level.

nnU-Net 2.8.1 runs ``-num_gpus N`` only on CUDA with NCCL (``run_training.py`` asserts a CUDA device
and calls ``init_process_group("nccl")``), so its DDP cannot run in CPU CI. The trainer's own TPP stage
method (``_TPPStage.run_tpp_stage``) is run here in 2 gloo processes on a stand-in trainer (tiny STU-Net
+ Conv-Adapter, random patches, each rank its own as nnU-Net's loaders give them): the ranks end with
identical target parameters, rank 0 writes the file, and the plan keeps the one-GPU global batch and lr.
The control run without the DDP wrapper shows the ranks drifting apart (what happened before).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from tpp_monai.engines.distributed import spawn_cpu
from tpp_monai.peft import apply_peft, target_state_dict

STRIDES = [[2, 2, 2]] * 3 + [[1, 1, 1]] * 2


def _trainer(out: str, rank: int, batch_size: int):
    from tpp_monai.backbones.stunet import STUNet
    from tpp_monai.nnunet.trainers import _TPPStage

    class StandIn(_TPPStage):
        """What ``run_tpp_stage`` reads from an nnU-Net trainer, nothing more."""

        tpp_batch_size, tpp_epochs, tpp_warmup_epochs, tpp_n_local_crops = 4, 1, 0, 1
        tpp_iterations_per_epoch = 2
        tpp_lr_per_256 = 1.0  # lr 0.016: two steps move the target parameters visibly
        tpp_head = {"out_dim": 16, "hidden_dim": 16, "bottleneck_dim": 8}

        def __init__(self) -> None:
            torch.manual_seed(0)
            self.network = STUNet(1, 2, size="small", strides=STRIDES)
            apply_peft(self.network, "conv_adapter")
            self.output_folder, self.my_init_kwargs, self.device = out, {}, torch.device("cpu")
            self.batch_size, self.fold, self.local_rank = batch_size, 0, rank
            self.configuration_manager = SimpleNamespace(patch_size=[16, 16, 16])
            self.stunet_size, self.peft_method, self.peft_config = "small", "conv_adapter", {}
            rng = np.random.default_rng(100 + rank)
            self.dataloader_train = iter(lambda: {"data": rng.standard_normal((batch_size, 1, 20, 20, 20),
                                                                                  dtype=np.float32)}, None)

        @classmethod
        def tpp_twin_name(cls) -> str:
            return cls.__name__

        def do_split(self):
            return [f"case{i}" for i in range(8)], []

        def print_to_log_file(self, *args, **kwargs) -> None:
            pass

    return StandIn()


def _worker(rank: int, world: int, out: str) -> None:
    import tpp_monai.nnunet.trainers as tr

    res = {}
    t = _trainer(str(Path(out) / "ddp"), rank, batch_size=1)  # nnU-Net: global batch 2 -> 1 per GPU
    res["plan"] = t.tpp_plan(8)
    t.run_tpp_stage()
    res["sync"] = {k: v.clone() for k, v in target_state_dict(t.network).items()}
    tr.wrap_ddp = lambda module, *a, **k: module  # control: the stage without the DDP wrapper
    t = _trainer(str(Path(out) / f"local{rank}"), rank, batch_size=1)
    t.run_tpp_stage()
    res["local"] = {k: v.clone() for k, v in target_state_dict(t.network).items()}
    torch.save(res, Path(out) / f"r{rank}.pt")


def test_nnunet_tpp_stage_under_ddp(tmp_path):
    from tpp_monai.peft.target_checkpoint import read_target_checkpoint

    (tmp_path / "ddp").mkdir()
    for r in (0, 1):
        (tmp_path / f"local{r}").mkdir()
    spawn_cpu(_worker, 2, str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"r{r}.pt") for r in (0, 1))

    def diff(a, b):
        return max(float((a[k] - b[k]).abs().max()) for k in a)

    assert diff(r0["sync"], r1["sync"]) == 0.0
    saved = read_target_checkpoint(tmp_path / "ddp" / "tpp_target_params.pt")
    assert diff(saved["state_dict"], r0["sync"]) == 0.0 and saved["meta"]["plan"]["processes"] == 2
    assert diff(r0["local"], r1["local"]) > 1e-4  # without DDP every rank trains its own target parameters
    one = _trainer(str(tmp_path / "one"), 0, batch_size=2).tpp_plan(8)  # one GPU, nnU-Net batch 2
    for key in ("batch", "lr", "steps", "warmup_steps"):
        assert r0["plan"][key] == one[key], key
    assert r0["plan"]["accumulation"] == one["accumulation"] and r0["plan"]["micro_batch"] * 2 == one["micro_batch"]
