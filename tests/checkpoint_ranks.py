"""Run by tests/test_checkpoint.py under torchrun with 2 gloo ranks: real DeepSpeed (ZeRO-2) checkpoints of
the tiny transformer, saved and resumed by `training.checkpoint.Checkpointer`. Writes what each rank saw
to `<out>/rank_<r>.json`.

    python -m torch.distributed.run --nproc-per-node 2 tests/checkpoint_ranks.py save <out>
        saves step 1 and step 2 into <out>/checkpoints, then step 3 with each rank in a run dir of its own
        (<out>/run_<rank>: what ranks that resolve different run dirs do); records the step-3 error
    ... resume <out>
        resumes from <out>/checkpoints/latest; records the checkpoint and step each rank loaded
"""

import json
import sys
from pathlib import Path

import torch

from models.config import TransformerConfig
from models.transformer import build_transformer
from training.checkpoint import Checkpointer, CheckpointError, TrainerState
from training.config import TrainConfig
from training.engine import build_engine, init_distributed


def main(mode: str, out: Path) -> None:
    rank, world_size, _ = init_distributed()
    torch.manual_seed(0)
    engine = build_engine(build_transformer(TransformerConfig()), TrainConfig(), world_size)
    generators = {"objective": torch.Generator().manual_seed(rank)}
    ckpt = Checkpointer(out / "checkpoints", rank, keep=3)
    if mode == "save":
        for step in (1, 2):
            ckpt.save(engine, TrainerState(step=step), generators)
        try:
            Checkpointer(out / f"run_{rank}" / "checkpoints", rank).save(
                engine, TrainerState(step=3), generators
            )
            report = {"split_error": None}
        except CheckpointError as err:
            report = {"split_error": str(err)}
    else:
        path, state = ckpt.resume(None, engine, generators)
        report = {"loaded": path.name, "step": state.step}
    (out / f"rank_{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
