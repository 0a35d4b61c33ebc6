"""Shared test fixtures: tiny configs and the offline GPT-2 ranks file.

Tests never touch the network. The GPT-2 BPE ranks come from ../shared/data when it is there (as on our
machines and in CI); the project itself never relies on that path.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
GPT2_RANKS = SHARED_DATA / "gpt2.tiktoken"
TINY_SHAKESPEARE = SHARED_DATA / "tinyshakespeare.txt"

if GPT2_RANKS.is_file():
    os.environ.setdefault("GPTFORGE_GPT2_RANKS", str(GPT2_RANKS))

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def tiny_config():
    from gptforge.config import ModelConfig
    return ModelConfig(vocab_size=101, block_size=32, n_layer=2, n_head=2, n_embd=16)


@pytest.fixture
def gpt2_ranks() -> Path:
    if not GPT2_RANKS.is_file():
        pytest.skip(f"GPT-2 ranks file not found at {GPT2_RANKS}")
    return GPT2_RANKS
