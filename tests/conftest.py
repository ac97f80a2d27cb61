"""Shared pytest setup: CPU-only defaults and the `gpu` marker."""

import os

import pytest
import torch

# DeepSpeed picks its accelerator at import time; tests run on CPU unless CUDA exists.
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def attend_calls(monkeypatch):
    """spy(kernel_class) -> list: the layer index of every call of that attention kernel's `attend` made with
    grad enabled (training forwards and checkpoint recomputes; evaluation and sampling run without), which
    still runs the real kernel."""

    def spy(kernel_class) -> list[int]:
        calls, attend = [], kernel_class.attend

        def counted(self, *args):
            if torch.is_grad_enabled():
                calls.append(self.layer_idx)
            return attend(self, *args)

        monkeypatch.setattr(kernel_class, "attend", counted)
        return calls

    return spy


def fresh_env() -> dict[str, str]:
    """Environment for a fresh `train.py`/script subprocess: in-process DeepSpeed tests keep a one-process
    group alive for the whole session and leave its rendezvous variables set; a child must make its own."""
    launcher = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    return {k: v for k, v in os.environ.items() if k not in launcher}


@pytest.fixture
def launch_env() -> dict[str, str]:
    """`fresh_env()` as a fixture."""
    return fresh_env()
