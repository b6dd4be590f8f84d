"""``python -m monai.bundle run ... --tracking mlflow`` on a 2D bundle: MONAI's own tracking settings
(``DEFAULT_MLFLOW_SETTINGS``: an MLFlowHandler appended to ``train#handlers`` and ``validate#handlers``, the
executed config saved under ``output_dir``) log parameters, losses and metrics to ``<bundle_root>/eval``
(``mlruns.db`` + ``mlruns/`` artifacts); the run is read back with the MLflow client and compared with the
bundle's own JSONL logs. Tiny ViT, 4 iterations, CPU.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from test_bundles import TINY, cfg, make_mhist  # noqa: E402

mlflow = pytest.importorskip("mlflow")


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # bundle_root resolves to bundles/<name> from the repository root
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="No --backbone_ckpt given")


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_tracking_mlflow_logs_params_losses_and_metrics(tmp_path):
    from mlflow.tracking import MlflowClient
    from monai.bundle import run
    from monai.utils import path_to_sqlite_uri

    data = make_mhist(tmp_path)
    work = tmp_path / "work"
    run(config_file=cfg("mhist", "train.json"), meta_file=cfg("mhist", "metadata.json"), tracking="mlflow",
        **{**TINY, "dataset_dir": str(data), "bundle_root": str(work), "batch_size": 4, "num_iterations": 4,
           "tpp_ckpt": ""})

    db = work / "eval" / "mlruns.db"
    assert db.is_file() and (work / "eval" / "mlruns").is_dir()  # tracking store and artifacts under the output
    client = MlflowClient(tracking_uri=path_to_sqlite_uri(str(db)))
    exp = client.get_experiment_by_name("monai_experiment")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    r = runs[0]
    assert r.info.status == "FINISHED"
    # parameters: MLFlowHandler's default tracking params of the trainer (8 training images / batch 4 = 2 per epoch)
    assert r.data.params["max_epochs"] == "2" and r.data.params["epoch_length"] == "2"
    # losses: one value per iteration, equal to what the bundle's own JSONL logger wrote
    losses = client.get_metric_history(r.info.run_id, "train_loss")
    logged = {row["iteration"]: row["loss"] for row in _jsonl(work / "logs" / "train_log.jsonl")}
    assert sorted(m.step for m in losses) == [1, 2, 3, 4] == sorted(logged)
    for m in losses:
        assert m.value == pytest.approx(logged[m.step], rel=1e-6)
    # validation metrics: one value per epoch, equal to the JSONL validation log
    val = _jsonl(work / "logs" / "val_log.jsonl")
    assert len(val) == 2
    for key in ("acc", "auc", "f1"):
        hist = sorted(client.get_metric_history(r.info.run_id, key), key=lambda m: m.step)
        assert [m.step for m in hist] == [1, 2]
        assert [m.value for m in hist] == pytest.approx([row[key] for row in val])
    # the executed config is kept as an artifact
    assert any(a.path.startswith("config_") and a.path.endswith(".json") for a in client.list_artifacts(r.info.run_id))


def test_bundle_keeps_the_ids_monai_tracking_patches():
    """What MONAI's patch_bundle_tracking needs from the raw train.json: literal handler lists next to the engines,
    and an ``output_dir`` it can extend (a macro there was the KeyError)."""
    from monai.bundle import ConfigParser
    from monai.bundle.utils import DEFAULT_MLFLOW_SETTINGS

    for bundle in ("mhist", "oct_c8", "chestxray_pa", "glas", "qata", "demo_ct"):
        p = ConfigParser()
        p.read_config(cfg(bundle, "train.json"))
        for kind in ("trainer", "validator"):
            ids = DEFAULT_MLFLOW_SETTINGS["handlers_id"][kind]
            assert p.get(ids["id"]) is not None, (bundle, ids["id"])
            assert isinstance(p.get(ids["handlers"]), list), (bundle, ids["handlers"])
        assert not str(p["output_dir"]).startswith("%"), bundle
