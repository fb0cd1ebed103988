"""The scheme interface and its registry.

A scheme says which quantized roles every quantized tensor stores (in storage order), how the
inputs of one tensor become the values each role quantizes (`encode`), and how a task vector
comes back from the dequantized roles (`decode`). Everything else (pack's routes, the
allocator, the reader, merge) goes through this interface, so a new scheme is one module.

`encode` is written once for every route: it hands each role's input to a `RoleCoder`, which
the whole-tensor route, the blocked route and the allocator implement in their own way.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sized
from typing import TYPE_CHECKING, ClassVar, Protocol

from ...errors import InternalError, TvqError

if TYPE_CHECKING:  # a scheme's declaration (`tvq inspect` reads it) needs no torch
    import torch


class Inputs(Iterable["torch.Tensor"], Sized, Protocol):
    """One tensor's fp32 values in every input, in task order: task vectors, or fine-tuned
    weights when the scheme does not subtract the pretrained model. Iterable more than once;
    each item may be modified in place and is valid until the next one is taken."""


class RoleCoder(Protocol):
    def __call__(
        self, index: int, values: torch.Tensor, reconstruct: bool = False
    ) -> torch.Tensor | None:
        """Quantize `values` as role `index`; with `reconstruct`, return their dequantized
        fp32 values (same element count), which later roles may depend on."""


class BitSettings(Protocol):
    bits: int
    base_bits: int
    offset_bits: int


class Scheme(ABC):
    """Base class; subclasses set the class attributes and implement `encode` and `decode`."""

    name: ClassVar[str]
    task_prefix: ClassVar[str]  # role prefix of the part each task owns, e.g. "task"
    shared_roles: ClassVar[tuple[str, ...]] = ()  # roles every task's vector depends on
    subtracts_pretrained: ClassVar[bool] = True  # False: inputs are the fine-tuned weights
    corrects_error: ClassVar[bool] = False  # whether the error-correction setting applies
    # Every decoded element lies between 0 and its true value (0 is on every grid and codes
    # are the nearest level), so a task vector is never farther from its fine-tune's than 0.
    within_task_vector: ClassVar[bool] = False
    # role i quantizes input i as it is: pack then codes each input straight from its raw bytes
    direct: ClassVar[bool] = False

    def roles(self, tasks: list[str]) -> list[str]:
        """The quantized roles of every quantized tensor, in storage order."""
        return [*self.shared_roles, *(self.task_role(t) for t in tasks)]

    def task_role(self, task: str) -> str:
        """The role that carries this task's own information (and its own error)."""
        return f"{self.task_prefix}:{task}"

    def sole_role(self, task: str) -> str | None:
        """The role whose dequantized values are the task vector itself, if there is one."""
        return None

    @property
    def coupled(self) -> bool:
        """Whether a task's vector depends on roles shared with other tasks."""
        return bool(self.shared_roles)

    def role_bits(self, tasks: list[str], settings: BitSettings) -> list[int]:
        """Bits of each role under uniform settings."""
        return [settings.bits] * len(tasks)

    def encode(
        self,
        inputs: Inputs,
        code: RoleCoder,
        error_correction: bool,
        scratch: torch.Tensor | None = None,
    ) -> None:
        """Hand every role's values to `code`, in storage order. `scratch`: a buffer of one
        input's size the scheme may use for values of its own (RTVQ's base). Direct schemes
        hand over each input as it is."""
        if not self.direct:
            raise InternalError(f"scheme {self.name} is not direct and has no encode of its own")
        for index, values in enumerate(inputs):
            code(index, values)

    def anchor(self, dequantized: Callable[[str], torch.Tensor]) -> torch.Tensor | None:
        """What a task added to an existing archive (`tvq add`) is stored against besides the
        pretrained weights: the reconstruction of the shared roles already stored (None for a
        scheme without shared roles)."""
        return None

    @property
    def added_tasks(self) -> Scheme:
        """The scheme that codes added tasks' own roles, each on its own."""
        return self

    @abstractmethod
    def decode(
        self,
        task: str,
        dequantized: Callable[[str], torch.Tensor],
        pretrained: torch.Tensor | None,
    ) -> torch.Tensor:
        """Task `task`'s fp32 task vector from its roles' dequantized values (`pretrained`,
        fp32, only where the scheme does not subtract it at pack time)."""


REGISTRY: dict[str, Scheme] = {}


def register(cls: type[Scheme]) -> type[Scheme]:
    """Class decorator: make a scheme available by its name."""
    if cls.name in REGISTRY:
        raise ValueError(f"duplicate scheme name {cls.name!r}")
    REGISTRY[cls.name] = cls()
    return cls


def get(name: str) -> Scheme:
    try:
        return REGISTRY[name]
    except KeyError:
        raise TvqError(f"unknown scheme {name!r} (choose {', '.join(REGISTRY)})") from None
