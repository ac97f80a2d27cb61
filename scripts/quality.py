"""The quality experiment of issue 28, end to end: VMoBA against full attention on a model trained from scratch.

    python scripts/quality.py                       # one GPU: configs/experiment/quality.yaml (~10 min per run)
    python scripts/quality.py --tiny                # the same pipeline at a CPU size, in a few minutes
    python scripts/quality.py -- train.steps=1200   # Hydra overrides for the three training runs

1. writes the dataset (scripts/make_quality_dataset.py) at the experiment's clip size,
2. caches latents and text (scripts/cache_latents.py +experiment=...),
3. trains three runs with the same seeds and data: VMoBA as the original VMoBA code/paper (threshold 0.25,
   token granularity), VMoBA with block granularity, and full attention,
4. writes the comparison report of each VMoBA run against the baseline (evaluation/report.py:
   loss curves with the ratio panel, step time, memory, density and recall per layer, sample PSNR/SSIM
   with the same noise) under `<out>/report_token/` and `<out>/report_block/`,
5. the training-free sweep: the full-attention checkpoint sampled with VMoBA, dense for the first N
   denoising steps (`attention.dense_first_steps`), PSNR/SSIM against its own full-attention samples
   (same prompts and noise) and the sampling time,
6. `<out>/results.md` (the numbers at equal steps and at equal wall-clock, recall per layer, the sweep;
   ready for docs/benchmarks.md), `results.json` and `samples.png` (a strip of sample frames, one row per run).

Every stage resumes: kept clips, finished cache shards and finished runs (train.py resumes from `latest`)
are reused, so a second call only redoes the reports and the sweep.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from scripts.stage_runner import run_stage, stopped_message  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# name -> (label, train.py attention overrides); the experiment config sets the blocks and the threshold.
RUNS = {
    "vmoba_token": ("VMoBA token", ["attention=vmoba", "attention.granularity=token"]),
    "vmoba_block": ("VMoBA block", ["attention=vmoba", "attention.granularity=block"]),
    "full": ("full", ["attention=full"]),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="CPU size: +experiment=quality_tiny, 6 small clips")
    p.add_argument("--out", type=Path, help="output folder (default outputs/quality or outputs/quality_tiny)")
    p.add_argument("--clips", type=int, help="dataset clips (default 120; 6 with --tiny)")
    p.add_argument(
        "--dense-steps",
        type=int,
        nargs="+",
        help="the sweep's dense_first_steps values (default 0 3 6 10 15; 0 1 2 with --tiny)",
    )
    p.add_argument("--sweep-granularities", nargs="+", default=["token", "block"], choices=("token", "block"))
    p.add_argument(
        "--repeats",
        type=int,
        help="timed sampling passes per setting, the fastest kept (default 2; 1 with --tiny)",
    )
    p.add_argument("--launcher", default=shlex.quote(sys.executable), help="command that runs train.py")
    p.add_argument("--wandb-mode", default="offline", choices=("offline", "online", "disabled"))
    p.add_argument("overrides", nargs="*", help="Hydra overrides for the three training runs (after --)")
    args = p.parse_args(argv)
    args.experiment = "quality_tiny" if args.tiny else "quality"
    args.out = args.out or REPO / "outputs" / args.experiment
    args.clips = args.clips or (6 if args.tiny else 120)
    args.dense_steps = args.dense_steps or ([0, 1, 2] if args.tiny else [0, 3, 6, 10, 15])
    args.repeats = args.repeats or (1 if args.tiny else 2)
    return args


def _run(cmd: list[str], what: str) -> None:
    """Run one stage's command; a SIGTERM/SIGINT reaches it and ends the script (scripts/stage_runner.py)."""
    print("+", shlex.join(cmd), flush=True)
    code, stop = run_stage(cmd, cwd=REPO)
    if stop:
        sys.exit(stopped_message("quality.py", stop, what, code))
    if code != 0:
        sys.exit(f"quality.py: {what} failed (command above)")


def experiment_config(args: argparse.Namespace):
    """The experiment's composed and validated training config (`training.config.TrainConfig`), with the
    data paths under `--out`."""
    from hydra import compose, initialize_config_dir

    from training.config import load_config

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[f"+experiment={args.experiment}", *data_overrides(args)])
    return load_config(cfg)


def data_overrides(args: argparse.Namespace) -> list[str]:
    return [f"data.source={args.out / 'dataset'}", f"data.cache_dir={args.out / 'cache'}"]


def train_command(args: argparse.Namespace, name: str) -> list[str]:
    """train.py's command line for run `name` (RUNS): the experiment, then its attention, the shared data
    paths, the user's overrides, and the run dir."""
    return [
        *shlex.split(args.launcher), str(REPO / "train.py"), f"+experiment={args.experiment}", *RUNS[name][1],
        *data_overrides(args), f"wandb.mode={args.wandb_mode}", *args.overrides,
        f"hydra.run.dir={(args.out / 'runs' / name).resolve()}",
    ]  # fmt: skip


# ----------------------------------------------------------------------------- numbers from the runs


def at_equal_time(vmoba, full) -> dict[str, float] | None:
    """Validation loss of both runs at the same wall-clock time: the end of the run that finished first
    (its last evaluation), the other run's validation curve interpolated there."""
    (va_t, va_l), (fu_t, fu_l) = (
        vmoba.series("val_loss", "evals", x="time"),
        full.series("val_loss", "evals", x="time"),
    )
    if not va_t or not fu_t:
        return None
    t = min(va_t[-1], fu_t[-1])
    return {"time": t, "vmoba": float(np.interp(t, va_t, va_l)), "full": float(np.interp(t, fu_t, fu_l))}


def comparison(vmoba_dir: Path, full_dir: Path, label: str, report_dir: Path, wandb_mode: str) -> dict:
    """Writes the report of one VMoBA run against the baseline; returns its numbers for results.md."""
    from evaluation.report import layer_profile, load_run, run_numbers, write_report

    write_report(vmoba_dir, full_dir, report_dir, wandb_mode=wandb_mode, labels=(label, "full"))
    vmoba, full = load_run(vmoba_dir, label), load_run(full_dir, "full")
    fidelity = json.loads((report_dir / "report.json").read_text())["fidelity"]
    return {
        "label": label,
        "report": str(report_dir / "report.md"),
        "vmoba": run_numbers(vmoba),
        "full": run_numbers(full),
        "equal_time": at_equal_time(vmoba, full),
        "recall": layer_profile(vmoba, "recall"),
        "density": layer_profile(vmoba, "density"),
        "fidelity": fidelity,
    }


def last_samples(run_dir: Path) -> Path | None:
    """The sample folder of the run's last sampled step (`samples/step_XXXXXX`)."""
    steps = sorted(d for d in (run_dir / "samples").glob("step_*") if any(d.glob("prompt_*.mp4")))
    return steps[-1] if steps else None


def sample_strip(rows: dict[str, Path], out: Path, columns: int = 6) -> Path | None:
    """One PNG: a row per run (`label -> mp4`) of `columns` frames evenly spaced over the clip."""
    from PIL import Image, ImageDraw

    from data.video_io import read_video

    videos = {label: read_video(path) for label, path in rows.items() if path is not None and path.is_file()}
    if not videos:
        return None
    strips = []
    for label, video in videos.items():
        index = np.linspace(0, len(video) - 1, columns).round().astype(int)
        row = Image.fromarray(np.concatenate([video[i] for i in index], axis=1))
        ImageDraw.Draw(row).text((4, 4), label, fill=(255, 255, 255))
        strips.append(np.asarray(row))
    Image.fromarray(np.concatenate(strips, axis=0)).save(out)
    return out


# ----------------------------------------------------------------------------- training-free sweep


def timed_samples(run_dir: Path, attention, repeats: int):
    """Samples the run's `sample` prompts (its seed: the same noise every time) from its latest checkpoint
    with `attention` (a `models.config.AttentionConfig`): `(videos [N, 3, F, H, W] in [-1, 1], seconds)`,
    the seconds of the fastest of `repeats` passes over the denoising loop and the decode (the first pass
    includes any kernel compilation; the models are built once, outside the timing)."""
    import torch
    from omegaconf import OmegaConf

    from training.checkpoint import resolve_transformer_dir
    from training.config import load_config
    from training.objective import FlowMatching
    from training.sampling import PromptSampler
    from training.stack import build_stack

    cfg = load_config(OmegaConf.load(run_dir / "config.yaml"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    stack = build_stack(
        cfg.model, attention, cfg.objective, device, precision=cfg.train.precision,
        weights=resolve_transformer_dir(run_dir), keep_fp32_modules=True,
    )  # fmt: skip
    sampler = PromptSampler(
        cfg.sample, FlowMatching(cfg.objective), stack.text_encoder, stack.vae, device,
        transformer=stack.transformer,
    )  # fmt: skip
    best, videos = float("inf"), None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        videos = sampler.generate(stack.model_fn(), stack.controller)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return videos, best


def training_free_sweep(
    full_dir: Path, vmoba_dir: Path, dense_steps, granularities, repeats: int
) -> list[dict]:
    """The full-attention checkpoint sampled with VMoBA (the VMoBA run's attention settings, each
    granularity, dense for the first N denoising steps) against its own full-attention samples."""
    from omegaconf import OmegaConf

    from evaluation.metrics import psnr, ssim
    from training.config import load_config

    full_cfg = load_config(OmegaConf.load(full_dir / "config.yaml"))
    vmoba_attention = load_config(OmegaConf.load(vmoba_dir / "config.yaml")).attention
    reference, ref_time = timed_samples(full_dir, full_cfg.attention, repeats)
    rows = [{"attention": "full", "dense_first_steps": None, "psnr": None, "ssim": 1.0, "seconds": ref_time}]
    for granularity in granularities:
        for n in dense_steps:
            attention = dataclasses.replace(vmoba_attention, granularity=granularity, dense_first_steps=n)
            videos, seconds = timed_samples(full_dir, attention, repeats)
            value = float(psnr(videos, reference).mean())
            rows.append({
                "attention": f"VMoBA {granularity}", "dense_first_steps": n,
                "psnr": value if np.isfinite(value) else None,  # identical samples: inf, written as "inf"
                "ssim": float(ssim(videos, reference).mean()), "seconds": seconds,
            })  # fmt: skip
            print(f"sweep: {rows[-1]}", flush=True)
    return rows


# ----------------------------------------------------------------------------- results.md


def _f(value, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def results_markdown(
    args, cfg, comparisons: list[dict], sweep: list[dict], strip: Path | None, device: str
) -> str:
    grid = f"{cfg.data.frames}x{cfg.data.height}x{cfg.data.width}"
    lines = [
        f"### Quality experiment: {cfg.model.transformer.arch} from scratch, {grid} clips ({device}, "
        f"{time.strftime('%Y-%m-%d')})",
        "",
        "```",
        f"python scripts/quality.py {' '.join(sys.argv[1:])}".rstrip(),
        "```",
        "",
        f"{cfg.train.steps} steps of {cfg.train.batch_size} clips, seed {cfg.seed}, the same data and seeds "
        "for every run. Equal steps: the last evaluation of each run. Equal wall-clock: both validation "
        "curves interpolated at the end of the run that finished first.",
        "",
        "| VMoBA run | val loss VMoBA / full (equal steps) | at equal time (s): VMoBA / full | step time VMoBA / "
        "full, s | mean density | mean recall | sample PSNR dB / SSIM vs full |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c in comparisons:
        a, b, t, fid = c["vmoba"], c["full"], c["equal_time"], c["fidelity"] or {}
        ratio = a["val_loss"] / b["val_loss"] if a["val_loss"] and b["val_loss"] else None
        at_t = f"{_f(t['vmoba'])} / {_f(t['full'])} ({t['time']:.0f} s)" if t else "-"
        lines.append(
            f"| {c['label']} | {_f(a['val_loss'])} / {_f(b['val_loss'])} = {_f(ratio, 3)} | {at_t} | "
            f"{_f(a['step_time'])} / {_f(b['step_time'])} | {_f(a['mean_density'], 3)} | "
            f"{_f(a['mean_recall'], 3)} | {_f(fid.get('psnr'))} / {_f(fid.get('ssim'))} |"
        )
    layers = sorted(
        {layer for c in comparisons for layer in c["recall"]}
        | {layer for c in comparisons for layer in c["density"]}
    )
    cycle = cfg.attention.partitions
    lines += [
        "",
        "Attention recall (last evaluation) and density (mean over training) per layer:",
        "",
        "| layer | " + " | ".join(f"{c['label']} recall / density" for c in comparisons) + " |",
        "| --- |" + " --- |" * len(comparisons),
    ]
    for layer in layers:
        cells = [f"{_f(c['recall'].get(layer), 3)} / {_f(c['density'].get(layer), 3)}" for c in comparisons]
        lines.append(f"| {layer} ({cycle[layer % len(cycle)]}) | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Training-free: the full-attention checkpoint sampled ({cfg.sample.steps} steps, "
        f"{len(cfg.sample.prompts)} prompts) with VMoBA, dense for the first N steps, against its own "
        "full-attention samples (same noise); seconds: the fastest of "
        f"{args.repeats} passes (denoising + decode).",
        "",
        "| attention | dense first steps | PSNR dB | SSIM | sampling s |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in sweep:
        psnr_cell = "inf" if r["psnr"] is None and r["dense_first_steps"] is not None else _f(r["psnr"])
        n = "-" if r["dense_first_steps"] is None else r["dense_first_steps"]
        lines.append(f"| {r['attention']} | {n} | {psnr_cell} | {_f(r['ssim'])} | {_f(r['seconds'])} |")
    lines += ["", "Reports: " + ", ".join(f"`{c['report']}`" for c in comparisons) + "."]
    if strip is not None:
        lines += ["", f"![sample frames, one row per run]({strip.name})"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from scripts.make_quality_dataset import make_quality_dataset

    cfg = experiment_config(args)
    print(
        f"==> dataset ({args.clips} clips of {cfg.data.frames}x{cfg.data.height}x{cfg.data.width})",
        flush=True,
    )
    if cfg.data.height != cfg.data.width:
        sys.exit("quality.py: the generator makes square clips; data.height must equal data.width")
    make_quality_dataset(
        Path(cfg.data.source), args.clips, cfg.data.frames, cfg.data.height, 16.0, cfg.data.seed
    )
    print("==> latent + text cache", flush=True)
    _run(
        [
            sys.executable,
            str(REPO / "scripts" / "cache_latents.py"),
            f"+experiment={args.experiment}",
            *data_overrides(args),
        ],
        "caching",
    )
    runs = {name: args.out / "runs" / name for name in RUNS}
    for name in RUNS:
        print(f"==> train {RUNS[name][0]}", flush=True)
        _run(train_command(args, name), f"the {name} run")
    comparisons = [
        comparison(
            runs[name],
            runs["full"],
            RUNS[name][0],
            args.out / f"report_{name.split('_')[1]}",
            args.wandb_mode,
        )
        for name in ("vmoba_token", "vmoba_block")
    ]
    print("==> training-free sweep", flush=True)
    sweep = training_free_sweep(
        runs["full"], runs["vmoba_token"], args.dense_steps, args.sweep_granularities, args.repeats
    )
    sample_dirs = {RUNS[name][0]: last_samples(runs[name]) for name in RUNS}
    strip = sample_strip(
        {label: d / "prompt_00.mp4" for label, d in sample_dirs.items() if d}, args.out / "samples.png"
    )
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    (args.out / "results.md").write_text(results_markdown(args, cfg, comparisons, sweep, strip, device))
    (args.out / "results.json").write_text(json.dumps({"comparisons": comparisons, "sweep": sweep}, indent=2))
    print(f"results: {args.out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
