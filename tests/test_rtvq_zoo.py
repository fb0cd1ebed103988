"""RTVQ's error correction on task vectors from real fine-tuning (the example zoo)."""

import pytest

from tvq_cli import PackOptions, inspect_archive, pack


@pytest.mark.parametrize("group_size", [0, 128])
@pytest.mark.parametrize(("base_bits", "offset_bits"), [(3, 2), (2, 2), (4, 3)])
def test_error_correction_lowers_reconstruction_error(
    zoo, tmp_path, group_size, base_bits, offset_bits
):
    finetuned = list(zoo.tasks.values())
    errors = {}
    for correction in (True, False):
        out = tmp_path / f"rtvq_{correction}.tvq"
        options = PackOptions(
            scheme="rtvq",
            base_bits=base_bits,
            offset_bits=offset_bits,
            group_size=group_size,
            error_correction=correction,
        )
        pack(zoo.pretrained, finetuned, out, options)
        report = inspect_archive(out, against=(zoo.pretrained, finetuned))
        errors[correction] = report["error"]["rel_l2"]
    assert errors[True] < errors[False]


def test_task_vectors_beat_fine_tuned_weights_at_equal_bits(zoo, tmp_path):
    """The paper's observation (its Fig. 4): quantizing tau loses far less than quantizing theta."""
    finetuned = list(zoo.tasks.values())
    errors = {}
    for scheme in ("tvq", "fq"):
        out = tmp_path / f"{scheme}.tvq"
        pack(zoo.pretrained, finetuned, out, PackOptions(scheme=scheme, bits=4, group_size=0))
        errors[scheme] = inspect_archive(out, against=(zoo.pretrained, finetuned))["error"]
    assert errors["tvq"]["rel_l2"] * 3 < errors["fq"]["rel_l2"]
