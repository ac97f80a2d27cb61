"""Compare a VMoBA run with a full-attention baseline: writes report.md, PNG plots, report.json and a wandb run.

From two existing run dirs (written by train.py):

    python scripts/compare.py --vmoba outputs/runs/A --baseline outputs/runs/B --out outputs/compare

Or launch both runs first, from one config with the same seed and data (only `attention=` differs):

    python scripts/compare.py --launch --out outputs/compare -- train.steps=50 data=demo
    python scripts/compare.py --launch --vmoba-set attention.threshold=0.2 --out outputs/compare -- train.steps=50
    python scripts/compare.py --launch --launcher "deepspeed --num_gpus 8" --out outputs/compare -- model=wan2.1-1.3b

Launched runs go to `<out>/runs/vmoba` and `<out>/runs/full`; a launched run that already finished resumes
from its last checkpoint (so re-running the comparison reuses it). See docs/metrics.md.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import logging  # noqa: E402
import shlex  # noqa: E402
import subprocess  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vmoba", type=Path, help="run dir of the VMoBA run (omit with --launch)")
    p.add_argument("--baseline", type=Path, help="run dir of the full-attention run (omit with --launch)")
    p.add_argument("--out", type=Path, required=True, help="report directory (created)")
    p.add_argument("--launch", action="store_true", help="run train.py twice (VMoBA, full) before comparing")
    p.add_argument("--launcher", default=f"{shlex.quote(sys.executable)}", help="command that runs train.py")
    p.add_argument(
        "--vmoba-attention", default="vmoba", help="attention config of the VMoBA run (configs/attention/)"
    )
    p.add_argument(
        "--vmoba-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="with --launch: an override for the VMoBA run only, e.g. attention.threshold=0.2 (repeatable)",
    )
    p.add_argument("--wandb-mode", default="offline", choices=("offline", "online", "disabled"))
    p.add_argument("--wandb-project", default="vmoba")
    p.add_argument(
        "--lpips-backbone", help="local torchvision state dict of the LPIPS backbone (skipped if unset)"
    )
    p.add_argument("--lpips-net", default="alex", choices=("alex", "vgg", "squeeze"))
    p.add_argument("--i3d", help="local TorchScript I3D for FVD (skipped if unset)")
    p.add_argument("--clip", help="local CLIP model dir for the CLIP score (skipped if unset)")
    p.add_argument("overrides", nargs="*", help="with --launch: Hydra overrides for both runs (after --)")
    args = p.parse_args(argv)
    if args.launch:
        if args.vmoba or args.baseline:
            p.error("--launch writes its own runs; drop --vmoba/--baseline (or drop --launch)")
    elif not (args.vmoba and args.baseline):
        p.error("give --vmoba RUN_DIR and --baseline RUN_DIR, or --launch to train both")
    elif args.overrides or args.vmoba_set:
        p.error(f"overrides {args.overrides + args.vmoba_set} only apply with --launch")
    return args


def launch(args: argparse.Namespace) -> tuple[Path, Path]:
    """Trains the VMoBA and the full-attention run from the same overrides (same seed, same data), in one
    wandb group named after `--out`, which the report's run joins (a `wandb.group=` override comes later and
    wins)."""
    runs = {"vmoba": args.out / "runs" / "vmoba", "full": args.out / "runs" / "full"}
    only = {"vmoba": args.vmoba_set, "full": []}  # the full config has no VMoBA keys to override
    group = f"wandb.group={args.out.resolve().name}"
    for name, attention in (("vmoba", args.vmoba_attention), ("full", "full")):
        cmd = [*shlex.split(args.launcher), str(REPO / "train.py"), f"attention={attention}", group]
        cmd += args.overrides
        cmd += only[name]
        cmd.append(f"hydra.run.dir={runs[name].resolve()}")
        print("+", shlex.join(cmd), flush=True)
        if subprocess.run(cmd, cwd=REPO).returncode != 0:
            sys.exit(f"compare.py: the {name} run failed (command above); no report written")
    return runs["vmoba"], runs["full"]


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import torch

    from evaluation.metrics import FeatureMetricsConfig, load_feature_networks
    from evaluation.report import write_report

    vmoba, baseline = launch(args) if args.launch else (args.vmoba, args.baseline)
    features = FeatureMetricsConfig(
        lpips_backbone=args.lpips_backbone, lpips_net=args.lpips_net, i3d=args.i3d, clip=args.clip
    )
    report = write_report(
        vmoba,
        baseline,
        args.out,
        networks=load_feature_networks(features, "cuda" if torch.cuda.is_available() else "cpu"),
        wandb_mode=args.wandb_mode,
        wandb_project=args.wandb_project,
    )
    print(f"report: {report}")


if __name__ == "__main__":
    main()
