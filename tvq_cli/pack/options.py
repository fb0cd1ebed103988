"""`tvq pack`'s settings, checked when made."""

from __future__ import annotations

from dataclasses import dataclass

from ..archive import schemes
from ..archive.format import Part
from ..errors import TvqError, usage_errors
from ..quant.sizes import CODECS, DEFAULT_CODEC
from ..quant.spec import DEFAULT_GROUP_SIZE, DEFAULT_RANGE, DEFAULT_SCALE_BITS, QuantSpec

WEIGHTINGS = ("params", "uniform")


@dataclass(frozen=True)
class PackOptions:
    """Quantization settings. Defaults: TVQ 4-bit, RTVQ base 3 / offset 2 bits, groups of 128
    with searched ranges, 6-bit compact scales and entropy-coded codes (docs/fidelity.md).

    `budget` (bits per weight, all bytes counted) lets the allocator choose bits per tensor
    and role instead of `bits` / `base_bits` / `offset_bits`.
    """

    scheme: str = "tvq"
    bits: int = 4
    base_bits: int = 3
    offset_bits: int = 2
    group_size: int = DEFAULT_GROUP_SIZE
    keep: tuple[str, ...] = ()
    error_correction: bool = True
    range: str = DEFAULT_RANGE
    scale_bits: int = DEFAULT_SCALE_BITS
    codec: str = DEFAULT_CODEC
    budget: float | None = None
    weighting: str = "params"
    budget_groups: tuple[int, ...] = ()  # group sizes the allocator may pick (default: group_size)

    def __post_init__(self) -> None:
        with usage_errors():  # every setting is an option of `tvq pack`
            self._check()

    def _check(self) -> None:
        schemes.get(self.scheme)  # validates the scheme name
        for bits in (self.bits, self.base_bits, self.offset_bits):
            QuantSpec(bits, self.group_size, self.range, self.scale_bits)
        for group in self.budget_groups:
            QuantSpec(self.bits, group)
        if self.codec not in CODECS:
            raise TvqError(f"codec must be one of {', '.join(CODECS)}, got {self.codec!r}")
        if self.weighting not in WEIGHTINGS:
            raise TvqError(
                f"weighting must be one of {', '.join(WEIGHTINGS)}, got {self.weighting!r}"
            )
        if self.budget is not None and not self.budget > 0:
            raise TvqError(f"budget must be a positive number of bits per weight: {self.budget}")

    @property
    def rules(self) -> schemes.Scheme:
        return schemes.get(self.scheme)

    def vector_parts(self, tasks: list[str]) -> list[Part] | None:
        """The parts of 1-D float tensors: low-rate, settings left to the allocator, under a
        budget (at a fraction of a bit per weight, exact 1-D tensors alone can cost more than
        the budget); None (kept exact) otherwise."""
        if self.budget is None or (self.rules.coupled and not self.error_correction):
            return None  # (low-rate coupled roles need error correction: pack/lowrate.py)
        return [Part.low_rate(role) for role in self.rules.roles(tasks)]

    def parts(self, tasks: list[str]) -> list[Part]:
        """Every quantized tensor's parts under uniform settings, in storage order."""
        rules = self.rules
        roles, bits = rules.roles(tasks), rules.role_bits(tasks, self)
        return [
            Part(role, b, self.group_size, self.range, self.scale_bits, self.codec)
            for role, b in zip(roles, bits, strict=True)
        ]
