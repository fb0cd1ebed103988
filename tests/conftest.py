"""Shared fixtures: the example model zoo, built once per test session."""

from __future__ import annotations

import pytest

from tvq_cli.zoo import Zoo, build_zoo


@pytest.fixture(scope="session")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Zoo:
    """The example zoo (seed 0): a pretrained backbone, 8 fine-tunes and their heads."""
    return build_zoo(tmp_path_factory.mktemp("zoo"), seed=0)
