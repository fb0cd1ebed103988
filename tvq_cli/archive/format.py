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
import unicodedata
from dataclasses import dataclass, field, replace
from pathlib import PurePosixPath
from typing import TYPE_CHECKING

from ..dtypes import DTYPES, INPUT_FLOATS, itemsize
from ..errors import TvqError
from ..quant import sizes
from ..quant.sizes import packed_nbytes
from ..quant.spec import RANGE_METHODS, QuantSpec, group_count
from . import schemes

if TYPE_CHECKING:
    from ..quant import dzans

FORMAT_NAME = "tvq-archive"
FORMAT_VERSION = 3  # what this tool writes
READABLE_VERSIONS = (1, 2, 3)
LOW_RATE = "dzans"  # the low-rate codec: a part stored as one record (docs/format.md)
FRAMED_BELOW = 1 << 20  # entries with fewer elements keep their low-rate records in frames
METADATA_KEY = "tvq"
CHECKSUMS_KEY = "tvq.checksums"
KINDS = ("quantized", "exact", "shared")
SOURCES = ("checkpoint", "lora")  # what a task was packed from
# letters and digits of any script, then also '_', '.', '+', '-'; NFC (a name typed on Linux and
# read from a macOS folder, which stores NFD, is the same name)
TASK_NAME_RE = re.compile(r"^[^\W_][\w.+-]{0,127}$")
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
FINGERPRINT_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


def check_task_name(name: str) -> str:
    if not TASK_NAME_RE.match(name) or unicodedata.normalize("NFC", name) != name:
        raise TvqError(
            f"invalid task name {name!r}: use letters, digits (any script), '_', '.', '+', '-' "
            "(at most 128, starting with a letter or digit)"
        )
    return name


@dataclass(frozen=True)
class Part:
    """One quantized role of a tensor: `task:NAME`, `base`, `offset:NAME` or `ft:NAME`.

    A dense part holds codes, scales and zero-points (`bits`, `group_size`, ...); a low-rate
    part (`codec` "dzans") holds one record whose quantizer setting is inside it (`setting`
    is what pack chose, or None when read from a header)."""

    role: str
    bits: int
    group_size: int
    range: str = "minmax"  # how ranges were chosen (needs no storage)
    scale_bits: int = 0  # 0: fp32 scales; 4-8: log-coded steps + one fp32 super-scale
    codec: str = "raw"  # dense: "raw" bit-packed, "zstd" / "zstd-c" entropy-coded; or "dzans"
    coded_nbytes: int = 0  # entropy-coded: size of the stored codes (dzans: 0 in a frame)
    setting: dzans.Setting | None = field(default=None, compare=False)

    @classmethod
    def low_rate(cls, role: str, setting: dzans.Setting | None = None, nbytes: int = 0) -> Part:
        return cls(role, 0, 0, codec=LOW_RATE, coded_nbytes=nbytes, setting=setting)

    @property
    def dense(self) -> bool:
        return self.codec != LOW_RATE

    @property
    def spec(self) -> QuantSpec:
        if not self.dense:
            raise TvqError(f"part {self.role} is low-rate: it has no dense quantizer settings")
        return QuantSpec(self.bits, self.group_size, self.range, self.scale_bits)

    def to_json(self) -> list | int:
        """`[role, bits, group]`, plus a dict of the fidelity options that differ from v1; a
        low-rate part is its record's size (0 when it is in its role's frame)."""
        if not self.dense:
            return self.coded_nbytes
        extra = {
            key: getattr(self, key)
            for key, default in PART_DEFAULTS.items()
            if getattr(self, key) != default
        }
        return [self.role, self.bits, self.group_size, *([extra] if extra else [])]

    @classmethod
    def from_json(cls, item: list | int, role: str | None = None) -> Part:
        """A part of the header; `role` is the one its position in `parts` stands for (what
        a low-rate part, stored as a number, is)."""
        if type(item) is int and role is not None:
            if item < 0:
                raise TvqError(f"archive header part {role!r} has a bad coded size")
            return cls.low_rate(role, nbytes=item)
        role, bits, group, *rest = item
        extra = rest[0] if rest else {}
        if len(rest) > 1 or not isinstance(extra, dict) or set(extra) - set(PART_DEFAULTS):
            raise TvqError(f"archive header part {role!r} is malformed")
        if not {"setting"}.isdisjoint(extra):
            raise TvqError(f"archive header part {role!r} is malformed")
        part = cls(str(role), int(bits), int(group), **extra)
        if part.range not in RANGE_METHODS or part.codec not in sizes.CODECS:
            raise TvqError(f"archive header part {role!r} names an unknown method")
        if not isinstance(part.coded_nbytes, int) or part.coded_nbytes < 0:
            raise TvqError(f"archive header part {role!r} has a bad coded size")
        return part

    def coded_bound(self, entry: TensorEntry) -> Part:
        """This part with the largest coded size it can have (what the writer reserves)."""
        if not self.dense:
            framed = entry.numel < FRAMED_BELOW
            return replace(self, coded_nbytes=0 if framed else record_bound(entry))
        if self.codec not in sizes.CODED:
            return self
        return replace(self, coded_nbytes=sizes.compress_bound(entry.numel, self.bits))

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

    @property
    def rows(self) -> int:
        """Rows of the last dimension (a 1-D tensor is one row)."""
        return math.prod(self.shape[:-1]) if len(self.shape) > 1 else 1

    @property
    def framed(self) -> bool:
        """Whether this entry's low-rate records go in their roles' frames."""
        return self.numel < FRAMED_BELOW


def record_bound(entry: TensorEntry) -> int:
    """The largest record of a low-rate part of `entry` (docs/format.md)."""
    from ..quant import dzans  # numpy: not for header-only reads of dense archives

    return dzans.record_bound(entry.numel, entry.rows)


@dataclass(frozen=True)
class StoredTensor:
    key: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return itemsize(self.dtype) * math.prod(self.shape)


@dataclass
class TaskInfo:
    """What the archive records of one task's original checkpoint (format version 2), so that
    `extract` gives the fine-tune back in its own dtypes, vocabulary and files.

    A version 1 archive has none: its tasks had the entries' dtypes and nothing else.
    """

    source: str = "checkpoint"  # "checkpoint" (a model's weights) or "lora" (a PEFT adapter)
    fingerprint: str | None = None  # sha256 of the original tensors, as pretrained_fingerprint
    dtype: str | None = None  # its float tensors' dtype; None: each entry's own (version 1)
    dtypes: dict[str, str] = field(default_factory=dict)  # tensors whose dtype differs
    rows: dict[str, int] = field(default_factory=dict)  # rows added along dimension 0
    copies: dict[str, str] = field(default_factory=dict)  # explicit copy of a tied tensor -> it
    absent: list[str] = field(default_factory=list)  # pretrained tensors it lacked (tau = 0)
    renamed: tuple[str, str] | None = None  # (prefix removed, prefix added) from its names
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256 of the file

    def dtype_of(self, entry: TensorEntry) -> str:
        """The task's original dtype of one tensor."""
        if entry.kind == "shared":
            return entry.dtype
        return self.dtypes.get(entry.name, self.dtype or entry.dtype)

    def to_json(self) -> dict:
        doc: dict = {"source": self.source, "fingerprint": self.fingerprint, "dtype": self.dtype}
        for key in ("dtypes", "rows", "copies", "absent", "files"):
            if getattr(self, key):
                doc[key] = getattr(self, key)
        if self.renamed is not None:
            doc["renamed"] = list(self.renamed)
        return doc

    @classmethod
    def from_json(cls, doc: dict) -> TaskInfo:
        if not isinstance(doc, dict):
            raise TypeError("a task record is not an object")
        unknown = set(doc) - {"source", "fingerprint", "dtype", *_TASK_MAPS, "absent", "renamed"}
        if unknown:
            raise TypeError(f"unknown task field {sorted(unknown)[0]!r}")
        renamed = doc.get("renamed")
        return cls(
            source=str(doc["source"]),
            fingerprint=doc.get("fingerprint"),
            dtype=doc.get("dtype"),
            **{key: _typed_map(doc.get(key, {}), kind) for key, kind in _TASK_MAPS.items()},
            absent=[str(n) for n in doc.get("absent", [])],
            renamed=None if renamed is None else (str(renamed[0]), str(renamed[1])),
        )


_TASK_MAPS = {"dtypes": str, "rows": int, "copies": str, "files": str}


def _typed_map(doc: object, kind: type) -> dict:
    if not isinstance(doc, dict) or not all(type(v) is kind for v in doc.values()):
        raise TypeError("malformed task field")
    return {str(k): v for k, v in doc.items()}


@dataclass(frozen=True)
class FileBlob:
    """One small non-weight file (config, tokenizer, ...), stored once however many tasks
    share it, as one zstd frame."""

    size: int  # bytes of the file
    stored: int  # bytes of its zstd frame in the archive


@dataclass
class ArchiveHeader:
    scheme: str
    tasks: list[str]
    tool_version: str
    pretrained_fingerprint: str
    tensors: list[TensorEntry]
    error_correction: bool | None = None
    task_info: dict[str, TaskInfo] = field(default_factory=dict)  # empty: a version 1 archive
    files: dict[str, FileBlob] = field(default_factory=dict)  # sha256 hex -> its stored frame
    frames: dict[str, int] = field(default_factory=dict)  # role -> bytes of its records' frame
    version: int = FORMAT_VERSION  # as read; always written as FORMAT_VERSION

    @property
    def roles(self) -> list[str]:
        """The quantized roles of every quantized tensor, in storage order."""
        return schemes.get(self.scheme).roles(self.tasks)

    def info(self, task: str) -> TaskInfo:
        """The task's record (a version 1 archive's tasks get the default one)."""
        return self.task_info.get(task) or TaskInfo()

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
            "task_info": {task: self.info(task).to_json() for task in self.tasks},
            "files": {
                sha: {"size": blob.size, "stored": blob.stored}
                for sha, blob in sorted(self.files.items())
            },
        }
        if self.frames:
            doc["frames"] = {role: self.frames[role] for role in self.roles if role in self.frames}
        return json.dumps(doc, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> ArchiveHeader:
        try:
            doc = json.loads(text)
            if doc.get("format") != FORMAT_NAME:
                raise TvqError("not a tvq archive (format name missing)")
            version = doc.get("version")
            if version not in READABLE_VERSIONS:
                raise TvqError(
                    f"unsupported archive format version {version!r} (this tool reads versions "
                    f"{', '.join(map(str, READABLE_VERSIONS))}; a newer tvq wrote it?)"
                )
            roles = schemes.get(str(doc["scheme"])).roles([str(t) for t in doc["tasks"]])
            tensors = [
                TensorEntry(
                    name=str(t["name"]),
                    shape=tuple(int(d) for d in t["shape"]),
                    dtype=str(t["dtype"]),
                    kind=str(t["kind"]),
                    parts=[
                        Part.from_json(p, roles[i] if i < len(roles) else "?")
                        for i, p in enumerate(t["parts"])
                    ],
                )
                for t in doc["tensors"]
            ]
            if version == 1 and ("task_info" in doc or "files" in doc):
                raise TypeError("version 1 headers have no task_info or files")
            if version < 3 and "frames" in doc:
                raise TypeError(f"version {version} headers have no frames")
            header = cls(
                scheme=str(doc["scheme"]),
                tasks=[str(t) for t in doc["tasks"]],
                tool_version=str(doc["tool_version"]),
                pretrained_fingerprint=str(doc["pretrained_fingerprint"]),
                tensors=tensors,
                error_correction=doc.get("error_correction"),
                task_info={
                    str(task): TaskInfo.from_json(info)
                    for task, info in doc.get("task_info", {}).items()
                },
                files={
                    str(sha): FileBlob(int(blob["size"]), int(blob["stored"]))
                    for sha, blob in doc.get("files", {}).items()
                },
                frames={str(role): int(size) for role, size in doc.get("frames", {}).items()},
                version=version,
            )
            if version >= 2 and set(header.task_info) != set(header.tasks):
                raise TypeError("task_info must describe every task")
        except TvqError:
            raise
        except (
            ValueError,
            KeyError,
            TypeError,
            AttributeError,
            ArithmeticError,
            RecursionError,
            IndexError,
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
                self._validate_parts(entry, expected_roles)
            elif entry.parts:
                raise TvqError(f"archive header entry for {entry.name} is malformed")
        framed = {p.role for t in self.tensors for p in t.parts if not p.dense and t.framed}
        if set(self.frames) != framed or any(size < 1 for size in self.frames.values()):
            raise TvqError("archive header lists the wrong frames")
        for sha, blob in self.files.items():
            if not SHA256_HEX.match(sha) or blob.size < 0 or blob.stored <= 0:
                raise TvqError(f"archive header file entry {sha[:16]!r} is malformed")
        entries = {t.name: t for t in self.tensors}
        for task, info in self.task_info.items():
            _validate_task(task, info, entries, self.files)

    def _validate_parts(self, entry: TensorEntry, expected_roles: set[str]) -> None:
        """A quantized entry has a part for every role; low-rate parts only in version 3 and
        in storage order (their role is their place), dense parts only on 2-D or more."""
        bad = TvqError(f"archive header entry for {entry.name} has the wrong roles")
        roles = [p.role for p in entry.parts]
        if set(roles) != expected_roles or len(roles) != len(expected_roles):
            raise bad
        low_rate = [p for p in entry.parts if not p.dense]
        if low_rate and (self.version < 3 or roles != self.roles):
            raise bad
        if not entry.shape or (len(entry.shape) < 2 and len(low_rate) < len(roles)):
            raise TvqError(f"archive header entry for {entry.name} is malformed")
        for part in entry.parts:
            if part.dense:
                part.spec  # noqa: B018 - validates bits and group size
                if part.codec == "zstd-c" and self.version < 3:
                    raise TvqError(f"archive header part {part.role!r} names an unknown method")
            elif (part.coded_nbytes == 0) != entry.framed:
                raise TvqError(f"archive header entry for {entry.name} has a bad coded size")


def _validate_task(
    task: str, info: TaskInfo, entries: dict[str, TensorEntry], files: dict[str, FileBlob]
) -> None:
    """A task record names only real tensors, float dtypes, stored files and safe paths."""

    def bad(what: str) -> TvqError:
        return TvqError(f"archive header record of task {task!r} is malformed ({what})")

    floats = {n for n, t in entries.items() if t.kind != "shared"}
    if info.source not in SOURCES:
        raise bad(f"source {info.source!r}")
    if info.fingerprint is not None and not FINGERPRINT_RE.match(str(info.fingerprint)):
        raise bad("fingerprint")
    if info.dtype is not None and info.dtype not in INPUT_FLOATS:
        raise bad(f"dtype {info.dtype!r}")
    if not set(info.dtypes) <= floats or not set(info.dtypes.values()) <= set(INPUT_FLOATS):
        raise bad("dtypes")
    for name, rows in info.rows.items():
        if name not in floats or not entries[name].shape or rows <= 0:
            raise bad(f"rows of {name}")
    for copy, original in info.copies.items():
        if copy in entries or original not in floats:
            raise bad(f"copy {copy}")
    if not set(info.absent) <= floats:
        raise bad("absent")
    for path, sha in info.files.items():
        parts = PurePosixPath(path).parts
        if sha not in files or not parts or path.startswith("/") or ".." in parts or "\\" in path:
            raise bad(f"file {path!r}")


def part_keys(part: Part, name: str) -> tuple[str, str, str]:
    """Keys of a part's codes, scales and zero-points."""
    prefix = f"{part.role}:{name}"
    return f"{prefix}:codes", f"{prefix}:scales", f"{prefix}:zeros"


def superscale_key(part: Part, name: str) -> str:
    """Key of a compact-scale part's fp32 super-scale (the top of its step grid)."""
    return f"{part.role}:{name}:superscale"


def record_key(part: Part, name: str) -> str:
    """Key of a low-rate part's record stored on its own (an entry too large for a frame)."""
    return f"{part.role}:{name}:dzans"


def frame_key(role: str) -> str:
    return f"frame:{role}"


def part_layout(part: Part, entry: TensorEntry) -> list[StoredTensor]:
    """The stored tensors of one quantized part: codes, scales, zero-points (+ super-scale);
    a low-rate part's record, unless it is in its role's frame."""
    if not part.dense:
        if entry.framed:
            return []
        return [StoredTensor(record_key(part, entry.name), "U8", (part.coded_nbytes,))]
    codes, scales, zeros = part_keys(part, entry.name)
    groups = group_count(entry.shape, part.group_size)
    if part.codec in sizes.CODED:
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


def rows_key(task: str, name: str) -> str:
    return f"rows:{task}:{name}"


def file_key(sha: str) -> str:
    return f"file:{sha}"


def entry_layout(header: ArchiveHeader, entry: TensorEntry) -> list[StoredTensor]:
    """The stored tensors of one tensor entry, in file order."""
    if entry.kind == "shared":
        return [StoredTensor(shared_key(entry.name), entry.dtype, entry.shape)]
    stored: list[StoredTensor] = []
    if entry.kind == "exact":
        for task in header.tasks:
            stored.append(StoredTensor(delta_key(task, entry.name), "F32", entry.shape))
    else:
        for part in entry.parts:
            stored.extend(part_layout(part, entry))
    for task in header.tasks:
        info = header.info(task)
        if entry.name in info.rows:
            shape = (info.rows[entry.name], *entry.shape[1:])
            stored.append(StoredTensor(rows_key(task, entry.name), info.dtype_of(entry), shape))
    return stored


def files_layout(header: ArchiveHeader) -> list[StoredTensor]:
    """The stored small files, after every tensor, in sha256 order."""
    return [
        StoredTensor(file_key(sha), "U8", (b.stored,)) for sha, b in sorted(header.files.items())
    ]


def frames_layout(header: ArchiveHeader) -> list[StoredTensor]:
    """The frames of low-rate records, one per role that has any, in storage order of roles."""
    return [
        StoredTensor(frame_key(role), "U8", (header.frames[role],))
        for role in header.roles
        if role in header.frames
    ]


def framed_entries(header: ArchiveHeader, role: str) -> list[TensorEntry]:
    """The entries whose record of `role` is in its frame, in frame order."""
    return [
        t
        for t in header.tensors
        if t.framed and any(p.role == role and not p.dense for p in t.parts)
    ]


def layout(header: ArchiveHeader) -> list[StoredTensor]:
    """Every stored tensor, in file order, derived from the header alone."""
    stored: list[StoredTensor] = []
    for entry in header.tensors:
        stored.extend(entry_layout(header, entry))
    return stored + frames_layout(header) + files_layout(header)


def bound_header(header: ArchiveHeader) -> ArchiveHeader:
    """The header with every coded size at its upper bound: the writer reserves its length."""
    tensors = [replace(t, parts=[p.coded_bound(t) for p in t.parts]) for t in header.tensors]
    frames = {
        role: sum(record_bound(t) for t in framed_entries(header, role)) for role in header.frames
    }
    return replace(header, tensors=tensors, frames=frames)


def storage_class(key: str) -> str:
    """What a stored tensor is for, for the byte accounting of `inspect`."""
    if key.startswith("file:"):
        return "files"
    if key.startswith(("delta:", "shared:", "rows:")):
        return "exact"
    return "codes" if key.startswith("frame:") or key.endswith((":codes", ":dzans")) else "scales"
