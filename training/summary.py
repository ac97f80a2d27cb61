"""A run's final metrics (`summary.json`) and a sweep's table of them (`summary.csv`, `summary.md`)."""

import csv
import json
import statistics
from pathlib import Path

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


def _records(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln] if path.exists() else []


def write_summary(run_dir: str | Path, name: str = "", tail: int = 10) -> dict:
    """Summarise `<run_dir>/metrics.jsonl` and `eval.jsonl` into `<run_dir>/summary.json` and return it.

    final_loss: mean training loss over the last `tail` records; val_loss, recall/mean, density/mean: the
    last evaluation; tokens_per_s, step_time: medians over all records but the first (warm-up); mem_gb: max.
    """
    run_dir = Path(run_dir)
    metrics, evals = _records(run_dir / "metrics.jsonl"), _records(run_dir / "eval.jsonl")
    summary: dict = {"name": name, "steps": metrics[-1]["step"] if metrics else 0}
    if metrics:
        losses = [m["loss"] for m in metrics[-tail:] if m.get("loss") is not None]
        steady = metrics[1:] or metrics
        summary |= {
            "final_loss": statistics.fmean(losses) if losses else None,
            "tokens_per_s": statistics.median(m["tokens_per_s"] for m in steady),
            "step_time": statistics.median(m["step_time"] for m in steady),
            "mem_gb": max(m.get("mem_gb") or 0.0 for m in metrics),
            "time": metrics[-1]["time"],
        }
    if evals:
        summary |= {k: v for k, v in evals[-1].items() if k in ("val_loss", "recall/mean", "density/mean")}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def write_sweep_table(sweep_dir: str | Path) -> list[dict]:
    """Tabulate `*/summary.json` under `sweep_dir` into `summary.csv` and `summary.md`; returns the rows."""
    sweep_dir = Path(sweep_dir)
    rows = []
    for path in sorted(sweep_dir.glob("*/summary.json")):
        summary = json.loads(path.read_text())
        rows.append({"run": path.parent.name, **{k: summary.get(k) for k in SUMMARY_KEYS}})
    columns = ["run", *SUMMARY_KEYS]
    with open(sweep_dir / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)

    def cell(v) -> str:
        return "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row[c]) for c in columns) + " |" for row in rows]
    (sweep_dir / "summary.md").write_text("\n".join(lines) + "\n")
    return rows
