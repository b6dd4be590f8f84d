"""Hugging Face ``peft`` adapter folders (``adapter_config.json`` + ``adapter_model.safetensors``) to and from
tpp-monai target parameters, so TPP-trained target parameters can be used with ``peft.PeftModel`` and a peft
adapter can initialise TPP or fine-tuning.

Supported where the maths is the same (checked against peft 0.21's tuners, tests/test_peft_interop.py):

- ``lora`` on ``nn.Linear`` layers <-> ``LORA``: ``W x + (alpha / r) B A x`` in both; tensors
  ``<m>.peft_lora_A`` / ``peft_lora_B`` <-> ``base_model.model.<m>.lora_A.weight`` / ``lora_B.weight``
  (``lora_dropout`` 0, ``bias "none"``, no rsLoRA / DoRA / per-layer ranks). Our LoRA on
  ``nn.MultiheadAttention`` (``in_proj_weight`` only) has no peft counterpart (peft's MHA LoRA also adapts
  ``out_proj``) and is refused.
- ``ln_tuning`` <-> ``LN_TUNING``: peft trains a copy of each LayerNorm (``<m>.ln_tuning_layers.weight`` /
  ``bias``), we train the LayerNorm itself; the forward is the same LayerNorm with the tuned weights.

Not supported, because the maths differs: IA3 (scales without a shift, on other activations than SSF),
BOFT / OFT (orthogonal multiplicative updates), VeRA / LoHa / LoKr / AdaLoRA (other factorisations),
prompt / prefix tuning (token-level prompts of language models, not VPT's per-layer image prompts);
and the methods peft has no tuner for (Adapter, AdaptFormer, VPT, EVP, SSF, DTL, Conv-Adapter, BitFit).

``peft`` is not needed at run time: the files are written and read with ``safetensors`` and ``json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from tpp_monai.peft.api import apply_peft, get_peft

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "SUPPORTED_METHODS", "PeftInteropError", "to_peft_adapter",
           "export_peft_adapter", "read_peft_adapter", "load_peft_adapter", "import_peft_adapter"]

logger = logging.getLogger("tpp_monai.hf_interop")

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
SUPPORTED_METHODS = {"lora": "LORA", "ln_tuning": "LN_TUNING"}
_OURS = {v: k for k, v in SUPPORTED_METHODS.items()}
_LORA_SUFFIX = {".peft_lora_A": ".lora_A.weight", ".peft_lora_B": ".lora_B.weight"}
_LN_SUFFIX = {".weight": ".ln_tuning_layers.weight", ".bias": ".ln_tuning_layers.bias"}
# LoraConfig fields whose non-default values change the maths (we refuse them on import)
_LORA_REFUSED = {"use_rslora": False, "use_dora": False, "fan_in_fan_out": False, "bias": "none",
                 "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, "lora_bias": False,
                 "target_parameters": None, "layer_replication": None, "trainable_token_indices": None}


class PeftInteropError(ValueError):
    """A model, checkpoint or adapter folder cannot be converted (names what and why)."""


def _unsupported(method: str) -> PeftInteropError:
    return PeftInteropError(
        f"PEFT method '{method}' has no Hugging Face peft tuner with the same maths; export/import supports "
        f"{sorted(SUPPORTED_METHODS)} (see tpp_monai/peft/hf_interop.py for why the others differ)")


def _matches(name: str, targets) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def to_peft_adapter(method: str, config: Mapping[str, Any], state: Mapping[str, torch.Tensor],
                    base_model: str | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(adapter_config, tensors)`` in peft's layout from our method name, config and target tensors."""
    if method not in SUPPORTED_METHODS:
        raise _unsupported(method)
    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, None] = {}  # model order
    suffixes = _LORA_SUFFIX if method == "lora" else _LN_SUFFIX
    for name, t in state.items():
        suffix = next((s for s in suffixes if name.endswith(s)), None)
        if suffix is None:
            raise PeftInteropError(f"target tensor '{name}' of '{method}' has no peft counterpart")
        module = name[: -len(suffix)]
        if method == "lora" and not _matches(module, config.get("targets", ())):
            raise PeftInteropError(
                f"LoRA tensor '{name}' is on an nn.MultiheadAttention (in_proj_weight); peft's MultiheadAttention "
                "LoRA also adapts out_proj, so it has no peft equivalent. Use LoRA on nn.Linear layers (mha=False).")
        modules[module] = None
        tensors[PREFIX + module + suffixes[suffix]] = t.detach().cpu().contiguous()
    if not modules:
        raise PeftInteropError(f"no target tensors to export for '{method}'")
    common = {"peft_type": SUPPORTED_METHODS[method], "task_type": None, "inference_mode": True,
              "base_model_name_or_path": base_model, "revision": None, "modules_to_save": None,
              "target_modules": list(modules), "exclude_modules": None}
    if method == "lora":
        common.update({"r": int(config["r"]), "lora_alpha": float(config["alpha"]), "lora_dropout": 0.0,
                       "init_lora_weights": True, **_LORA_REFUSED})
    return common, tensors


def export_peft_adapter(source: nn.Module | str | os.PathLike, folder: str | os.PathLike,
                        base_model: str | None = None) -> Path:
    """Write ``folder/adapter_config.json`` + ``adapter_model.safetensors`` from a model carrying a PEFT
    method or from a target-parameter checkpoint (the TPP stage's output). Each file is written atomically."""
    from safetensors.torch import save

    from tpp_monai.peft.target_checkpoint import read_target_checkpoint
    from tpp_monai.safe_io import atomic_write

    if isinstance(source, nn.Module):
        m = get_peft(source)
        method, config = m.name, m.config.to_dict()
        state = {n: p for n, p in source.named_parameters() if m.is_target(n)}
        provenance = "model"
    else:
        obj = read_target_checkpoint(source)
        method, config, state = obj["peft"]["method"], obj["peft"]["config"], obj["state_dict"]
        provenance = str(source)
    adapter_config, tensors = to_peft_adapter(method, config, state, base_model)
    folder = Path(folder)
    meta = {"format": "pt", "tpp_monai_method": method, "tpp_monai_config": json.dumps(config, default=list),
            "tpp_monai_source": provenance}
    atomic_write(folder / ADAPTER_WEIGHTS, save(tensors, metadata=meta))
    atomic_write(folder / ADAPTER_CONFIG, json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
    return folder


def read_peft_adapter(folder: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(adapter_config, tensors)`` of a peft adapter folder; clear errors for missing or foreign files."""
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg_path, w_path = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    for p in (cfg_path, w_path):
        if not p.is_file():
            hint = " (adapter_model.bin pickles are not read: re-save with safe_serialization=True)" \
                if p == w_path and (folder / "adapter_model.bin").is_file() else ""
            raise FileNotFoundError(f"{p} not found: a peft adapter folder holds {ADAPTER_CONFIG} and "
                                    f"{ADAPTER_WEIGHTS} (PeftModel.save_pretrained){hint}")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise PeftInteropError(f"{cfg_path} is not valid JSON ({e}); re-save the adapter") from e
    try:
        tensors = load_file(str(w_path))
    except Exception as e:  # noqa: BLE001 - re-raised naming the file
        raise PeftInteropError(f"{w_path} is not a readable safetensors file ({e}); re-save the adapter") from e
    return cfg, tensors


def _check_adapter(cfg: Mapping[str, Any], where: Path) -> str:
    peft_type = cfg.get("peft_type")
    if peft_type not in _OURS:
        raise PeftInteropError(f"{where}: peft_type {peft_type!r} is not supported; tpp-monai reads "
                               f"{sorted(_OURS)} adapters (other tuners' maths differ from our methods)")
    if peft_type == "LORA":
        empty = (None, {}, [])
        bad = {k: cfg[k] for k, v in _LORA_REFUSED.items()
               if k in cfg and cfg[k] != v and not (cfg[k] in empty and v in empty)}
        if bad:
            raise PeftInteropError(f"{where}: LoRA options {bad} change the maths and have no tpp-monai equivalent "
                                   f"(supported: plain LoRA with {_LORA_REFUSED})")
        if float(cfg.get("lora_dropout", 0.0)) != 0.0:
            logger.warning("%s: lora_dropout %s is a training-time setting; tpp-monai LoRA has no dropout",
                           where, cfg.get("lora_dropout"))
    return _OURS[peft_type]


def _module_tensors(cfg: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], where: Path
                    ) -> dict[str, dict[str, torch.Tensor]]:
    """``{module name: {our parameter suffix: tensor}}`` (keys without peft's prefix / adapter name)."""
    method = _OURS[cfg["peft_type"]]
    back = {v: k for k, v in (_LORA_SUFFIX if method == "lora" else _LN_SUFFIX).items()}
    save = tuple(cfg.get("modules_to_save") or ())
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        name = name.replace(".default.", ".")  # keys saved with the adapter name
        suffix = next((s for s in back if name.endswith(s)), None)
        if suffix is None:
            if save and any(f".{m}." in f".{name}" for m in save):
                logger.warning("%s: %s belongs to modules_to_save (a head, not a target parameter): skipped",
                               where, key)
                continue
            raise PeftInteropError(f"{where}: tensor '{key}' is not a {cfg['peft_type']} tensor")
        out.setdefault(name[: -len(suffix)], {})[back[suffix]] = t
    return out


def _our_config(method: str, cfg: Mapping[str, Any], modules: list[str], model: nn.Module) -> dict[str, Any]:
    """Our config for ``method`` that targets exactly ``modules`` in ``model``: short suffixes
    (``attn.qkv``) where they select the same layers, else the full names."""
    if method == "ln_tuning":
        norms = sorted(n for n, m in model.named_modules() if isinstance(m, nn.LayerNorm))
        blocks = sorted(n for n in norms if n.startswith("blocks."))
        if sorted(modules) == norms:
            return {"include_outer_norms": True}
        if sorted(modules) == blocks:
            return {"include_outer_norms": False}
        raise PeftInteropError(f"LN_TUNING adapter tunes {len(modules)} LayerNorms that are neither all "
                               f"{len(norms)} of the model nor its {len(blocks)} block norms")
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    missing = sorted(set(modules) - set(linears))
    if missing:
        raise PeftInteropError(f"LoRA adapter targets {missing[:4]} which are not nn.Linear layers of "
                               f"{type(model).__name__}; build the backbone the adapter was trained on")
    short = sorted({".".join(n.split(".")[-2:]) for n in modules})
    targets = short if sorted(n for n in linears if _matches(n, short)) == sorted(modules) else sorted(modules)
    has_mha = any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
    return {"r": int(cfg["r"]), "alpha": float(cfg["lora_alpha"]), "targets": tuple(targets), "mha": not has_mha}


def load_peft_adapter(model: nn.Module, folder: str | os.PathLike) -> dict[str, Any]:
    """Initialise ``model``'s target parameters from a peft adapter folder. A model without a PEFT method
    gets the adapter's method inserted (``apply_peft``) first; one with a method must have the same method
    and targets. Every tensor is checked for name and shape. Returns our ``{"method", "config"}``."""
    folder = Path(folder)
    cfg, tensors = read_peft_adapter(folder)
    method = _check_adapter(cfg, folder / ADAPTER_CONFIG)
    per_module = _module_tensors(cfg, tensors, folder / ADAPTER_WEIGHTS)
    if getattr(model, "tpp_peft", None) is None:
        apply_peft(model, method, _our_config(method, cfg, sorted(per_module), model))
    m = get_peft(model)
    if m.name != method:
        raise PeftInteropError(f"{folder} holds a {cfg['peft_type']} adapter but the model carries '{m.name}'")
    params = {n: p for n, p in model.named_parameters() if m.is_target(n)}
    wanted = {f"{mod}{suffix}": t for mod, d in per_module.items() for suffix, t in d.items()}
    missing, unexpected = sorted(set(params) - set(wanted)), sorted(set(wanted) - set(params))
    if missing or unexpected:
        raise PeftInteropError(f"{folder}: adapter and model target parameters differ (model only: {missing[:4]}, "
                               f"adapter only: {unexpected[:4]}); use the same method config as the adapter")
    if m.name == "lora" and abs(m.config.alpha / m.config.r - float(cfg["lora_alpha"]) / int(cfg["r"])) > 0:
        raise PeftInteropError(f"{folder}: LoRA scale lora_alpha/r = {cfg['lora_alpha']}/{cfg['r']} differs from the "
                               f"model's {m.config.alpha}/{m.config.r}")
    with torch.no_grad():
        for n, p in params.items():
            t = wanted[n]
            if tuple(t.shape) != tuple(p.shape):
                raise PeftInteropError(f"{folder}: {n} has shape {tuple(t.shape)} in the adapter, "
                                       f"{tuple(p.shape)} in the model")
            p.copy_(t.to(p.dtype))
    return m.describe()


def import_peft_adapter(folder: str | os.PathLike, backbone: nn.Module, out: str | os.PathLike) -> Path:
    """Write a tpp-monai target-parameter checkpoint (``--tpp_ckpt`` of the bundles) from a peft adapter,
    for ``backbone`` (the pre-trained backbone the adapter belongs to, without a PEFT method)."""
    from tpp_monai.peft.target_checkpoint import save_target_checkpoint

    desc = load_peft_adapter(backbone, folder)
    return save_target_checkpoint(out, backbone, meta={"pretext": "hf-peft-import", "source": str(folder),
                                                       "peft": desc})


# ---------------------------------------------------------------------- command line (tpp-monai export-peft / import-peft)
def add_peft_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``export-peft`` and ``import-peft`` on the ``tpp-monai`` sub-command parser."""
    p = sub.add_parser("export-peft", help="write target parameters as a Hugging Face peft adapter folder",
                       description="Convert a target-parameter checkpoint (TPP stage output) into "
                                   f"{ADAPTER_CONFIG} + {ADAPTER_WEIGHTS} for peft.PeftModel.from_pretrained. "
                                   f"Methods: {', '.join(sorted(SUPPORTED_METHODS))}.")
    p.add_argument("checkpoint", help="target-parameter checkpoint (e.g. the bundle's tpp_ckpt)")
    p.add_argument("out", help="adapter folder to write")
    p.add_argument("--base-model", default=None, help="base_model_name_or_path to record in adapter_config.json")
    p.set_defaults(run=_run_export)
    p = sub.add_parser("import-peft", help="turn a Hugging Face peft adapter folder into a target-parameter checkpoint",
                       description="Build the ViT backbone as the bundles do (--backbone-ckpt, --size, --img-size, "
                                   "--in-chans), load the adapter (LORA on nn.Linear or LN_TUNING) into it and write "
                                   "a target-parameter checkpoint to pass as --tpp_ckpt (TPP / fine-tuning init).")
    p.add_argument("adapter", help=f"folder with {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    p.add_argument("out", help="target-parameter checkpoint to write")
    p.add_argument("--backbone-ckpt", default="", help="pre-trained ViT checkpoint the adapter belongs to")
    p.add_argument("--size", default="base")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--in-chans", type=int, default=3)
    p.add_argument("--allow-pickle", action="store_true", help="backbone checkpoint is a trusted legacy pickle")
    p.set_defaults(run=_run_import)


def _run_export(args: argparse.Namespace) -> int:
    folder = export_peft_adapter(args.checkpoint, args.out, args.base_model)
    print(f"wrote {folder / ADAPTER_CONFIG} and {folder / ADAPTER_WEIGHTS}")
    return 0


def _run_import(args: argparse.Namespace) -> int:
    from tpp_monai.bundle.networks import build_backbone

    # the bundles' backbone (same defaults), so the checkpoint's fingerprint matches theirs
    backbone = build_backbone(args.backbone_ckpt, size=args.size, img_size=args.img_size, in_chans=args.in_chans,
                              allow_pickle=args.allow_pickle)
    out = import_peft_adapter(args.adapter, backbone, args.out)
    print(f"wrote {out} ({get_peft(backbone).name}, config {get_peft(backbone).config.to_dict()})")
    return 0
