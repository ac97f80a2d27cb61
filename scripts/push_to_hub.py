"""Upload a pipeline export (a checkpoint, or a run's latest one) to the Hugging Face Hub as a diffusers repo.

    HF_TOKEN=hf_... python scripts/push_to_hub.py outputs/runs/vmoba me/wan-1.3b-vmoba --private
    python scripts/push_to_hub.py outputs/runs/vmoba/checkpoints/step_000300 me/wan-1.3b-vmoba \\
        --baseline outputs/runs/full --report outputs/compare/report.md

Uploads only the pipeline (`training.export.EXPORT_FILES`: model_index.json, README.md, scheduler/,
transformer/, vae/, text_encoder/, tokenizer/), never the optimizer state beside it, after rewriting the
model card with the run's `summary.json` (and the baseline's, and the comparison report, when given).
Creates the repo if needed (`--private` for a private one); the token comes from `--token` or `HF_TOKEN`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.checkpoint import Checkpointer  # noqa: E402
from training.export import EXPORT_FILES, write_model_card  # noqa: E402


def resolve_export(path: str | Path) -> Path:
    """The export folder for `path`: a run dir or checkpoints dir (its `latest`), or a folder with a
    `model_index.json` (a checkpoint or any diffusers pipeline folder)."""
    path = Path(path)
    for root in (path / "checkpoints", path):
        if (root / "latest").is_file():
            path = Checkpointer(root).latest()
            break
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(
            f"{path}: no model_index.json; expected a run dir, a checkpoint written with checkpoint.pipeline=true, "
            "or a diffusers pipeline folder"
        )
    return path


def upload_patterns(export: Path) -> list[str]:
    """`allow_patterns` for `upload_folder`: the pipeline's files and folders that exist in `export`."""
    return [
        f"{name}/*" if (export / name).is_dir() else name for name in EXPORT_FILES if (export / name).exists()
    ]


def push(
    path: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    baseline: Path | None = None,
    report: Path | None = None,
    api=None,
) -> dict:
    """Rewrite the model card of the export at `path` and upload it to `repo_id` through `api` (an
    `huggingface_hub.HfApi`, the default, or an object with its `create_repo` / `upload_folder`).
    Returns what was asked of the hub: repo_id, private, folder, allow_patterns."""
    from huggingface_hub import HfApi

    export = resolve_export(path)
    token = token or os.environ.get("HF_TOKEN")
    run_dir = run_dir_of(export)
    if (export / "config.yaml").is_file():  # a checkpoint: the card from its config (+ the run's summary)
        config = yaml.safe_load((export / "config.yaml").read_text())
        write_model_card(export, config, run_dir=run_dir, baseline=baseline, report=report, repo_id=repo_id)
    api = HfApi(token=token) if api is None else api
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model", token=token)
    patterns = upload_patterns(export)
    api.upload_folder(
        repo_id=repo_id, folder_path=export, allow_patterns=patterns, repo_type="model", token=token,
        commit_message=f"Upload {run_dir.name + '/' if run_dir else ''}{export.name}",
    )  # fmt: skip
    return {"repo_id": repo_id, "private": private, "folder": export, "allow_patterns": patterns}


def run_dir_of(export: Path) -> Path | None:
    """The run dir of a checkpoint (`<run>/checkpoints/step_XXXXXX`), which holds summary.json; else None."""
    return export.parent.parent if export.parent.name == "checkpoints" else None


def main(argv: list[str] | None = None, api=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="run dir, checkpoints dir, checkpoint dir or pipeline folder")
    p.add_argument("repo_id", help="e.g. me/wan-1.3b-vmoba")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--token", default=None, help="hub token (default: $HF_TOKEN)")
    p.add_argument(
        "--baseline", type=Path, default=None, help="baseline run dir: its summary.json in the card"
    )
    p.add_argument(
        "--report", type=Path, default=None, help="scripts/compare.py's report.md, added to the card"
    )
    args = p.parse_args(argv)
    done = push(
        args.path, args.repo_id, private=args.private, token=args.token, baseline=args.baseline,
        report=args.report, api=api,
    )  # fmt: skip
    print(f"uploaded {done['folder']} to {args.repo_id}{' (private)' if args.private else ''}")
    return done


if __name__ == "__main__":
    main()
