"""scripts/reproduce.py: the published table, the commands it runs, and a --quick end-to-end row."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]


def _module():
    return load_script("reproduce")


def test_published_values_and_plan(capsys):
    rp = _module()
    # Adapter w/ TPP row of METHOD.md (Tables 3 and 4)
    assert rp.published("qata", "adapter", "mae") == {"dice": 79.50, "hd95": 29.28}
    assert rp.published("oct_c8", "adapter", "mae") == {"acc": 96.61, "auc": 99.77, "f1": 96.61}
    assert rp.published("glas", "full", "none") == {"dice": 88.84, "hd95": 47.41}
    assert rp.published("mhist", "adapter", "mae", "path_dino") == {"acc": 85.67}
    assert rp.published("mhist", "evp", "dino") == {}  # not quoted: the report says so instead of inventing one
    assert all(rp.published(d, m, "none") for d in rp.DATASETS for m in rp.METHODS)
    rp.run(["--dataset", "qata", "--method", "adapter", "--tpp", "mae", "--dry_run", "--work_dir", "/w"])
    out = capsys.readouterr().out.splitlines()
    cmds = [line for line in out if line.startswith("python -m monai.bundle run")]
    assert len(cmds) == 3
    assert "tpp_pretrain.json" in cmds[0] and "--pretext mae" in cmds[0]
    assert "--tpp_ckpt /w/models/tpp_target_params.pt" in cmds[1]
    assert "evaluate.json" in cmds[2]
    rp.run(["--dataset", "mhist", "--method", "linear", "--tpp", "none", "--dry_run"])
    cmds = [line for line in capsys.readouterr().out.splitlines() if line.startswith("python")]
    assert len(cmds) == 2 and "--tpp_ckpt ''" in cmds[0]
    with pytest.raises(SystemExit):
        rp.run(["--dataset", "mhist", "--method", "linear", "--tpp", "mae", "--dry_run"])


def test_quick_row_end_to_end(tmp_path, capsys):
    """--quick runs TPP -> fine-tuning -> test evaluation of the qata/adapter/mae row on tiny synthetic data."""
    rp = _module()
    warnings.filterwarnings("ignore", message="No --backbone_ckpt given")
    measured = rp.run(["--dataset", "qata", "--method", "adapter", "--tpp", "mae", "--quick", "--threads", "1",
                       "--work_dir", str(tmp_path)])
    assert (tmp_path / "models" / "tpp_target_params.pt").is_file()
    assert (tmp_path / "models" / "model.pt").is_file()
    assert set(measured) == {"dice", "hd95"}
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text()) == measured
    out = capsys.readouterr().out
    assert "| dice (%) |" in out and "| 79.5 |" in out and "| 29.28 |" in out and "(estimate)" in out
