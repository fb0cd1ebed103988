"""Reading a tensor a block of rows at a time: the same values and the same fingerprint digest
as reading it whole (pack and merge read very large tensors this way)."""

import pytest
import torch
from safetensors.torch import save_file

from tvq_cli.errors import TvqError
from tvq_cli.io.checkpoint import Checkpoint, digest_start, tensor_digest
from tvq_cli.tensors import tensor_bytes


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    weight = torch.randn(37, 5).to(torch.bfloat16)
    path = tmp_path / "m.safetensors"
    save_file({"bias": torch.randn(3), "weight": weight}, str(path))
    return Checkpoint(path), weight


def test_rows_are_the_tensors_rows(checkpoint):
    ckpt, weight = checkpoint
    assert torch.equal(ckpt.load_rows("weight", 10, 20), weight[10:20])
    assert torch.equal(ckpt.load_rows("weight", 0, 37), weight)
    assert ckpt.load_rows("weight", 5, 5).shape == (0, 5)
    buffer = torch.empty(1000, dtype=torch.uint8)
    assert torch.equal(ckpt.load_rows("weight", 30, 37, buffer), weight[30:])
    assert ckpt.row_bytes("weight") == 5 * 2


def test_rows_out_of_range_are_refused(checkpoint):
    ckpt, _ = checkpoint
    with pytest.raises(TvqError, match="no rows 30:38"):
        ckpt.load_rows("weight", 30, 38)
    with pytest.raises(TvqError, match="no tensor named"):
        ckpt.load_rows("missing", 0, 1)


def test_digest_fed_by_rows_equals_the_whole_tensors(checkpoint):
    ckpt, weight = checkpoint
    digest = digest_start("weight", "BF16", weight.shape)
    for first in range(0, 37, 8):
        digest.update(tensor_bytes(ckpt.load_rows("weight", first, min(first + 8, 37))))
    assert digest.digest() == tensor_digest("weight", weight)
    assert digest.digest() != tensor_digest("weight", weight[:36])
