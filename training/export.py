"""The diffusers pipeline export of every checkpoint: what `WanPipeline.from_pretrained(<checkpoint>)` needs
beside the trained `transformer/` (written by `training.checkpoint.export_transformer`), and the model card.

Added to `<run_dir>/checkpoints/step_XXXXXX/` by `Checkpointer.save` (rank 0, from the run's config):
    model_index.json         the pipeline's class and its parts' classes (read from the parts' configs)
    scheduler/               UniPCMultistepScheduler as Wan-2.1 ships it, flow_shift = the run's sampling shift
    vae/, text_encoder/, tokenizer/   hard links to the run's one copy in `<run_dir>/checkpoints/pipeline/`
    README.md                the model card (`write_model_card`; scripts/push_to_hub.py rewrites it)

Why hard links: each checkpoint is then a self-contained folder (from_pretrained, `upload_folder`, which
does not descend into symlinked folders, and copying one checkpoint all just work, and deleting another
checkpoint or the source model leaves it intact) while every checkpoint shares the same bytes on disk.
The run's copy itself is hard-linked from a pretrained part's files (a hub id: its local snapshot), or
saved once per run for a random-init `arch`. Where the filesystem refuses a hard link (another device, no
hard links) a file becomes an absolute symlink to its source instead: no bytes are copied either way, but
then the checkpoint needs that source to stay where it is.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import yaml

from training.summary import SUMMARY_KEYS

log = logging.getLogger(__name__)

PARTS_DIR = "pipeline"  # <run_dir>/checkpoints/pipeline: the run's one copy of the shared parts
SHARED_PARTS = ("vae", "text_encoder", "tokenizer")
# What a pipeline export consists of (scripts/push_to_hub.py uploads these and nothing else: a checkpoint
# also holds optimizer state). Folders are uploaded with everything in them.
EXPORT_FILES = ["model_index.json", "README.md", "scheduler", "transformer", *SHARED_PARTS]
PIPELINES = {"wan": "WanPipeline"}  # model.family -> diffusers pipeline class; other families: no export


def link_file(src: Path, dst: Path) -> bool:
    """Hard-link `dst` to the file `src` resolves to (through symlinks, e.g. a hub cache's blobs); an
    absolute symlink where the filesystem refuses. Returns whether it is a hard link."""
    real = src.resolve()
    try:
        os.link(real, dst)
        return True
    except OSError:
        os.symlink(real, dst)
        return False


def link_tree(src: Path, dst: Path) -> None:
    """Mirror the folder `src` (following symlinks) as `dst` made of `link_file` links."""
    refused = 0
    for dirpath, _, files in os.walk(src, followlinks=True):
        out = dst / Path(dirpath).relative_to(src)
        out.mkdir(parents=True, exist_ok=True)
        refused += sum(not link_file(Path(dirpath) / name, out / name) for name in files)
    if refused:
        log.warning(f"{dst}: {refused} file(s) are symlinks to {src.resolve()} (no hard links there)")


def _local_part(pretrained: str, subfolder: str | None) -> Path:
    """The local folder of a pretrained part: its folder, or a hub id's snapshot (downloaded if needed)."""
    from models.config import is_local_path

    if is_local_path(pretrained):
        return Path(pretrained).expanduser() / (subfolder or "")
    from huggingface_hub import snapshot_download

    patterns = [f"{subfolder}/*"] if subfolder else None
    return Path(snapshot_download(pretrained, allow_patterns=patterns)) / (subfolder or "")


def shared_parts(model, root: Path) -> Path:
    """`root/{vae,text_encoder,tokenizer}` for `model` (a `ModelConfig`), written once per run: rewritten
    only when `root/parts.json` (the parts' configs, written last) differs, e.g. a resume with another
    model. Random-init parts are built from their arch's fixed seed, so they equal the trained run's."""
    from dataclasses import asdict

    from models.encoders import build_text_encoder, build_vae

    sources = {"vae": asdict(model.vae), "text_encoder": asdict(model.text_encoder)}
    record = root / "parts.json"
    if record.is_file() and json.loads(record.read_text()) == sources:
        return root
    tmp = root.with_name(f".tmp_{root.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    vae, text = model.vae, model.text_encoder
    if vae.pretrained is not None:
        link_tree(_local_part(vae.pretrained, vae.subfolder), tmp / "vae")
    else:
        build_vae(vae).save_pretrained(tmp / "vae")
    if text.pretrained is not None:
        link_tree(_local_part(text.pretrained, text.subfolder), tmp / "text_encoder")
        link_tree(_local_part(text.pretrained, text.tokenizer_subfolder), tmp / "tokenizer")
    else:
        encoder = build_text_encoder(text)
        encoder.model.save_pretrained(tmp / "text_encoder")
        encoder.tokenizer.save_pretrained(tmp / "tokenizer")
    (tmp / "parts.json").write_text(json.dumps(sources, indent=1))
    shutil.rmtree(root, ignore_errors=True)  # links of older checkpoints keep their files alive
    os.replace(tmp, root)
    return root


def _class_of(folder: Path, family_class: str) -> list[str]:
    """[library, class] of one saved part, from its own config, as `model_index.json` lists it."""
    name = folder.name
    if name == "tokenizer":
        return ["transformers", json.loads((folder / "tokenizer_config.json").read_text())["tokenizer_class"]]
    if name == "text_encoder":
        return ["transformers", json.loads((folder / "config.json").read_text())["architectures"][0]]
    config = folder / ("scheduler_config.json" if name == "scheduler" else "config.json")
    # transformer/ is absent in a LoRA checkpoint without merge: the family's class (load it with
    # `WanPipeline.from_pretrained(<checkpoint>, transformer=<base transformer>)`).
    cls = json.loads(config.read_text())["_class_name"] if config.is_file() else family_class
    return ["diffusers", cls]


def write_model_index(export: Path, pipeline: str, family_class: str) -> None:
    """`export/model_index.json` for `pipeline` (e.g. WanPipeline) over the part folders in `export`."""
    import diffusers

    index = {"_class_name": pipeline, "_diffusers_version": diffusers.__version__}
    for part in ("scheduler", "text_encoder", "tokenizer", "transformer", "vae"):
        index[part] = _class_of(export / part, family_class)
    (export / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def export_pipeline(checkpoint: Path, config_yaml: str, parts_root: Path) -> list[Path]:
    """Make the checkpoint folder `checkpoint` (with its `transformer/`) a complete diffusers pipeline for
    the run config `config_yaml` (its `config.yaml`); returns the files a manifest lists. Nothing when
    `checkpoint.pipeline=false` or the family has no diffusers pipeline here (`PIPELINES`)."""
    from models.families import get_family
    from schema import validate
    from training.config import TrainConfig
    from training.objective import unipc_scheduler

    config = yaml.safe_load(config_yaml)
    cfg = validate(TrainConfig, config)
    pipeline = PIPELINES.get(cfg.model.family)
    if not cfg.checkpoint.pipeline or pipeline is None:
        return []
    parts = shared_parts(cfg.model, parts_root)
    for part in SHARED_PARTS:
        shutil.rmtree(checkpoint / part, ignore_errors=True)
        link_tree(parts / part, checkpoint / part)
    shift = cfg.objective.shift if cfg.sample.shift is None else cfg.sample.shift
    unipc_scheduler(shift, cfg.objective.num_train_timesteps).save_pretrained(checkpoint / "scheduler")
    write_model_index(checkpoint, pipeline, get_family(cfg.model.family).model_class.__name__)
    write_model_card(checkpoint, config, run_dir=parts_root.parent)
    # For the manifest: not README.md (push_to_hub rewrites it) nor the shared parts (one copy per run).
    return [checkpoint / "model_index.json", checkpoint / "scheduler"]


# ----------------------------------------------------------------------------- model card


def _summary(run_dir: Path | None) -> dict:
    path = None if run_dir is None else Path(run_dir) / "summary.json"
    return json.loads(path.read_text()) if path is not None and path.is_file() else {}


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


CARD_METRICS = tuple(k for k in SUMMARY_KEYS if k != "time")  # the sweep table's columns but wall time


def write_model_card(
    export: Path,
    config: dict,
    *,
    run_dir: Path | None = None,
    baseline: Path | None = None,
    report: Path | None = None,
    repo_id: str | None = None,
) -> Path:
    """Write `export/README.md`: base model, data, steps, attention (VMoBA settings), LoRA settings (when
    `train.lora` is on), the run's `summary.json` numbers (when `run_dir` has one: a run's final
    checkpoint is written before its summary, so scripts/push_to_hub.py rewrites the card) and, with a
    `baseline` run dir, both runs' numbers side by side, plus `report` (scripts/compare.py's report.md)."""
    model, attention, train, data = (config.get(k) or {} for k in ("model", "attention", "train", "data"))
    transformer = model.get("transformer") or {}
    base = model.get("pretrained") or transformer.get("pretrained")
    base_text = base or f"random-init `{transformer.get('arch')}` ({model.get('family')})"
    hub_base = base if base and "/" in base and not os.path.exists(base) and base.count("/") == 1 else None
    lora = train.get("lora") or {}
    state_file = export / "trainer_state.json"
    steps = json.loads(state_file.read_text())["step"] if state_file.is_file() else train.get("steps")
    if attention.get("type") == "vmoba":
        settings = ", ".join(f"{k}={v}" for k, v in attention.items() if k not in ("type", "backend"))
        attention_text = f"VMoBA ({settings})"
    else:
        attention_text = "full attention (dense SDPA)"
    size = f"{data.get('frames')}x{data.get('height')}x{data.get('width')}"
    rows = [
        ("base model", base_text),
        ("data", f"`{data.get('source')}` ({size} frames x height x width)"),
        ("steps", steps),
        ("batch", f"{train.get('batch_size')} per rank x {train.get('grad_accum')} accumulation"),
        ("learning rate", train.get("lr")),
        ("attention", attention_text),
    ]
    if lora.get("rank"):
        targets = lora.get("target_modules") or "attention q/k/v/o (self and cross) and FFN"
        rows.append(("LoRA", f"rank {lora['rank']}, alpha {lora.get('alpha') or lora['rank']}, "
                              f"dropout {lora.get('dropout', 0.0)}, targets {targets}"))  # fmt: skip
    else:
        rows.append(("fine-tuning", "full (every transformer weight)"))
    front = ["---", "library_name: diffusers", "pipeline_tag: text-to-video"]
    front += [f"base_model: {hub_base}"] if hub_base else []
    front += ["tags:", "- wan", "- text-to-video", f"- {attention.get('type', 'vmoba')}-attention"]
    front += ["- lora"] if lora.get("rank") else []
    lines = [*front, "---", "", f"# {repo_id or export.name}", ""]
    lines += [f"Fine-tuned from {base_text} with a Hydra + DeepSpeed trainer using {attention_text}.", ""]
    lines += ["## Training", "", "| | |", "| --- | --- |", *(f"| {k} | {v} |" for k, v in rows), ""]
    runs = {"this run": _summary(run_dir)}
    if baseline is not None:
        runs["baseline"] = _summary(baseline)
    runs = {name: s for name, s in runs.items() if s}
    if runs:
        lines += ["## Results (summary.json)", ""]
        lines += ["| metric | " + " | ".join(runs) + " |", "| --- |" + " --- |" * len(runs)]
        for metric in CARD_METRICS:
            if any(metric in s for s in runs.values()):
                lines.append(
                    f"| {metric} | " + " | ".join(_fmt(s.get(metric, "")) for s in runs.values()) + " |"
                )
        lines.append("")
    if report is not None and Path(report).is_file():
        lines += ["## Comparison report", "", Path(report).read_text().strip(), ""]
    where = repo_id or str(export)
    lines += ["## Usage", "", "```python", "import torch", "from diffusers import WanPipeline",
              "from diffusers.utils import export_to_video", "",
              f'pipe = WanPipeline.from_pretrained("{where}", torch_dtype=torch.bfloat16).to("cuda")',
              'frames = pipe("a red ball rolls across a green field", num_frames=17).frames[0]',
              'export_to_video(frames, "sample.mp4", fps=8)', "```", ""]  # fmt: skip
    (export / "README.md").write_text("\n".join(lines))
    return export / "README.md"
