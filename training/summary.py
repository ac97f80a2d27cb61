"""A run's final metrics (`summary.json`) and a sweep's table of them (`summary.csv`, `summary.md`).

Also the definitions the comparison report shares (`evaluation.report`): how a run dir's JSON lines are
read, and the final loss and steady-state medians."""

import csv
import json
import os
import statistics
import traceback
from collections.abc import Sequence
from pathlib import Path

import yaml

# Columns of the sweep table, in order; a run missing one shows an empty cell.
SUMMARY_KEYS = (
    "final_loss",
    "val_loss",
    "recall/mean",
    "density/mean",
    "tokens_per_s",
    "step_time",
    "mem_gb",
    "time",
)
# What `mem_gb` (training.logger.memory_gb) measures, by the device type train.py ran on.
MEMORY_MEANING = {
    "cuda": "GPU peak allocated by PyTorch since the previous log (the interval's training, evaluation "
    "and sampling)",
    "cpu": "process peak resident memory (RSS) since the start (model building, data, evaluation and "
    "sampling included; never falls)",
}
ERROR_FILE = "error.json"  # written into a failed sweep job's dir by training.sweep.SweepSummary


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a JSON-lines file (`metrics.jsonl`, `eval.jsonl`); [] when it does not exist. A
    line that is not JSON fails naming the file and line."""
    path = Path(path)
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


def logged(records: Sequence[dict], key: str) -> list[float]:
    """The values of `key` in the records that logged it (non-finite values are logged as null)."""
    return [float(r[key]) for r in records if r.get(key) is not None]


def tail_mean(values: Sequence[float], tail: int = 10) -> float | None:
    """Mean of the last `tail` values: a final loss less noisy than one step's."""
    return statistics.fmean(values[-tail:]) if values else None


def steady_median(values: Sequence[float]) -> float | None:
    """Median of all values but the first (the warm-up step: allocation, compilation)."""
    return statistics.median(values[1:] or values) if values else None


def write_summary(run_dir: str | Path, name: str = "", tail: int = 10, device: str | None = None) -> dict:
    """Summarise `<run_dir>/metrics.jsonl` and `eval.jsonl` into `<run_dir>/summary.json` and return it.

    final_loss: mean of the last `tail` logged training losses; val_loss, recall/mean, density/mean: the
    last evaluation; tokens_per_s, step_time: medians over all records but the first (warm-up); mem_gb:
    max. `device` (the type train.py ran on) is recorded as `device`, so readers know what mem_gb measures
    (`MEMORY_MEANING`).
    """
    run_dir = Path(run_dir)
    metrics, evals = read_jsonl(run_dir / "metrics.jsonl"), read_jsonl(run_dir / "eval.jsonl")
    summary: dict = {"name": name, "steps": metrics[-1]["step"] if metrics else 0}
    if device is not None:
        summary["device"] = device
    if metrics:
        summary |= {
            "final_loss": tail_mean(logged(metrics, "loss"), tail),
            "tokens_per_s": steady_median(logged(metrics, "tokens_per_s")),
            "step_time": steady_median(logged(metrics, "step_time")),
            "mem_gb": max(logged(metrics, "mem_gb"), default=0.0),
            "time": metrics[-1]["time"],
        }
    if evals:
        summary |= {k: v for k, v in evals[-1].items() if k in ("val_loss", "recall/mean", "density/mean")}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


# ----------------------------------------------------------------------------- sweeps


def write_job_error(job_dir: str | Path, error: BaseException) -> None:
    """Record why a sweep job failed: `<job_dir>/error.json` with its error line and traceback."""
    message = str(error).strip().splitlines()
    line = f"{type(error).__name__}: {message[0]}" if message else type(error).__name__
    record = {"error": line, "traceback": "".join(traceback.format_exception(error))}
    Path(job_dir).mkdir(parents=True, exist_ok=True)
    (Path(job_dir) / ERROR_FILE).write_text(json.dumps(record, indent=2) + "\n")


def _job_overrides(job_dir: Path) -> dict[str, str]:
    """`{key: value}` of the job's command-line overrides (Hydra's `.hydra/overrides.yaml`)."""
    path = job_dir / ".hydra" / "overrides.yaml"
    lines = (yaml.safe_load(path.read_text()) or []) if path.is_file() else []
    return {line.split("=", 1)[0].lstrip("+~"): line.split("=", 1)[1] for line in lines if "=" in line}


def _swept_keys(sweep_dir: Path, jobs: dict[str, dict[str, str]]) -> list[str]:
    """The swept parameters: the sweep overrides of `multirun.yaml` (`a=1,2`, `range(...)`, ...) and any
    key whose value differs between the jobs, in the order the jobs' overrides name them."""
    swept = set()
    multirun = sweep_dir / "multirun.yaml"
    if multirun.is_file():
        from hydra.core.override_parser.overrides_parser import OverridesParser

        task = (yaml.safe_load(multirun.read_text()) or {}).get("hydra", {}).get("overrides", {}).get("task")
        swept |= {
            o.key_or_group
            for o in OverridesParser.create().parse_overrides(task or [])
            if o.is_sweep_override()
        }
    keys = list(dict.fromkeys(k for overrides in jobs.values() for k in overrides))
    differ = {k for k in keys if len({overrides.get(k) for overrides in jobs.values()}) > 1}
    return [k for k in keys if k in swept | differ]


def write_sweep_table(sweep_dir: str | Path) -> list[dict]:
    """Tabulate the jobs under `sweep_dir` into `summary.csv` and `summary.md`; returns the rows of the
    jobs that finished (those with a `summary.json`).

    Each swept parameter gets its own column. Jobs that failed (an `error.json`) are listed with their
    error line, and job dirs with neither file as unfinished; the CSV has every job with its `status`."""
    sweep_dir = Path(sweep_dir)
    job_dirs = sorted(
        d
        for d in sweep_dir.iterdir()
        if d.is_dir() and any((d / f).exists() for f in ("summary.json", ERROR_FILE, ".hydra"))
    )
    overrides = {d.name: _job_overrides(d) for d in job_dirs}
    params = _swept_keys(sweep_dir, overrides)
    rows, failed, unfinished = [], {}, []
    for d in job_dirs:
        row = {"run": d.name, **{k: overrides[d.name].get(k) for k in params}}
        if (d / ERROR_FILE).is_file():  # a failed re-run of a job that once finished is failed
            failed[d.name] = row | {
                "status": "failed",
                "error": json.loads((d / ERROR_FILE).read_text())["error"],
            }
        elif (d / "summary.json").is_file():
            summary = json.loads((d / "summary.json").read_text())
            rows.append(row | {"status": "finished", **{k: summary.get(k) for k in SUMMARY_KEYS}})
        else:
            unfinished.append(row | {"status": "unfinished"})

    columns = ["run", *params, "status", *SUMMARY_KEYS, "error"]
    _atomic_write(sweep_dir / "summary.csv", _csv([*rows, *failed.values(), *unfinished], columns))

    def cell(v) -> str:
        return "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)

    shown = ["run", *params, *SUMMARY_KEYS]
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(cell(row[c]) for c in shown) + " |" for row in rows]
    if failed:
        lines += ["", f"## Failed jobs ({len(failed)})", ""]
        lines += [f"- `{name}`: {row['error']}" for name, row in failed.items()]
    if unfinished:
        lines += ["", f"## Unfinished jobs ({len(unfinished)}: no summary.json, no error.json)", ""]
        lines += [f"- `{row['run']}`" for row in unfinished]
    _atomic_write(sweep_dir / "summary.md", "\n".join(lines) + "\n")
    return rows


def _csv(rows: list[dict], columns: list[str]) -> str:
    import io

    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def _atomic_write(path: Path, text: str) -> None:
    """Parallel sweep jobs (e.g. Hydra's joblib launcher) rewrite the table as each ends: never half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
