"""Train a video diffusion transformer (diffusers Wan by default) with VMoBA or full attention.

    python train.py                                   # tiny Wan + VMoBA on the demo cache
    python train.py attention=full train.steps=500    # the full-attention baseline
    python train.py -m attention.threshold=0.2,0.25,0.3   # a sweep, one run dir per job + summary table
    deepspeed --num_gpus 8 train.py model=wan2.1-1.3b deepspeed=zero3 ...

Reads top to bottom: config -> model + attention -> DeepSpeed engine -> data -> resume -> loop (loss,
step, log, evaluate, sample, checkpoint) -> summary. See docs/training.md for every option and output.
"""

import logging
import time
from itertools import islice
from pathlib import Path

import torch
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from data import build_dataloader
from data.cache import producer_description
from models.sequence_parallel import enable_sequence_parallel
from schema import hydra_main
from training.checkpoint import Checkpointer
from training.config import TrainConfig
from training.data_stream import DataStream
from training.draws import draw
from training.ema import EMA
from training.engine import build_engine, init_distributed
from training.evaluation import evaluate
from training.guards import (
    EXIT_CODES,
    NonFiniteError,
    NonFiniteSteps,
    StopRequest,
    agree,
    signal_name,
    together,
)
from training.launch import agree_on_run_dir, strip_launcher_args
from training.logger import RunLogger, memory_gb
from training.objective import FlowMatching
from training.parallel import UlyssesMPU, comm_seconds, init_layout, mean_over
from training.resume import ResumePlan
from training.sampling import PromptSampler
from training.stack import build_stack
from training.summary import write_summary
from training.sweep import run_dirname  # noqa: F401  (registers the resolver naming sweep run dirs)

log = logging.getLogger(__name__)


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _due(step: int, every: int, last: int) -> bool:
    return step == last or (every > 0 and step % every == 0)


def train(cfg: TrainConfig, run_dir: str | Path, name: str = "") -> dict:
    """Train per `cfg`, writing everything under `run_dir`; returns the summary (rank 0; {} elsewhere)."""
    run_dir = Path(run_dir)
    rank, world_size, device = init_distributed()
    agree_on_run_dir(run_dir)
    # Data parallel x sequence parallel: the ranks of one SP group share clips, timesteps and noise, so
    # everything seeded or sharded per rank uses the data-parallel rank (training.parallel).
    layout = init_layout(cfg.train.sequence_parallel)
    dp_rank = layout.dp_rank
    torch.manual_seed(cfg.seed + dp_rank)
    config_yaml = OmegaConf.to_yaml(OmegaConf.structured(cfg))
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)

    # Model: the transformer with VMoBA (or full) self-attention, wrapped by the DeepSpeed engine.
    stack = build_stack(
        cfg.model, cfg.attention, cfg.objective, device, precision=cfg.train.precision, train=cfg.train
    )
    controller = stack.controller
    if layout.sp > 1:
        enable_sequence_parallel(stack.transformer, controller, layout.sp_group)
    engine = build_engine(
        stack.transformer, cfg, layout.dp, mpu=UlyssesMPU(layout) if layout.sp > 1 else None
    )
    ema = EMA(engine.module, cfg.ema.decay) if cfg.ema.enabled else None
    model_fn = stack.model_fn(engine)
    objective = FlowMatching(cfg.objective)
    # Timesteps and noise are drawn per sample from (seed, step, its index in the global batch)
    # (training.draws): a resumed run draws what the uninterrupted one did, with no generator to save.
    generators: dict[str, torch.Generator] = {}

    # Data: an endless train stream (its position is resumable) and fixed validation batches.
    producer = producer_description(cfg.model.vae, cfg.model.text_encoder, cfg.data)
    loader = build_dataloader(
        cfg.data, "train", batch_size=cfg.train.batch_size, rank=dp_rank, world_size=layout.dp, seed=cfg.seed,
        producer=producer,
    )  # fmt: skip

    def epoch_loader(epoch: int):
        loader.batch_sampler.set_epoch(epoch)
        return loader

    stream = DataStream(epoch_loader)
    val_loader = build_dataloader(cfg.data, "val", batch_size=cfg.eval.batch_size, producer=producer)
    val_batches = [_to(b, device) for b in islice(val_loader, cfg.eval.num_batches)]
    if not val_batches:
        log.warning(
            "the cache has no validation clips (data.val_keys / data.val_fraction): evaluating on train clips"
        )
        val_batches = [_to(b, device) for b in islice(epoch_loader(0), cfg.eval.num_batches)]
    sampler = PromptSampler(
        cfg.sample, objective, stack.text_encoder, stack.vae, device, transformer=stack.transformer
    )
    stack.text_encoder = None  # the prompts are embedded once; free its memory for training

    # Resume: from checkpoint.load if set, else from <run_dir>/checkpoints/latest if present (an unreadable
    # one falls back to the previous kept checkpoint); config changes are checked first (training.resume).
    ckpt = Checkpointer(
        run_dir / "checkpoints", rank, cfg.checkpoint.keep, merge_lora=cfg.train.lora.merge_on_export
    )
    # Every rank, as checkpoints record it (complete.json); train.sequence_parallel is compared as a key.
    plan = ResumePlan(cfg, world_size)
    resume_from, state = ckpt.resume(
        cfg.checkpoint.load, engine, generators, ema, check=plan.check, from_latest=cfg.checkpoint.resume
    )
    if resume_from is not None:
        plan.apply(engine, state)  # allowed changes the checkpoint would override (LR, data position)
        stream.load_state_dict(state.data)
    if rank == 0:  # config.yaml on the first start, config.resume-<step>.yaml on each resume
        plan.write_config(run_dir, state.step if resume_from is not None else None)
    logger = RunLogger(
        run_dir, cfg.wandb, name=name, config=OmegaConf.to_container(OmegaConf.structured(cfg)),
        total_steps=cfg.train.steps, start_step=state.step, enabled=rank == 0,
    )  # fmt: skip
    if resume_from is not None:
        logger.write(f"resumed from {resume_from} at step {state.step}")

    def save() -> None:
        with logger.timed("saving a checkpoint", state.step):
            state.data, state.elapsed = stream.state_dict(), elapsed()
            ckpt.save(engine, state, generators, ema, config_yaml)

    started, start_elapsed = time.perf_counter(), state.elapsed
    comm_mark = comm_seconds()

    def elapsed() -> float:
        return start_elapsed + time.perf_counter() - started

    last = cfg.train.steps
    # SIGTERM/SIGINT only set a flag from here on: the loop stops after a step, with a checkpoint.
    stop, nonfinite = StopRequest(), NonFiniteSteps(cfg.train.max_nan_steps, verbose=rank == 0)

    def stop_now(signum: int) -> None:
        """Every rank: save (unless this step's checkpoint was just written), close wandb, exit."""
        if not _due(state.step, cfg.checkpoint.every, last) or state.step == 0:
            save()
        code = EXIT_CODES[signum]
        logger.write(
            f"{signal_name(signum)}: stopped at step {state.step} with a checkpoint (exit {code}); the same "
            "command resumes from it"
        )
        logger.close()
        stop.restore()
        raise SystemExit(code)

    # The loop: one iteration = one optimizer step over grad_accum micro-batches.
    while state.step < last:
        step_start, data_wait, losses, tokens, keys = time.perf_counter(), 0.0, [], 0, []
        for micro in range(cfg.train.grad_accum):
            wait_start = time.perf_counter()
            batch = _to(together(lambda: next(stream), device), device)  # a bad sample stops every rank
            data_wait += time.perf_counter() - wait_start
            t, noise = draw(
                objective, batch["latents"].shape, seed=cfg.seed, step=state.step, micro=micro,
                first_index=dp_rank * cfg.train.batch_size, device=device,
            )  # fmt: skip
            loss = objective.loss(model_fn, batch["latents"], batch, t=t, noise=noise)
            engine.backward(loss)
            engine.step()
            losses.append(loss.detach())
            keys += batch["key"]
            tokens += batch["latents"].shape[0] * controller.grid[0] * controller.grid[1] * controller.grid[2]
        # Every data-parallel group's real tokens (its last batches of an epoch may be smaller).
        tokens_total = torch.tensor(float(tokens), device=device)
        if layout.dp > 1:
            dist.all_reduce(tokens_total, group=layout.dp_group)
        # One all-reduce per step: a stop signal on any rank, a NaN/Inf loss on any rank. A non-finite
        # loss gives a non-finite global grad norm, on which DeepSpeed's ZeRO optimizer (stages 1-3)
        # skips the update itself: grads zeroed, no optimizer or LR-scheduler step, engine.skipped_steps
        # counted (and checkpointed); every rank sees the same all-reduced norm, so all skip together.
        signum, bad_loss = agree([stop.signum, float(not torch.isfinite(torch.stack(losses)).all())], device)
        signum = int(signum)
        if bad_loss or not engine.was_step_applied():
            if engine.was_step_applied():  # ZeRO stage 0 has no such check: the update went in
                raise NonFiniteError(
                    f"step {state.step + 1}: a NaN/Inf loss was applied (deepspeed.stage=0 cannot skip an "
                    "update); use deepspeed.stage>=1 and resume from the last checkpoint"
                )
            every_key: list[list[str]] = [keys] * world_size
            if world_size > 1:
                dist.all_gather_object(every_key, keys)
            why = "NaN/Inf loss" if bad_loss else "NaN/Inf gradient norm"
            try:
                nonfinite.skipped(state.step + 1, [k for ks in every_key for k in ks], why)
            except NonFiniteError:
                logger.close()
                stop.restore()
                raise
            if signum:
                stop_now(signum)
            continue  # the same step again, on the next batches
        nonfinite.ok()
        state.step += 1
        if ema is not None:
            ema.update(engine.module)
        step_time = time.perf_counter() - step_start

        if _due(state.step, cfg.train.log_every, last):
            loss = torch.stack(losses).mean()
            if world_size > 1:
                dist.all_reduce(loss)  # a sum (gloo has no AVG); SP ranks hold equal losses
                loss = loss / world_size
            # Each rank's density covers its heads (SP) and clips (DP): the run's is their mean.
            densities = mean_over(dist.group.WORLD, {
                k: v for k, v in controller.stats().items() if k.startswith("density/")
            })  # fmt: skip
            comm, comm_mark = comm_seconds() - comm_mark, comm_seconds()
            tokens_per_s = tokens_total.item() / step_time
            logger.log(state.step, {
                "time": elapsed(), "loss": loss, "lr": engine.get_lr()[0],
                "grad_norm": engine.get_global_grad_norm(), "step_time": step_time,
                "tokens_per_s": tokens_per_s, "tokens_per_s_per_gpu": tokens_per_s / world_size,
                "data_wait": data_wait, "mem_gb": memory_gb(device), "skipped_steps": engine.skipped_steps,
                **densities,
                **({"comm_fraction": comm / step_time} if cfg.deepspeed.comms_logger else {}),
            })  # fmt: skip
        if _due(state.step, cfg.eval.every, last):
            eval_time = elapsed()
            with logger.timed("evaluating", state.step):
                evaluation = mean_over(  # recall/density of this rank's heads under SP
                    layout.sp_group, evaluate(model_fn, objective, controller, val_batches, cfg.eval)
                )
            logger.log_eval(state.step, {"time": eval_time, **evaluation})
        if _due(state.step, cfg.sample.every, last):
            with logger.timed(f"sampling {len(cfg.sample.prompts)} prompt(s)", state.step):
                if ema is None:
                    videos = sampler.generate(model_fn, controller)
                else:
                    with ema.applied(engine.module):
                        videos = sampler.generate(model_fn, controller)
                if rank == 0:
                    paths = sampler.write(videos, run_dir / "samples" / f"step_{state.step:06d}")
                    logger.log_videos(state.step, paths, sampler.captions(paths))
        if _due(state.step, cfg.checkpoint.every, last):
            save()
        if signum:
            stop_now(signum)

    stop.restore()
    logger.close()
    return write_summary(run_dir, name, device=device.type) if rank == 0 else {}


@hydra_main(TrainConfig, "train")  # validates everything before any work (a user error: one line, exit 2)
def main(config: TrainConfig) -> None:
    hydra_cfg = HydraConfig.get()
    # Named by what the run changes; its wandb group (which make demo and compare.py --launch set) shows apart.
    changes = [o for o in hydra_cfg.overrides.task if not o.lstrip("+").startswith("wandb.group=")]
    name = config.wandb.name or ",".join(changes) or "default"
    train(config, hydra_cfg.runtime.output_dir, name)


if __name__ == "__main__":
    strip_launcher_args()  # `deepspeed train.py` passes --local_rank=N, which Hydra would reject
    main()
