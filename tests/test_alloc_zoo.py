"""The budget allocator on the example zoo's real task vectors (issue 6's test list)."""

import pytest

from tvq_cli import PackOptions, inspect_archive, pack


@pytest.mark.parametrize(("scheme", "bits", "strict"), [("rtvq", 2, True), ("tvq", 3, False)])
def test_allocator_beats_uniform_bits_at_the_same_budget_on_the_zoo(
    zoo, tmp_path, scheme, bits, strict
):
    """At the size of the uniform archive, `--budget` never writes more and has less error
    (RTVQ: it finds a better base/offset split per tensor; TVQ: never worse, the uniform
    setting stays reachable)."""
    finetuned = list(zoo.tasks.values())
    uniform, budgeted = tmp_path / "uniform.tvq", tmp_path / "budget.tvq"
    options = PackOptions(scheme=scheme, bits=bits, base_bits=bits, offset_bits=bits)
    pack(zoo.pretrained, finetuned, uniform, options)
    report = inspect_archive(uniform, against=(zoo.pretrained, finetuned))
    budget = report["bits_per_weight"]
    pack(zoo.pretrained, finetuned, budgeted, PackOptions(scheme=scheme, budget=budget))
    assert budgeted.stat().st_size <= uniform.stat().st_size
    error = inspect_archive(budgeted, against=(zoo.pretrained, finetuned))["error"]["rel_l2"]
    if strict:
        assert error < 0.995 * report["error"]["rel_l2"]
    else:
        assert error <= report["error"]["rel_l2"]
