"""A fine-tune as pack, inspect, add and extract read it: its tensors under the pretrained
checkpoint's names, whatever its form on disk.

Two forms: a model checkpoint (`CheckpointTask`: a .safetensors file, a folder, a sharded
folder; names mapped, tied copies and grown embeddings recognised by `compat`) and a PEFT LoRA
adapter folder (`lora.LoraTask`: weights rebuilt as peft's merge would). Both hand out each
tensor in the pretrained shape (`load`, `load_float`) or with the rows it added (`load_full`),
and the fingerprint of the files they were read from, computed from the bytes as they are read
(no second pass over the files).
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from ..errors import TvqError
from ..tensors import require_finite
from .checkpoint import Checkpoint, TensorSpec, combine_digests, tensor_digest
from .compat import Match, match_checkpoint
from .model_files import Companions, read_companions
from .names import Renaming


class TaskSource(ABC):
    """One fine-tune, read tensor by tensor under the pretrained names."""

    kind = "checkpoint"

    def __init__(self, path: Path, pretrained: Checkpoint):
        self.path = Path(path)
        self.pretrained = pretrained
        self.files: list[Path] = []  # its files on disk
        self.specs: dict[str, TensorSpec] = {}  # its own shape (added rows included) and dtype
        self.rows: dict[str, int] = {}  # rows added past the pretrained's
        self.copies: dict[str, str] = {}  # explicit copies of tied tensors -> the original
        self.absent: list[str] = []  # pretrained tensors it lacks (task vector 0)
        self.renamed = Renaming()
        self.notes: list[str] = []  # what was mapped or assumed, for people

    @abstractmethod
    def load_full(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Tensor `name` with any rows it added, in a float dtype of the input (its own, or
        fp32 where it is computed); read into `out` (uint8, `stored_nbytes(name)` bytes, a
        reused buffer) where given."""

    def stored_nbytes(self, name: str) -> int | None:
        """The bytes of `load_full(name)` where it is read as stored (a caller may hand a
        buffer of that size); None where it is computed."""
        return None

    def row_source(self, name: str) -> tuple[Checkpoint, str] | None:
        """Where tensor `name` is stored as it is read (the checkpoint, and its name there),
        for a reader of a block of rows at a time (`Checkpoint.load_rows`); None where it is
        computed; the pretrained checkpoint where the fine-tune lacks the tensor. Rows past the
        pretrained's are the ones it added. Such a reader feeds the fingerprint's digest of a
        tensor of the fine-tune's own files itself (`adopt_digests`)."""
        return None

    def settle(self) -> None:  # noqa: B027 - optional hook
        """Wait until no work on a tensor handed out is left (its hash): its buffer may be
        reused."""

    def load(self, name: str) -> torch.Tensor:
        """Tensor `name` in the pretrained shape (added rows left out)."""
        return self.split(name, self.load_full(name))[0]

    def split(self, name: str, full: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A `load_full` tensor as (its pretrained-shaped rows, the rows it added or None)."""
        if name not in self.rows:
            return full, None
        rows = self.pretrained.specs[name].shape[0]
        return full[:rows], full[rows:]

    def load_float(self, name: str) -> torch.Tensor:
        """`load` in fp32, refusing NaN and Inf."""
        return require_finite(self.load(name).to(torch.float32), self.path, name)

    def read_digests(self) -> dict[str, bytes]:
        """The fingerprint's digests of the tensors read so far, for a process that reads the
        rest (`adopt_digests`); none where the fingerprint is not made of read tensors."""
        return {}

    def adopt_digests(self, digests: dict[str, bytes]) -> None:  # noqa: B027 - optional hook
        """Digests another process took of this fine-tune's tensors (`read_digests`): those
        tensors need not be read again for `fingerprint`."""

    @abstractmethod
    def fingerprint(self) -> str:
        """sha256 over its tensors as stored (sorted names, dtypes, shapes, bytes): the same
        function as the pretrained fingerprint, so `Checkpoint(path).fingerprint()` equals it."""

    @abstractmethod
    def companions(self) -> Companions:
        """Its config, tokenizer and other small files (none for a bare .safetensors file)."""

    @abstractmethod
    def close(self) -> None:
        """Close its files (and stop reading ahead)."""

    @property
    def dtypes(self) -> dict[str, str]:
        """The original dtype of each float tensor."""
        return {n: s.dtype for n, s in self.specs.items() if s.is_float}


class CheckpointTask(TaskSource):
    """A fine-tuned model checkpoint."""

    def __init__(self, path: Path, pretrained: Checkpoint):
        super().__init__(path, pretrained)
        self.checkpoint = Checkpoint(path)
        self.files = list(self.checkpoint.files)
        self._digests = Digests()
        match: Match = match_checkpoint(pretrained, self.checkpoint, self._same)
        self._own = match.own
        self.specs = match.specs
        self.rows = match.rows
        self.copies = match.copies
        self.absent = match.absent
        self.renamed = match.renamed
        self.notes = match.notes(self.path)

    def _read(self, own_name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        self._digests.settle()
        tensor = self.checkpoint.load(own_name, out)
        self._digests.add(own_name, tensor)
        return tensor

    def _same(self, a: str, b: str) -> bool:
        return torch.equal(self._read(a), self._read(b))

    def load_full(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        own = self._own.get(name)
        if own is None:  # absent, or a buffer it did not save: the pretrained tensor
            if name not in self.pretrained.specs:
                raise TvqError(f"{self.path}: no tensor named {name}")
            return self.pretrained.load(name, out)
        return self._read(own, out)

    def stored_nbytes(self, name: str) -> int | None:
        own = self._own.get(name)
        if own is None:
            spec = self.pretrained.specs.get(name)
            return None if spec is None else spec.nbytes
        return self.checkpoint.specs[own].nbytes

    def row_source(self, name: str) -> tuple[Checkpoint, str] | None:
        own = self._own.get(name)
        if own is None:
            return (self.pretrained, name) if name in self.pretrained.specs else None
        return self.checkpoint, own

    def settle(self) -> None:
        self._digests.settle()

    def read_digests(self) -> dict[str, bytes]:
        return dict(self._digests.result())

    def adopt_digests(self, digests: dict[str, bytes]) -> None:
        self._digests.update(digests)

    def fingerprint(self) -> str:
        for name in self.checkpoint.names:
            if name not in self._digests:
                self._read(name)
        return combine_digests(self._digests.result())

    def companions(self) -> Companions:
        return read_companions(self.path) if self.path.is_dir() else Companions()

    def close(self) -> None:
        self._digests.close()
        self.checkpoint.close()


class Digests:
    """Fingerprint digests of tensors as they are read, hashed on a thread of their own: sha256
    runs at about 0.8 GB/s, and on the reading thread it would hold up the reading. A tensor is
    hashed while it is being quantized; the next one is read only once it is hashed
    (`settle`), so no tensor is kept alive for its hash and memory stays as bounded as pack's."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="tvq-hash")
        self._lock = threading.RLock()  # the reader adds, the consumer may settle
        self._pending: tuple[str, Future] | None = None
        self._done: dict[str, bytes] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._done or (self._pending is not None and self._pending[0] == name)

    def settle(self) -> None:
        """Wait for the tensor being hashed."""
        with self._lock:
            if self._pending is not None:
                name, future = self._pending
                self._done[name] = future.result()
                self._pending = None

    def add(self, name: str, tensor: torch.Tensor) -> None:
        with self._lock:
            if name not in self:
                self.settle()
                self._pending = (name, self._pool.submit(tensor_digest, name, tensor))

    def result(self) -> dict[str, bytes]:
        self.settle()
        return self._done

    def update(self, digests: dict[str, bytes]) -> None:
        """Digests taken elsewhere of the same tensors."""
        with self._lock:
            self._done.update(digests)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
