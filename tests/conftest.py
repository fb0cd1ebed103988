"""Shared fixtures: the example model zoo, built once per test session."""

from __future__ import annotations

import pytest
import torch

from tvq_cli.zoo import Zoo, build_zoo


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """The suite works on many small tensors: on a shared 2-core runner, torch's intra-op thread
    hand-offs cost more than the math (up to 25x on a loaded machine). Pack and merge set their
    own threads; this keeps the direct library calls in tests quick and steady."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Zoo:
    """The example zoo (seed 0): a pretrained backbone, 8 fine-tunes and their heads."""
    return build_zoo(tmp_path_factory.mktemp("zoo"), seed=0)
