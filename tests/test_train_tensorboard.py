"""MetricsLogger's TensorBoard output, read back with TensorBoard's own event reader."""

from __future__ import annotations

from lmstack.train.metrics import MetricsLogger


def test_tensorboard_scalars_read_back_with_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = MetricsLogger(tmp_path, plot=False)
    assert log.tensorboard_enabled
    log.log({"step": 1, "loss": 3.5, "lr": 1e-3})
    log.log({"step": 2, "loss": 3.25, "lr": 9e-4})
    log.log({"step": 2, "val_loss": 3.4, "val_ppl": 29.96})
    log.log({"step": 3, "loss": float("nan")})  # not finite: kept in jsonl, not sent to TensorBoard
    log.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "val/val_loss", "val/val_ppl"} <= tags
    loss = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert loss == [(1, 3.5), (2, 3.25)]
    assert [(e.step, round(e.value, 4)) for e in acc.Scalars("val/val_loss")] == [(2, 3.4)]
