"""Progress of a label-server training run where MONAI Label clients look (``train_stats``).

A run is the bundle's ``tpp_pretrain.json`` then its ``train.json``; 3D Slicer shows one bar from
``epoch`` / ``total_epochs``, so both stages report epochs counted over the whole run: :class:`StageProgress`
on the TPP engine, :class:`FineTuneStats` on the fine-tuning trainer. Nothing here imports ``monailabel``.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping


class StageProgress:
    """Ignite handler for the TPP engine: reports progress where MONAI Label clients look (``train_stats``).

    MONAI Label writes ``train_stats`` only from the fine-tuning engine, so during TPP 3D Slicer saw the
    previous run's stats (or none) and its bar sat at 1%. This writes, at the start and after every TPP
    epoch, ``epoch`` / ``total_epochs`` counted over the whole run (TPP epochs + fine-tuning epochs: the
    bar moves once, from 0 to 100%), ``stage`` ("tpp"), ``stage_epoch`` / ``stage_epochs``, ``start_ts``,
    ``current_time`` (no ``total_time``: Slicer reads its presence as "finished") and the last pretext loss.
    """

    def __init__(self, write: Callable[[dict], None], stage_epochs: int, total_epochs: int, offset: int = 0,
                 stage: str = "tpp", start_ts: float | None = None) -> None:
        self.write, self.stage, self.stage_epochs = write, stage, int(stage_epochs)
        self.total_epochs, self.offset = int(total_epochs), int(offset)
        self.start_ts = time.time() if start_ts is None else float(start_ts)

    def stats(self, done_epochs: int, loss: float | None = None) -> dict:
        secs = int(time.time() - self.start_ts)
        out = {"stage": self.stage, "epoch": self.offset + int(done_epochs), "total_epochs": self.total_epochs,
               "stage_epoch": int(done_epochs), "stage_epochs": self.stage_epochs, "start_ts": int(self.start_ts),
               "current_time": f"{secs // 3600}:{secs // 60 % 60:02d}:{secs % 60:02d}"}
        if loss is not None:
            out[f"{self.stage}_loss"] = loss
        return out

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Any) -> None:
        st = engine.state
        out = st.output
        loss = out.get("loss") if isinstance(out, Mapping) else out
        try:
            loss = float(loss) if loss is not None else None
        except (TypeError, ValueError):
            loss = None
        self.write(self.stats(int(st.epoch), loss))


class FineTuneStats:
    """Ignite handler for the bundle's fine-tuning trainer (``train#handlers``): after every epoch (and after
    the bundle's own ``ValidationHandler``, registered before it) calls ``write(trainer, evaluator)``, which
    turns the engines' states into ``train_stats`` (MONAI Label's ``prepare_stats`` keys in the app)."""

    def __init__(self, write: Callable[[Any, Any], None], evaluator: Any = None) -> None:
        self.write, self.evaluator = write, evaluator

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Any) -> None:
        self.write(engine, self.evaluator)
