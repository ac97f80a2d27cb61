"""scripts/push_to_hub.py against a local stand-in for the Hub (no network).

The stand-in is injected through `main(argv, api=...)` (the script's default is the real
`huggingface_hub.HfApi`): `LocalHub` subclasses `HfApi` and replaces only what talks to the network,
`create_repo` (recorded) and `upload_folder`, which selects the files with huggingface_hub's own
`_prepare_upload_folder_additions` (the listing and allow/ignore filtering the real `upload_folder` does)
and copies them into a local repo folder. `_validate_yaml` (the Hub's check of the card's metadata) parses
the front matter locally instead.
"""

import json
import shutil
from pathlib import Path

import yaml
from huggingface_hub import HfApi
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS
from omegaconf import OmegaConf

from models.config import TransformerConfig
from models.transformer import build_transformer
from schema import compose, validate
from training.config import TrainConfig
from training.export import PARTS_DIR, export_pipeline

ROOT = Path(__file__).resolve().parents[1]


def _load_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("push_to_hub", ROOT / "scripts" / "push_to_hub.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class LocalHub(HfApi):
    def __init__(self, root: Path):
        super().__init__(token="hf_local_stand_in")
        self.root, self.repos = root, {}

    def create_repo(self, repo_id, *, token=None, private=None, repo_type=None, exist_ok=False, **kwargs):
        assert exist_ok or repo_id not in self.repos
        self.repos[repo_id] = {"private": private, "repo_type": repo_type, "token": token}
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, allow_patterns=None, ignore_patterns=None, token=None,
                      repo_type=None, commit_message=None, **kwargs):  # fmt: skip
        assert repo_id in self.repos, "upload before create_repo"
        ops = self._prepare_upload_folder_additions(
            folder_path, "", allow_patterns=allow_patterns,
            ignore_patterns=[*(ignore_patterns or []), *DEFAULT_IGNORE_PATTERNS], repo_type=repo_type, token=token,
        )  # fmt: skip
        for op in ops:
            dest = self.root / repo_id / op.path_in_repo
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(op.path_or_fileobj, dest)
        self.repos[repo_id]["commit_message"] = commit_message
        return sorted(op.path_in_repo for op in ops)

    def _validate_yaml(self, content, *, repo_type=None, token=None):
        front = content.split("---\n")[1]
        assert isinstance(yaml.safe_load(front), dict)


def test_push_uploads_the_pipeline_only_with_a_fresh_card(tmp_path, monkeypatch):
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "step_000004"
    cfg = validate(
        TrainConfig, compose("train", ["data.source=clips", "data.cache_dir=cache", "train.steps=4"])
    )
    config_yaml = OmegaConf.to_yaml(OmegaConf.structured(cfg))
    build_transformer(TransformerConfig(seed=2)).save_pretrained(ckpt / "transformer")
    (ckpt / "config.yaml").write_text(config_yaml)
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 4}))
    (ckpt / "deepspeed").mkdir()
    (ckpt / "deepspeed" / "mp_rank_00_model_states.pt").write_bytes(b"optimizer state, not for the hub")
    (ckpt / "rng_rank_000.pt").write_bytes(b"rng")
    export_pipeline(ckpt, config_yaml, run / "checkpoints" / PARTS_DIR)
    (run / "checkpoints" / "latest").write_text("step_000004\n")
    (ckpt / "complete.json").write_text(json.dumps({"step": 4, "world_size": 1}))
    (run / "summary.json").write_text(json.dumps({"final_loss": 0.125}))  # written after the last checkpoint
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")

    hub = LocalHub(tmp_path / "hub")
    done = _load_script().main([str(run), "me/tiny-wan-vmoba", "--private"], api=hub)

    assert done["repo_id"] == "me/tiny-wan-vmoba" and done["folder"] == ckpt
    assert hub.repos["me/tiny-wan-vmoba"] == {
        "private": True, "repo_type": "model", "token": "hf_from_env", "commit_message": "Upload run/step_000004",
    }  # fmt: skip
    uploaded = sorted(str(p.relative_to(hub.root / "me/tiny-wan-vmoba")) for p in (hub.root / "me/tiny-wan-vmoba").rglob("*") if p.is_file())  # fmt: skip
    top = sorted({p.split("/")[0] for p in uploaded})
    assert top == [
        "README.md",
        "model_index.json",
        "scheduler",
        "text_encoder",
        "tokenizer",
        "transformer",
        "vae",
    ]
    assert "transformer/config.json" in uploaded and "vae/diffusion_pytorch_model.safetensors" in uploaded
    assert "scheduler/scheduler_config.json" in uploaded and "tokenizer/tokenizer.json" in uploaded
    # The card was rewritten with the summary written after the checkpoint, and names the repo.
    card = (hub.root / "me/tiny-wan-vmoba" / "README.md").read_text()
    assert "| final_loss | 0.125 |" in card and 'from_pretrained("me/tiny-wan-vmoba"' in card
    # What was uploaded is a loadable pipeline.
    from diffusers import WanPipeline

    assert WanPipeline.from_pretrained(hub.root / "me/tiny-wan-vmoba").transformer.config.num_layers == 3
