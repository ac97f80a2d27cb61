"""NaN/Inf steps: DeepSpeed's skip leaves weights, LR schedule and step count alone; train.py skips, logs
and continues, and stops after `train.max_nan_steps` in a row with what to try. The non-finite loss comes
from NaN latents handed to the real objective on chosen calls (the cache's clips are finite)."""

import math

import pytest
import torch
from test_train import cache, make_cfg, records  # noqa: F401  (cache: the module's latent cache)

from models.transformer import build_transformer
from training.engine import build_engine, init_distributed
from training.guards import NonFiniteError
from training.objective import FlowMatching


def nan_on_calls(monkeypatch, calls: set[int]) -> list[int]:
    """FlowMatching.loss sees NaN latents on the given (1-based) calls; returns the call counter."""
    count, real = [0], FlowMatching.loss

    def loss(self, model_fn, latents, *args, **kwargs):
        count[0] += 1
        if count[0] in calls:
            latents = torch.full_like(latents, math.nan)
        return real(self, model_fn, latents, *args, **kwargs)

    monkeypatch.setattr(FlowMatching, "loss", loss)
    return count


def test_deepspeed_skips_a_nan_update_without_touching_weights_or_the_lr_schedule(cache):  # noqa: F811
    """The mechanism train.py relies on (ZeRO-2, fp32, the default): a NaN loss's backward + step leaves
    every weight and the LR scheduler as they were, zeroes the grads and counts engine.skipped_steps;
    the next finite step updates as usual."""
    init_distributed()
    cfg = make_cfg(cache, "train.warmup_steps=5", "train.lr_schedule=linear")
    model = build_transformer(cfg.model.transformer)
    engine = build_engine(model, cfg, 1)
    before = {k: v.clone() for k, v in engine.module.state_dict().items()}
    lr, sched = engine.get_lr()[0], engine.lr_scheduler.last_epoch

    w = next(p for p in engine.module.parameters() if p.requires_grad)
    loss = w.sum() * math.nan + sum(p.sum() for p in engine.module.parameters())
    engine.backward(loss)
    engine.step()
    assert not engine.was_step_applied() and engine.skipped_steps == 1
    assert all(torch.equal(before[k], v) for k, v in engine.module.state_dict().items())
    assert engine.get_lr()[0] == lr and engine.lr_scheduler.last_epoch == sched

    loss = sum((p * p).sum() for p in engine.module.parameters())
    engine.backward(loss)
    engine.step()
    assert engine.was_step_applied() and engine.lr_scheduler.last_epoch == sched + 1
    assert any(not torch.equal(before[k], v) for k, v in engine.module.state_dict().items())


def test_a_nan_step_is_skipped_logged_and_training_continues(cache, tmp_path, monkeypatch):  # noqa: F811
    from train import train

    nan_on_calls(monkeypatch, {2})  # the second attempt (at step 2) sees NaN latents
    cfg = make_cfg(
        cache, "train.steps=3", "train.warmup_steps=10", "train.lr_schedule=linear", "eval.every=0",
        "sample.every=0", "checkpoint.every=100",
    )  # fmt: skip
    train(cfg, tmp_path)
    logged = records(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in logged] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in logged)
    assert [r["skipped_steps"] for r in logged] == [0, 1, 1]
    # The LR schedule did not advance on the skipped attempt: after step s it is at warm-up factor
    # (s + 1) / 11 (with the skip counted it would read 4/11 at step 2).
    assert [r["lr"] for r in logged] == pytest.approx([cfg.train.lr * (s + 1) / 11 for s in (1, 2, 3)])


def test_the_skip_warning_names_the_step_and_the_samples(cache, tmp_path, monkeypatch, caplog):  # noqa: F811
    from train import train

    nan_on_calls(monkeypatch, {1})
    cfg = make_cfg(cache, "train.steps=1", "eval.every=0", "sample.every=0")
    with caplog.at_level("WARNING", logger="training.guards"):
        train(cfg, tmp_path)
    (warning,) = [r.getMessage() for r in caplog.records if "update skipped" in r.getMessage()]
    assert warning.startswith("step 1: NaN/Inf loss") and "Samples: clip" in warning


def test_nan_steps_in_a_row_stop_the_run_with_what_to_try(cache, tmp_path, monkeypatch):  # noqa: F811
    from train import train

    nan_on_calls(monkeypatch, {2, 3, 4})
    cfg = make_cfg(cache, "train.steps=5", "train.max_nan_steps=3", "eval.every=0", "sample.every=0")
    with pytest.raises(NonFiniteError) as err:
        train(cfg, tmp_path)
    message = str(err.value)
    assert message.startswith("step 2: the loss or gradients were NaN/Inf in 3 consecutive steps")
    for hint in ("train.lr", "train.precision=fp32", "train.grad_clip", "clip"):
        assert hint in message
    assert [r["step"] for r in records(tmp_path / "metrics.jsonl")] == [1]
