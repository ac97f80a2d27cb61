"""Resumable pieces without an engine: the data stream's position, the `latest` pointer, EMA arithmetic."""

import pytest
import torch

from training.checkpoint import COMPLETE, Checkpointer, CheckpointError
from training.data_stream import DataStream
from training.ema import EMA


def make_loader(epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(epoch)
    return torch.randperm(5, generator=g).tolist()  # a different order every epoch, as a seeded sampler gives


def test_data_stream_resumes_at_the_same_batch_across_epochs():
    stream = DataStream(make_loader)
    uninterrupted = [next(stream) for _ in range(13)]
    first = DataStream(make_loader)
    head = [next(first) for _ in range(7)]
    assert first.state_dict() == {"epoch": 1, "batch": 2}
    resumed = DataStream(make_loader)
    resumed.load_state_dict(first.state_dict())
    assert head + [next(resumed) for _ in range(6)] == uninterrupted


def test_data_stream_names_a_position_past_the_end_of_its_epoch():
    """A position saved with more batches per epoch (a smaller batch size, a larger split) fails clearly
    instead of with the bare StopIteration of the skipped loader."""
    stream = DataStream(make_loader)
    stream.load_state_dict({"epoch": 1, "batch": 7})
    with pytest.raises(
        RuntimeError, match=r"\(epoch 1, batch 7\) is past the end of that epoch, which has 5"
    ):
        next(stream)


def test_data_stream_refuses_an_empty_split():
    with pytest.raises(RuntimeError, match="yielded no batch"):
        next(DataStream(lambda epoch: []))


def test_latest_pointer_must_name_a_complete_checkpoint(tmp_path):
    ckpt = Checkpointer(tmp_path)
    assert ckpt.latest() is None
    step = tmp_path / "step_000004"
    step.mkdir()
    (tmp_path / "latest").write_text("step_000004\n")
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        ckpt.latest()
    (step / "manifest_rank_000.json").write_text("{}")  # a save that did not finish on every rank
    (step / "trainer_state.json").write_text("{}")
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        ckpt.latest()
    (step / COMPLETE).write_text("{}")
    assert ckpt.latest() == step
    (step / "manifest_rank_000.json").unlink()
    (step / COMPLETE).unlink()  # written before manifests existed: trainer_state.json marks it complete
    assert ckpt.latest() == step


def test_ema_matches_the_recurrence_in_float64_and_swaps_back():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.9)
    reference = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    for t in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model)
        d = 0.0 if t == 0 else min(0.9, (1 + t) / (10 + t))  # diffusers' warm-up (training.ema.decay_at)
        for n, p in model.named_parameters():
            reference[n] = d * reference[n] + (1 - d) * p.detach().double()
    current = {n: p.detach().clone() for n, p in model.named_parameters()}
    with ema.applied(model):
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.double(), reference[n], rtol=1e-6, atol=1e-6)
    assert all(torch.equal(p, current[n]) for n, p in model.named_parameters())
