"""Evaluate a checkpoint: validation loss (fixed timesteps and noise) and VMoBA attention recall/density per
layer and partition type, on the cached validation split; writes one JSON file.

    python scripts/evaluate.py outputs/runs/A                          # the run's checkpoints/latest
    python scripts/evaluate.py outputs/runs/A/checkpoints/step_000300 --out eval.json
    python scripts/evaluate.py outputs/runs/A attention.type=full      # the same weights, full attention
    python scripts/evaluate.py outputs/runs/A --num-batches 8 --timesteps 0.1 0.5 0.9 data.cache_dir=/data/cache

The config is the checkpoint's (or run's) config.yaml, with `key=value` overrides applied; by default the
numbers use the run's `eval` settings, so they equal that run's eval.jsonl at the same step. See docs/metrics.md.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
from itertools import islice  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "checkpoint", type=Path, help="run dir (its checkpoints/latest) or checkpoint dir (step_XXXXXX)"
    )
    p.add_argument("overrides", nargs="*", help="config overrides, key=value (e.g. attention.type=full)")
    p.add_argument(
        "--config", type=Path, help="config.yaml to use (default: the checkpoint's, else the run's)"
    )
    p.add_argument(
        "--out", type=Path, help="output JSON (default: <checkpoint dir>/evaluation_<attention>.json)"
    )
    p.add_argument("--split", default="val", choices=("val", "train"), help="cached split to evaluate on")
    p.add_argument(
        "--num-batches", type=int, help="validation batches (default: the config's eval.num_batches)"
    )
    p.add_argument("--batch-size", type=int, help="clips per batch (default: eval.batch_size)")
    p.add_argument(
        "--timesteps", type=float, nargs="+", help="flow times in (0, 1] (default: eval.timesteps)"
    )
    p.add_argument("--seed", type=int, help="noise seed (default: eval.seed)")
    p.add_argument("--no-recall", action="store_true", help="skip attention recall/density")
    p.add_argument("--ema", action="store_true", help="evaluate the EMA weights (transformer_ema/)")
    args = p.parse_args(argv)
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        p.error(f"overrides must be key=value, got {bad}")
    return args


def load_eval_config(args: argparse.Namespace):
    """The validated TrainConfig (with overrides and the command line's eval settings) and the weights dir."""
    from omegaconf import OmegaConf

    from training.checkpoint import resolve_transformer_dir
    from training.config import TrainConfig, validate

    transformer_dir = resolve_transformer_dir(args.checkpoint, args.ema)
    candidates = (
        [args.config]
        if args.config
        else [transformer_dir.parent / "config.yaml", args.checkpoint / "config.yaml"]
    )
    config_path = next((c for c in candidates if c.is_file()), None)
    if config_path is None:
        sys.exit(f"evaluate.py: no config.yaml at {[str(c) for c in candidates]}; pass --config")
    cfg = validate(
        TrainConfig, OmegaConf.merge(OmegaConf.load(config_path), OmegaConf.from_dotlist(args.overrides))
    )
    eval_overrides = {
        "num_batches": args.num_batches, "batch_size": args.batch_size, "timesteps": args.timesteps, "seed": args.seed,
    }  # fmt: skip
    cfg.eval = dataclasses.replace(cfg.eval, **{k: v for k, v in eval_overrides.items() if v is not None})
    return cfg, transformer_dir


def evaluate_checkpoint(args: argparse.Namespace) -> dict:
    import torch

    from data import build_dataloader
    from data.cache import producer_description
    from training.evaluation import evaluate
    from training.objective import FlowMatching
    from training.stack import build_stack

    cfg, transformer_dir = load_eval_config(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # Every parameter in the compute dtype, as the trainer's DeepSpeed engine had them.
    stack = build_stack(
        cfg.model, cfg.attention, cfg.objective, device, precision=cfg.train.precision, weights=transformer_dir,
        encoders=False,
    )  # fmt: skip

    producer = producer_description(cfg.model.vae, cfg.model.text_encoder, cfg.data)
    loader = build_dataloader(cfg.data, args.split, batch_size=cfg.eval.batch_size, producer=producer)
    batches = [
        {k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()}
        for b in islice(loader, cfg.eval.num_batches)
    ]
    if not batches:
        sys.exit(f"evaluate.py: the {args.split!r} split of {cfg.data.cache_dir} is empty; try --split train")

    result = {
        "checkpoint": str(transformer_dir),
        "attention": cfg.attention.type,
        "split": args.split,
        "clips": sum(b["latents"].shape[0] for b in batches),
        "timesteps": list(cfg.eval.timesteps),
        "seed": cfg.eval.seed,
    }
    state = transformer_dir.parent / "trainer_state.json"
    if state.is_file():
        result["step"] = json.loads(state.read_text()).get("step")
    # The trainer's own evaluation (training.evaluation), so the numbers equal the run's eval.jsonl.
    eval_cfg = dataclasses.replace(cfg.eval, recall=not args.no_recall)
    return result | evaluate(
        stack.model_fn(), FlowMatching(cfg.objective), stack.controller, batches, eval_cfg
    )


def main(argv=None) -> None:
    args = parse_args(argv)
    result = evaluate_checkpoint(args)
    out = args.out
    if out is None:
        if "step" not in result:
            sys.exit("evaluate.py: the weights are not in a checkpoint dir; pass --out FILE.json")
        out = Path(result["checkpoint"]).parent / f"evaluation_{result['attention']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
