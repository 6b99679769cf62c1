"""Shared fixtures: tiny components built locally (no network), once per test session."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_configure(config: pytest.Config) -> None:
    """``MAGDIFF_SLOW=1`` runs the slow tests too (pyproject's ``addopts`` deselects them with ``-m 'not slow'``;
    ``-m slow`` on the command line runs only them)."""
    if os.environ.get("MAGDIFF_SLOW", "") not in ("", "0") and config.option.markexpr == "not slow":
        config.option.markexpr = ""


@pytest.fixture(scope="session")
def public_parts(tmp_path_factory):
    """Tiny SD pipeline, motion adapter, IP-Adapter-Plus file (original layout) and CLIP vision encoder on disk."""
    from magdiff.tiny import save_tiny_public_parts

    return save_tiny_public_parts(tmp_path_factory.mktemp("public_parts"))


@pytest.fixture()
def tiny_pipeline():
    from magdiff.tiny import tiny_magdiff_pipeline

    pipeline = tiny_magdiff_pipeline(seed=0)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="session")
def saved_tiny_model(tmp_path_factory):
    """A tiny MagDiff pipeline folder, as `magdiff generate --model` loads it."""
    from magdiff.tiny import tiny_magdiff_pipeline

    path = tmp_path_factory.mktemp("tiny_model") / "model"
    tiny_magdiff_pipeline(seed=0).save_pretrained(path, safe_serialization=True)
    return path
