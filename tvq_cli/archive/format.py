"""The archive's header schema and the layout of its stored tensors (spec: docs/format.md).

The layout is a pure function of the header: the header says which tensors exist and how each
role is quantized, and `layout()` derives every stored tensor's key, dtype and shape from it.
The writer and `--dry-run` use it to know the exact file size before writing a byte, and the
reader uses it to check that a file holds exactly what its header promises.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, replace

from ..dtypes import DTYPES, itemsize
from ..errors import TvqError
from ..quant import entropy
from ..quant.bitpack import packed_nbytes
from ..quant.spec import RANGE_METHODS, QuantSpec, group_count
from . import schemes

FORMAT_NAME = "tvq-archive"
FORMAT_VERSION = 1
METADATA_KEY = "tvq"
CHECKSUMS_KEY = "tvq.checksums"
KINDS = ("quantized", "exact", "shared")
TASK_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}$")


def check_task_name(name: str) -> str:
    if not TASK_NAME_RE.match(name):
        raise TvqError(
            f"invalid task name {name!r}: use letters, digits, '_', '.', '+', '-' "
            "(at most 128, starting with a letter or digit)"
        )
    return name


@dataclass(frozen=True)
class Part:
    """One quantized role of a tensor: `task:NAME`, `base`, `offset:NAME` or `ft:NAME`."""

    role: str
    bits: int
    group_size: int
    range: str = "minmax"  # how ranges were chosen (needs no storage)
    scale_bits: int = 0  # 0: fp32 scales; 4-8: log-coded steps + one fp32 super-scale
    codec: str = "raw"  # "raw": dense bit-packed codes; "zstd": entropy-coded (docs/format.md)
    coded_nbytes: int = 0  # zstd only: size of the stored codes frame

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(self.bits, self.group_size, self.range, self.scale_bits)

    def to_json(self) -> list:
        """`[role, bits, group]`, plus a dict of the fidelity options that differ from v1."""
        extra = {
            key: getattr(self, key)
            for key, default in PART_DEFAULTS.items()
            if getattr(self, key) != default
        }
        return [self.role, self.bits, self.group_size, *([extra] if extra else [])]

    @classmethod
    def from_json(cls, item: list) -> Part:
        role, bits, group, *rest = item
        extra = rest[0] if rest else {}
        if len(rest) > 1 or not isinstance(extra, dict) or set(extra) - set(PART_DEFAULTS):
            raise TvqError(f"archive header part {role!r} is malformed")
        part = cls(str(role), int(bits), int(group), **extra)
        if part.range not in RANGE_METHODS or part.codec not in entropy.CODECS:
            raise TvqError(f"archive header part {role!r} names an unknown method")
        if not isinstance(part.coded_nbytes, int) or part.coded_nbytes < 0:
            raise TvqError(f"archive header part {role!r} has a bad coded size")
        return part

    def coded_bound(self, numel: int) -> Part:
        """This part with the largest coded size it can have (what the writer reserves)."""
        if self.codec != "zstd":
            return self
        return replace(self, coded_nbytes=entropy.compress_bound(numel, self.bits))

    @property
    def task(self) -> str | None:
        return self.role.split(":", 1)[1] if ":" in self.role else None


PART_DEFAULTS = {"range": "minmax", "scale_bits": 0, "codec": "raw", "coded_nbytes": 0}


@dataclass
class TensorEntry:
    """One tensor of the original checkpoints and how the archive stores it."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    kind: str
    parts: list[Part] = field(default_factory=list)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class StoredTensor:
    key: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return itemsize(self.dtype) * math.prod(self.shape)


@dataclass
class ArchiveHeader:
    scheme: str
    tasks: list[str]
    tool_version: str
    pretrained_fingerprint: str
    tensors: list[TensorEntry]
    error_correction: bool | None = None

    def to_json(self) -> str:
        doc = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "tool_version": self.tool_version,
            "scheme": self.scheme,
            "tasks": self.tasks,
            "pretrained_fingerprint": self.pretrained_fingerprint,
            "error_correction": self.error_correction,
            "tensors": [
                {
                    "name": t.name,
                    "shape": list(t.shape),
                    "dtype": t.dtype,
                    "kind": t.kind,
                    "parts": [p.to_json() for p in t.parts],
                }
                for t in self.tensors
            ],
        }
        return json.dumps(doc, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> ArchiveHeader:
        try:
            doc = json.loads(text)
            if doc.get("format") != FORMAT_NAME:
                raise TvqError("not a tvq archive (format name missing)")
            if doc.get("version") != FORMAT_VERSION:
                raise TvqError(
                    f"unsupported archive format version {doc.get('version')!r} "
                    f"(this tool reads version {FORMAT_VERSION})"
                )
            tensors = [
                TensorEntry(
                    name=str(t["name"]),
                    shape=tuple(int(d) for d in t["shape"]),
                    dtype=str(t["dtype"]),
                    kind=str(t["kind"]),
                    parts=[Part.from_json(p) for p in t["parts"]],
                )
                for t in doc["tensors"]
            ]
            header = cls(
                scheme=str(doc["scheme"]),
                tasks=[str(t) for t in doc["tasks"]],
                tool_version=str(doc["tool_version"]),
                pretrained_fingerprint=str(doc["pretrained_fingerprint"]),
                tensors=tensors,
                error_correction=doc.get("error_correction"),
            )
        except TvqError:
            raise
        except (
            ValueError,
            KeyError,
            TypeError,
            AttributeError,
            ArithmeticError,
            RecursionError,
        ) as exc:
            raise TvqError(
                f"archive header is malformed ({type(exc).__name__}: {exc})"[:300]
            ) from None
        header.validate()
        return header

    @property
    def parameters(self) -> int:
        """Elements per task: every tensor of the model, whatever its kind."""
        return sum(t.numel for t in self.tensors)

    def bits_per_weight(self, size_bytes: int) -> float:
        """An archive's cost: every byte of the file over every weight of every task."""
        weights = len(self.tasks) * self.parameters
        return 8 * size_bytes / weights if weights else 0.0

    def budget_bytes(self, bits_per_weight: float) -> int:
        """The largest archive, in bytes, that costs at most `bits_per_weight`."""
        return int(bits_per_weight * len(self.tasks) * self.parameters / 8)

    def ratio_vs_fp32(self, size_bytes: int) -> float:
        """How many times smaller than the tasks' checkpoints in fp32."""
        return len(self.tasks) * self.parameters * 4 / size_bytes

    def validate(self) -> None:
        """Check the header's internal consistency (roles, bits, tasks) before trusting it."""
        if self.scheme not in schemes.REGISTRY:
            raise TvqError(f"archive header names unknown scheme {self.scheme!r}")
        if not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise TvqError("archive header has no tasks or duplicate task names")
        for task in self.tasks:
            check_task_name(task)
        expected_roles = set(schemes.get(self.scheme).roles(self.tasks))
        seen: set[str] = set()
        for entry in self.tensors:
            if entry.name in seen:
                raise TvqError(f"archive header lists tensor {entry.name} twice")
            seen.add(entry.name)
            if entry.kind not in KINDS or entry.dtype not in DTYPES:
                raise TvqError(f"archive header entry for {entry.name} is malformed")
            if any(d < 0 for d in entry.shape):
                raise TvqError(f"archive header entry for {entry.name} has a negative dimension")
            if entry.kind == "quantized":
                if len(entry.shape) < 2:
                    raise TvqError(f"archive header entry for {entry.name} is malformed")
                roles = {p.role for p in entry.parts}
                if roles != expected_roles or len(entry.parts) != len(expected_roles):
                    raise TvqError(f"archive header entry for {entry.name} has the wrong roles")
                for part in entry.parts:
                    part.spec  # noqa: B018 - validates bits and group size
            elif entry.parts:
                raise TvqError(f"archive header entry for {entry.name} is malformed")


def part_keys(part: Part, name: str) -> tuple[str, str, str]:
    """Keys of a part's codes, scales and zero-points."""
    prefix = f"{part.role}:{name}"
    return f"{prefix}:codes", f"{prefix}:scales", f"{prefix}:zeros"


def superscale_key(part: Part, name: str) -> str:
    """Key of a compact-scale part's fp32 super-scale (the top of its step grid)."""
    return f"{part.role}:{name}:superscale"


def part_layout(part: Part, entry: TensorEntry) -> list[StoredTensor]:
    """The stored tensors of one quantized part: codes, scales, zero-points (+ super-scale)."""
    codes, scales, zeros = part_keys(part, entry.name)
    groups = group_count(entry.shape, part.group_size)
    if part.codec == "zstd":
        stored = [StoredTensor(codes, "U8", (part.coded_nbytes,))]
    else:
        stored = [StoredTensor(codes, "U8", (packed_nbytes(entry.numel, part.bits),))]
    if part.scale_bits:
        stored.append(StoredTensor(scales, "U8", (packed_nbytes(groups, part.scale_bits),)))
    else:
        stored.append(StoredTensor(scales, "F32", (groups,)))
    stored.append(StoredTensor(zeros, "U8", (packed_nbytes(groups, part.bits),)))
    if part.scale_bits:
        stored.append(StoredTensor(superscale_key(part, entry.name), "F32", (1,)))
    return stored


def delta_key(task: str, name: str) -> str:
    return f"delta:{task}:{name}"


def shared_key(name: str) -> str:
    return f"shared:{name}"


def layout(header: ArchiveHeader) -> list[StoredTensor]:
    """Every stored tensor, in file order, derived from the header alone."""
    stored: list[StoredTensor] = []
    for entry in header.tensors:
        if entry.kind == "shared":
            stored.append(StoredTensor(shared_key(entry.name), entry.dtype, entry.shape))
        elif entry.kind == "exact":
            for task in header.tasks:
                stored.append(StoredTensor(delta_key(task, entry.name), "F32", entry.shape))
        else:
            for part in entry.parts:
                stored.extend(part_layout(part, entry))
    return stored


def bound_header(header: ArchiveHeader) -> ArchiveHeader:
    """The header with every coded size at its upper bound: the writer reserves its length."""
    tensors = [replace(t, parts=[p.coded_bound(t.numel) for p in t.parts]) for t in header.tensors]
    return replace(header, tensors=tensors)


def storage_class(key: str) -> str:
    """What a stored tensor is for, for the byte accounting of `inspect`."""
    if key.startswith(("delta:", "shared:")):
        return "exact"
    return "codes" if key.endswith(":codes") else "scales"
