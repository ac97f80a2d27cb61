"""The VMoBA vs full-attention comparison report: markdown, PNG plots and a wandb run, from two run dirs.

Reads the run-directory format written by `train.py` (docs/architecture.md): `config.yaml`,
`metrics.jsonl`, `eval.jsonl`, `samples/step_XXXXXX/prompt_XX.mp4`. Used by `scripts/compare.py`.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from training.metrics import FeatureNetworks, fidelity

log = logging.getLogger(__name__)

PLOTS = ("loss_vs_step", "loss_vs_time", "step_time", "memory", "attention_per_layer")


@dataclass
class Run:
    """One run directory, parsed. `metrics`/`evals` are the JSON lines of metrics.jsonl / eval.jsonl."""

    path: Path
    label: str
    config: dict[str, Any] = field(default_factory=dict)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)

    def series(self, key: str, source: str = "metrics", x: str = "step") -> tuple[list[float], list[float]]:
        """`(x values, key values)` of the records (of `metrics` or `evals`) that have both."""
        records = [r for r in getattr(self, source) if r.get(key) is not None and r.get(x) is not None]
        return [float(r[x]) for r in records], [float(r[key]) for r in records]


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: not a JSON line ({err})") from err
    return records


def load_run(path: str | Path, label: str) -> Run:
    """Parses a run dir; fails naming the dir when it has no `metrics.jsonl` (not a train.py run dir)."""
    path = Path(path)
    if not (path / "metrics.jsonl").is_file():
        raise FileNotFoundError(
            f"{label} run {path}: no metrics.jsonl; expected a run dir written by train.py "
            "(config.yaml, metrics.jsonl, eval.jsonl, samples/)"
        )
    config = yaml.safe_load((path / "config.yaml").read_text()) if (path / "config.yaml").is_file() else {}
    return Run(
        path, label, config or {}, _read_jsonl(path / "metrics.jsonl"), _read_jsonl(path / "eval.jsonl")
    )


# ----------------------------------------------------------------------------- numbers


def _tail_mean(values: list[float], tail: int = 10) -> float | None:
    """Mean of the last `tail` values: a final loss less noisy than one step (as in summary.json)."""
    return sum(values[-tail:]) / len(values[-tail:]) if values else None


def _steady_median(values: list[float]) -> float | None:
    """Median of all but the first value (the warm-up step: allocation, compilation), as in summary.json."""
    return statistics.median(values[1:] or values) if values else None


def _layer_values(record: dict[str, Any], kind: str) -> dict[int, float]:
    prefix = f"{kind}/layer_"
    return {
        int(k[len(prefix) :]): float(v) for k, v in record.items() if k.startswith(prefix) and v is not None
    }


def layer_profile(run: Run, kind: str) -> dict[int, float]:
    """Per-layer `density` (mean over all logged training steps) or `recall` (the last evaluation)."""
    if kind == "recall":
        with_recall = [r for r in run.evals if _layer_values(r, "recall")]
        return _layer_values(with_recall[-1], "recall") if with_recall else {}
    per_layer: dict[int, list[float]] = {}
    for record in run.metrics:
        for layer, value in _layer_values(record, kind).items():
            per_layer.setdefault(layer, []).append(value)
    return {layer: sum(v) / len(v) for layer, v in sorted(per_layer.items())}


def run_numbers(run: Run) -> dict[str, float | None]:
    """The per-run numbers of the table (None where the run did not log them)."""
    _, losses = run.series("loss")
    _, step_times = run.series("step_time")
    _, mems = run.series("mem_gb")
    _, tokens = run.series("tokens_per_s")
    _, times = run.series("time")
    _, val = run.series("val_loss", "evals")
    density, recall = layer_profile(run, "density"), layer_profile(run, "recall")
    return {
        "final_loss": _tail_mean(losses),
        "val_loss": val[-1] if val else None,
        "step_time": _steady_median(step_times),
        "tokens_per_s": _steady_median(tokens),
        "peak_mem_gb": max(mems) if mems else None,
        "wall_time": times[-1] if times else None,
        "mean_density": sum(density.values()) / len(density) if density else None,
        "mean_recall": sum(recall.values()) / len(recall) if recall else None,
    }


# ----------------------------------------------------------------------------- samples


def _sample_steps(run: Run) -> dict[int, Path]:
    root = run.path / "samples"
    steps = {}
    for d in root.glob("step_*") if root.is_dir() else []:
        if d.is_dir() and d.name[5:].isdigit() and any(d.glob("prompt_*.mp4")):
            steps[int(d.name[5:])] = d
    return steps


def _load_videos(paths: list[Path]) -> torch.Tensor:
    """mp4 files -> `[N, 3, F, H, W]` float in [-1, 1]."""
    from data.video_io import read_video

    videos = [torch.from_numpy(read_video(p)).permute(3, 0, 1, 2) for p in paths]  # [3, F, H, W] uint8
    shapes = {tuple(v.shape) for v in videos}
    if len(shapes) != 1:
        raise ValueError(f"samples {[str(p) for p in paths]}: videos differ in shape {sorted(shapes)}")
    return torch.stack(videos).float() / 127.5 - 1


def sample_fidelity(
    vmoba: Run, baseline: Run, networks: FeatureNetworks | None = None
) -> dict[str, Any] | None:
    """PSNR/SSIM (+ feature metrics) between the two runs' samples of the latest step both have.

    Sample `prompt_XX.mp4` of both runs came from the same prompt and noise (same config seed), so the
    numbers say how far VMoBA's generations drift from the baseline's. None when no common step exists.
    """
    steps_a, steps_b = _sample_steps(vmoba), _sample_steps(baseline)
    common = sorted(set(steps_a) & set(steps_b))
    if not common:
        log.info("report: no sample step common to both runs; PSNR/SSIM skipped")
        return None
    step = common[-1]
    names = sorted(
        {p.name for p in steps_a[step].glob("prompt_*.mp4")}
        & {p.name for p in steps_b[step].glob("prompt_*.mp4")}
    )
    if not names:
        log.info("report: samples at step %d share no prompt file; PSNR/SSIM skipped", step)
        return None
    a = _load_videos([steps_a[step] / n for n in names])
    b = _load_videos([steps_b[step] / n for n in names])
    if a.shape != b.shape:
        raise ValueError(
            f"samples at step {step}: VMoBA videos {tuple(a.shape)} vs baseline {tuple(b.shape)}"
        )
    # prompt_XX.mp4 is sample.prompts[XX] of the run's config (for the CLIP score).
    prompts = (vmoba.config.get("sample") or {}).get("prompts") or []
    index = [int(n[len("prompt_") : -len(".mp4")]) for n in names]
    prompt_list = [prompts[i] for i in index] if all(i < len(prompts) for i in index) else None
    return {"step": step, "videos": len(names), **fidelity(a, b, prompt_list, networks)}


# ----------------------------------------------------------------------------- table


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}g}"


def metric_table(vmoba: Run, baseline: Run, fid: dict[str, Any] | None) -> list[list[str]]:
    """Rows `[metric, VMoBA, full, VMoBA / full]` of the comparison table (strings; '-' = not logged)."""
    a, b = run_numbers(vmoba), run_numbers(baseline)

    def ratio(key: str) -> str:
        return _fmt(a[key] / b[key], 3) if a[key] is not None and b[key] else "-"

    rows = [
        [
            "final train loss (mean of last 10 logs)",
            _fmt(a["final_loss"]),
            _fmt(b["final_loss"]),
            ratio("final_loss"),
        ],
        ["validation loss (last eval)", _fmt(a["val_loss"]), _fmt(b["val_loss"]), ratio("val_loss")],
        [
            "step time, s (median, first step excluded)",
            _fmt(a["step_time"]),
            _fmt(b["step_time"]),
            ratio("step_time"),
        ],
        [
            "tokens/s (median, first step excluded)",
            _fmt(a["tokens_per_s"]),
            _fmt(b["tokens_per_s"]),
            ratio("tokens_per_s"),
        ],
        ["peak memory, GB", _fmt(a["peak_mem_gb"]), _fmt(b["peak_mem_gb"]), ratio("peak_mem_gb")],
        ["wall-clock time, s", _fmt(a["wall_time"]), _fmt(b["wall_time"]), ratio("wall_time")],
        ["mean attention density (training steps)", _fmt(a["mean_density"]), _fmt(b["mean_density"]), ""],
        ["mean attention recall (last eval)", _fmt(a["mean_recall"]), _fmt(b["mean_recall"]), ""],
    ]
    speedup = b["step_time"] / a["step_time"] if a["step_time"] and b["step_time"] else None
    rows.insert(3, ["speedup (full step time / VMoBA step time)", _fmt(speedup, 3), "1", ""])
    if fid is not None:
        n = fid["videos"]
        where = f"samples at step {fid['step']}, {n} prompt{'s' if n != 1 else ''}"
        rows.append([f"PSNR VMoBA vs full, dB ({where})", _fmt(fid["psnr"]), "", ""])
        rows.append([f"SSIM VMoBA vs full ({where})", _fmt(fid["ssim"]), "", ""])
        for key, name in (("lpips", "LPIPS VMoBA vs full"), ("fvd", "FVD VMoBA vs full")):
            if key in fid:
                rows.append([name, _fmt(fid[key]), "", ""])
        if "clip_score_a" in fid:
            rows.append(["CLIP score", _fmt(fid["clip_score_a"]), _fmt(fid["clip_score_b"]), ""])
    return rows


# ----------------------------------------------------------------------------- plots


def _smooth(values: list[float], alpha: float = 0.1) -> list[float]:
    """Exponential moving average (debiased), to read a trend through per-step noise."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = (1 - alpha) * avg + alpha * v
        out.append(avg / (1 - (1 - alpha) ** i))
    return out


def make_plots(vmoba: Run, baseline: Run, out_dir: Path) -> dict[str, Path]:
    """Writes the PNG plots (names in `PLOTS`) into `out_dir`; returns name -> path."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on training machines
    import matplotlib.pyplot as plt

    runs = ((vmoba, "tab:blue"), (baseline, "tab:orange"))
    paths = {}

    def save(fig, name):
        paths[name] = out_dir / f"{name}.png"
        fig.tight_layout()
        fig.savefig(paths[name], dpi=110)
        plt.close(fig)

    for name, x, xlabel in (
        ("loss_vs_step", "step", "step"),
        ("loss_vs_time", "time", "wall-clock time (s)"),
    ):
        fig, ax = plt.subplots(figsize=(7, 4))
        for run, color in runs:
            xs, ys = run.series("loss", x=x)
            if xs:
                ax.plot(xs, ys, color=color, alpha=0.25, lw=0.8)
                ax.plot(xs, _smooth(ys), color=color, label=f"{run.label} train (EMA)")
            vx, vy = run.series("val_loss", "evals", x=x)
            if vx:
                ax.plot(vx, vy, "o--", color=color, label=f"{run.label} validation")
        ax.set(xlabel=xlabel, ylabel="flow-matching loss", title=f"Loss vs {xlabel}")
        if ax.has_data():
            ax.legend()
        save(fig, name)

    for name, key, ylabel in (
        ("step_time", "step_time", "step time (s)"),
        ("memory", "mem_gb", "memory (GB)"),
    ):
        fig, ax = plt.subplots(figsize=(7, 4))
        for run, color in runs:
            xs, ys = run.series(key)
            if xs:
                ax.plot(xs, ys, color=color, label=run.label)
        ax.set(xlabel="step", ylabel=ylabel, title=ylabel[0].upper() + ylabel[1:])
        if ax.has_data():
            ax.legend()
        save(fig, name)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    cycle = (vmoba.config.get("attention") or {}).get("partitions") or []
    for ax, kind in zip(axes, ("density", "recall")):
        width, layers = 0.4, set()
        for i, (run, color) in enumerate(runs):
            profile = layer_profile(run, kind)
            layers |= set(profile)
            xs = [layer + (i - 0.5) * width for layer in profile]
            ax.bar(xs, list(profile.values()), width, color=color, label=run.label)
        # Tick each layer with its partition type (layer i uses partitions[i % len]).
        ticks = sorted(layers)
        ax.set_xticks(ticks, [f"{t}\n{cycle[t % len(cycle)]}" if cycle else str(t) for t in ticks])
        source = "mean over training steps" if kind == "density" else "last evaluation"
        ax.set(xlabel="layer", ylabel=kind, ylim=(0, 1.25), title=f"Attention {kind} per layer ({source})")
        if ax.has_data():
            ax.legend(loc="upper center", ncol=2)
    save(fig, "attention_per_layer")
    return paths


# ----------------------------------------------------------------------------- report


def _markdown(vmoba: Run, baseline: Run, rows: list[list[str]], plots: dict[str, Path], fid) -> str:
    header = ["metric", vmoba.label, baseline.label, f"{vmoba.label} / {baseline.label}"]
    lines = [
        f"# {vmoba.label} vs {baseline.label}",
        "",
        f"- {vmoba.label} run: `{vmoba.path}`",
        f"- {baseline.label} run: `{baseline.path}`",
        "",
        "| " + " | ".join(header) + " |",
        "| " + " | ".join(["---"] * len(header)) + " |",
        *("| " + " | ".join(r) + " |" for r in rows),
        "",
    ]
    if fid is None:
        lines += ["No sample step is common to both runs, so PSNR/SSIM are not reported.", ""]
    titles = {
        "loss_vs_step": "Loss vs step",
        "loss_vs_time": "Loss vs wall-clock time",
        "step_time": "Step time",
        "memory": "Memory",
        "attention_per_layer": "Attention density and recall per layer",
    }
    for name, path in plots.items():
        lines += [f"## {titles[name]}", "", f"![{titles[name]}]({path.name})", ""]
    return "\n".join(lines)


def log_to_wandb(
    out_dir: Path, rows, header, plots: dict[str, Path], fid, mode: str, project: str, name: str
) -> None:
    """Logs the table, the plots and the fidelity numbers as one wandb run under `out_dir/wandb`."""
    import wandb

    run = wandb.init(
        project=project, name=name, dir=str(out_dir), mode=mode, job_type="compare", reinit="create_new"
    )
    try:
        payload = {f"report/{k}": wandb.Image(str(p)) for k, p in plots.items()}
        payload["report/table"] = wandb.Table(columns=header, data=rows)
        if fid is not None:
            payload.update({f"fidelity/{k}": v for k, v in fid.items() if isinstance(v, (int, float))})
        run.log(payload)
    finally:
        run.finish()


def _finite(value: Any) -> Any:
    """`value` with every non-finite float (nested in dicts) replaced by None."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return None if isinstance(value, float) and not math.isfinite(value) else value


def write_report(
    vmoba_dir: str | Path,
    baseline_dir: str | Path,
    out_dir: str | Path,
    *,
    networks: FeatureNetworks | None = None,
    wandb_mode: str = "offline",
    wandb_project: str = "vmoba",
    labels: tuple[str, str] = ("VMoBA", "full"),
) -> Path:
    """Writes `report.md`, the PNG plots and `report.json` into `out_dir` (and a wandb run unless
    `wandb_mode="disabled"`). Returns the path of `report.md`."""
    if wandb_mode not in ("offline", "online", "disabled"):
        raise ValueError(f"wandb_mode: got {wandb_mode!r}, allowed: offline, online, disabled")
    vmoba, baseline = load_run(vmoba_dir, labels[0]), load_run(baseline_dir, labels[1])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fid = sample_fidelity(vmoba, baseline, networks)
    rows = metric_table(vmoba, baseline, fid)
    plots = make_plots(vmoba, baseline, out_dir)
    report = out_dir / "report.md"
    report.write_text(_markdown(vmoba, baseline, rows, plots, fid))
    numbers = {labels[0]: run_numbers(vmoba), labels[1]: run_numbers(baseline), "fidelity": fid}
    # Strict JSON: identical samples give PSNR inf, written as null (as train.py's logs do).
    (out_dir / "report.json").write_text(json.dumps(_finite(numbers), indent=2, allow_nan=False))
    if wandb_mode != "disabled":
        header = ["metric", *labels, f"{labels[0]} / {labels[1]}"]
        name = f"compare-{vmoba.path.name}-vs-{baseline.path.name}"
        log_to_wandb(out_dir, rows, header, plots, fid, wandb_mode, wandb_project, name)
    return report
