"""The VMoBA vs full-attention comparison report: markdown, PNG plots and a wandb run, from two run dirs.

Reads the run-directory format written by `train.py` (docs/architecture.md): `config.yaml`,
`metrics.jsonl`, `eval.jsonl`, `summary.json`, `samples/step_XXXXXX/prompt_XX.mp4`. Used by
`scripts/compare.py`. The final loss and median definitions are `summary.json`'s (training.summary).
"""

from __future__ import annotations

import json
import logging
import math
import os
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from evaluation.metrics import FeatureNetworks, fidelity
from training.summary import MEMORY_MEANING, logged, read_jsonl, steady_median, tail_mean

log = logging.getLogger(__name__)

PLOTS = ("loss_vs_step", "loss_vs_time", "step_time", "memory", "attention_per_layer")


@dataclass
class Run:
    """One run directory, parsed. `metrics`/`evals` are the JSON lines of metrics.jsonl / eval.jsonl;
    `device` the device type summary.json records (None for a run that has not finished)."""

    path: Path
    label: str
    config: dict[str, Any] = field(default_factory=dict)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    device: str | None = None
    name: str | None = None  # the run's wandb name, as summary.json records it

    def series(self, key: str, source: str = "metrics", x: str = "step") -> tuple[list[float], list[float]]:
        """`(x values, key values)` of the records (of `metrics` or `evals`) that have both."""
        records = [r for r in getattr(self, source) if r.get(key) is not None and r.get(x) is not None]
        return [float(r[x]) for r in records], [float(r[key]) for r in records]


def load_run(path: str | Path, label: str) -> Run:
    """Parses a run dir; fails naming the dir when it has no `metrics.jsonl` (not a train.py run dir)."""
    path = Path(path)
    if not (path / "metrics.jsonl").is_file():
        raise FileNotFoundError(
            f"{label} run {path}: no metrics.jsonl; expected a run dir written by train.py "
            "(config.yaml, metrics.jsonl, eval.jsonl, samples/)"
        )
    config = yaml.safe_load((path / "config.yaml").read_text()) if (path / "config.yaml").is_file() else {}
    summary = json.loads((path / "summary.json").read_text()) if (path / "summary.json").is_file() else {}
    return Run(
        path, label, config or {}, read_jsonl(path / "metrics.jsonl"), read_jsonl(path / "eval.jsonl"),
        summary.get("device"), summary.get("name"),
    )  # fmt: skip


def wandb_identity(run: Run) -> dict[str, Any]:
    """What the report's wandb run records of one compared run: its dir, its wandb name (the dir's name if
    it has no summary.json), its wandb run id (`<run>/wandb/run_id`, kept by training.logger; None when the
    run logged with wandb disabled) and its `wandb.group`, from the config of its last segment (a resume
    may set one: `config.resume-<step>.yaml`)."""
    id_file = run.path / "wandb" / "run_id"
    segments = sorted(run.path.glob("config.resume-*.yaml"))
    config = yaml.safe_load(segments[-1].read_text()) if segments else run.config
    return {
        "run_dir": str(run.path.resolve()),
        "name": run.name or run.path.name,
        "wandb_id": id_file.read_text().strip() if id_file.is_file() else None,
        "wandb_group": (config or {}).get("wandb", {}).get("group"),
    }


def comparison_group(vmoba: Run, baseline: Run) -> str:
    """The wandb group of the report's run: the two runs' own group when they share one, else the name of
    the dir that holds both (`outputs/demo/{vmoba,full}` -> `demo`), else `compare-<vmoba>-vs-<baseline>`."""
    groups = {wandb_identity(run)["wandb_group"] for run in (vmoba, baseline)}
    if len(groups) == 1 and None not in groups:
        return groups.pop()
    parent = Path(os.path.commonpath([vmoba.path.resolve(), baseline.path.resolve()])).name
    return parent or f"compare-{vmoba.path.name}-vs-{baseline.path.name}"


# ----------------------------------------------------------------------------- numbers


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
    mems, times, val = (
        logged(run.metrics, "mem_gb"),
        logged(run.metrics, "time"),
        logged(run.evals, "val_loss"),
    )
    density, recall = layer_profile(run, "density"), layer_profile(run, "recall")
    return {
        "final_loss": tail_mean(logged(run.metrics, "loss")),
        "val_loss": val[-1] if val else None,
        "step_time": steady_median(logged(run.metrics, "step_time")),
        "tokens_per_s": steady_median(logged(run.metrics, "tokens_per_s")),
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
        [
            "peak memory, GiB (what it measures: Memory)",
            _fmt(a["peak_mem_gb"]),
            _fmt(b["peak_mem_gb"]),
            ratio("peak_mem_gb"),
        ],  # fmt: skip
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


@dataclass
class _Style:
    color: str
    ls: str
    marker: str
    lw: float
    z: int  # drawing order


def loss_ratio(
    a: tuple[list[float], list[float]], b: tuple[list[float], list[float]]
) -> tuple[list[float], list[float]]:
    """`(x, a(x) / b(x))` at the x values of curve `a` that lie within curve `b`'s x range, `b` linearly
    interpolated there (the two runs log at the same steps, but not at the same wall-clock times)."""
    (ax, ay), (bx, by) = a, b
    if not ax or not bx:
        return [], []
    keep = [i for i, x in enumerate(ax) if bx[0] <= x <= bx[-1]]
    at = np.interp([ax[i] for i in keep], bx, by)
    return [ax[i] for i in keep], [ay[i] / v for i, v in zip(keep, at)]


def memory_meaning(*runs: Run) -> str:
    """What the runs' `mem_gb` measures, from the device each recorded in summary.json."""
    devices = {run.device for run in runs}
    if len(devices) == 1 and (device := devices.pop()) in MEMORY_MEANING:
        return MEMORY_MEANING[device]
    known = ", ".join(f"{run.label} ran on {run.device}" for run in runs if run.device)
    return (
        f"on GPU, {MEMORY_MEANING['cuda']}; on CPU, {MEMORY_MEANING['cpu']} "
        f"({known or 'the runs have no summary.json to say which'})"
    )


def make_plots(vmoba: Run, baseline: Run, out_dir: Path) -> dict[str, Path]:
    """Writes the PNG plots (names in `PLOTS`) into `out_dir`; returns name -> path."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on training machines
    import matplotlib.pyplot as plt

    # VMoBA wide and solid with circles; the baseline thinner, dashed, with squares and drawn on top: where
    # the curves coincide, VMoBA's shows between the baseline's dashes, so neither hides the other.
    runs = (
        (vmoba, _Style("tab:blue", "-", "o", 2.4, 2)),
        (baseline, _Style("tab:orange", "--", "s", 1.4, 3)),
    )
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
        fig, (ax, rax) = plt.subplots(
            2, 1, figsize=(7, 5.5), sharex=True, gridspec_kw={"height_ratios": (3, 1.2)}
        )
        curves = []  # per run: (train x, smoothed train loss), (eval x, validation loss)
        for run, st in runs:
            xs, ys = run.series("loss", x=x)
            vx, vy = run.series("val_loss", "evals", x=x)
            curves.append(((xs, _smooth(ys)), (vx, vy)))
            if xs:
                ax.plot(xs, ys, color=st.color, ls=st.ls, alpha=0.25, lw=0.8, zorder=st.z)
                ax.plot(xs, curves[-1][0][1], color=st.color, ls=st.ls, lw=st.lw, zorder=st.z,
                        label=f"{run.label} train (EMA)")  # fmt: skip
            if vx:
                ax.plot(vx, vy, color=st.color, ls=":", marker=st.marker, mfc="none", ms=6, zorder=st.z + 2,
                        label=f"{run.label} validation")  # fmt: skip
        ax.set(ylabel="flow-matching loss", title=f"Loss vs {xlabel}")
        if ax.has_data():
            ax.legend()
        # The ratio panel: where the two runs overlap, VMoBA's loss over the baseline's at the same x.
        for i, (what, marker) in enumerate((("train (EMA)", ""), ("validation", "o"))):
            rx, ry = loss_ratio(curves[0][i], curves[1][i])
            if rx:
                rax.plot(rx, ry, color="tab:blue", ls="-" if i == 0 else ":", marker=marker, mfc="none",
                         label=what)  # fmt: skip
        rax.axhline(1.0, color="gray", lw=0.8)
        rax.set(xlabel=xlabel, ylabel=f"{vmoba.label} / {baseline.label}")
        if rax.has_data():
            rax.legend(fontsize="small")
        save(fig, name)

    for name, key, ylabel, title in (
        ("step_time", "step_time", "step time (s)", "Step time"),
        ("memory", "mem_gb", "mem_gb (GiB)", "Memory: " + memory_meaning(vmoba, baseline)),
    ):
        fig, ax = plt.subplots(figsize=(7, 4))
        for run, st in runs:
            xs, ys = run.series(key)
            if xs:
                ax.plot(xs, ys, color=st.color, ls=st.ls, lw=st.lw, zorder=st.z, label=run.label)
        ax.set(xlabel="step", ylabel=ylabel)
        ax.set_title("\n".join(textwrap.wrap(title, 75)), fontsize=10)
        if ax.has_data():
            ax.legend()
        save(fig, name)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    cycle = (vmoba.config.get("attention") or {}).get("partitions") or []
    for ax, kind in zip(axes, ("density", "recall")):
        width, layers = 0.4, set()
        for i, (run, st) in enumerate(runs):
            profile = layer_profile(run, kind)
            layers |= set(profile)
            xs = [layer + (i - 0.5) * width for layer in profile]
            ax.bar(xs, list(profile.values()), width, color=st.color, label=run.label)
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
    captions = {
        "loss_vs_step": f"{vmoba.label} solid, {baseline.label} dashed; the lower panel is the ratio of the two "
        "at the same step.",
        "loss_vs_time": "The lower panel is the ratio of the two losses at the same wall-clock time.",
        "memory": f"`mem_gb`: {memory_meaning(vmoba, baseline)}.",
    }
    for name, path in plots.items():
        lines += [f"## {titles[name]}", "", f"![{titles[name]}]({path.name})", ""]
        lines += [captions[name], ""] if name in captions else []
    return "\n".join(lines)


def log_to_wandb(
    out_dir: Path, rows, header, plots: dict[str, Path], fid, mode: str, project: str, name: str,
    compared: dict[str, dict[str, Any]], group: str,
) -> None:  # fmt: skip
    """Logs the table, the plots and the fidelity numbers as one wandb run under `out_dir/wandb`, in the
    compared runs' `group`, with `compared` (role -> `wandb_identity`) as its config."""
    import wandb

    run = wandb.init(
        project=project, name=name, group=group, config=compared, dir=str(out_dir), mode=mode,
        job_type="compare", reinit="create_new",
    )  # fmt: skip
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
        compared = {"vmoba": wandb_identity(vmoba), "baseline": wandb_identity(baseline)}
        group = comparison_group(vmoba, baseline)
        log_to_wandb(out_dir, rows, header, plots, fid, wandb_mode, wandb_project, name, compared, group)
    return report
