"""The small files that travel with a model's weights in a Hugging Face folder.

A folder tvq writes gets *companion files*, an allow-list: the config, the generation
settings, the tokenizer in each format transformers reads, chat templates, processor configs,
and the model card and licence. Nothing else comes along: no other weights (`.bin`, `.pt`,
`.pth`, `.gguf`, `.onnx`, `onnx/`, `.npz`, ...), which would not match the tensors written, no
pickles, no training state, and no code (`modeling_*.py` runs with `trust_remote_code`). A
merged folder gets the pretrained folder's; an archive keeps each task's (`read_companions`,
within size caps: a file past them is left out and named) so that `tvq extract` gives a
complete folder.

config.json is made true to the weights written beside it (`fit_config`): transformers 5 loads
a model in its config's `dtype` (older readers: `torch_dtype`), so a stale value would load bf16
weights as fp32 (twice the memory) or fp32 weights as bf16; both keys get the dtype written.
Its `vocab_size` follows an embedding that grew (a LoRA adapter trained on a resized vocabulary
comes with the pretrained model's config).
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..dtypes import config_name
from ..errors import TvqError

CONFIG = "config.json"
TOKENIZER_FILES = (  # a tokenizer and its chat templates: taken whole from one folder
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tekken.json",
    "chat_template.jinja",
    "chat_template.json",
    "additional_chat_templates/*.jinja",
)
COMPANIONS = (  # names, or patterns of paths relative to the folder
    CONFIG,
    "generation_config.json",
    *TOKENIZER_FILES,
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
    "README.md",
    "LICENSE*",
    "NOTICE*",
    "USE_POLICY.md",
)
DTYPE_KEYS = ("dtype", "torch_dtype")
MAX_FILE_BYTES = 64 * 2**20  # covers the largest tokenizers (Gemma's 17 MB, Tekken's 15 MB)
MAX_FOLDER_BYTES = 64 * 2**20  # one task's companion files together


@dataclass
class Companions:
    """A model's companion files by path relative to its folder ('/'-separated), and those
    left out, with the reason."""

    files: dict[str, bytes] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    def overlay(self, other: Companions, patterns: tuple[str, ...]) -> Companions:
        """These files, with those matching `patterns` taken from `other` instead when it has
        any (a set such as a tokenizer's files is taken whole from one folder)."""
        taken = {p: d for p, d in other.files.items() if _matches(p, patterns)}
        if not taken:
            return self
        kept = {p: d for p, d in self.files.items() if not _matches(p, patterns)}
        return Companions({**kept, **taken}, self.skipped + other.skipped)


def _matches(path: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(path, p) for p in patterns)


def companion_files(folder: Path) -> list[str]:
    """The companion files in `folder`, as paths relative to it (symlinks followed: a hub
    cache's snapshot links to blobs)."""
    found = []
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        if path.is_file() and _matches(name, COMPANIONS):
            found.append(name)
    return found


def read_companions(folder: Path) -> Companions:
    """`folder`'s companion files, within the size caps."""
    result = Companions()
    total = 0
    for name in companion_files(folder):
        path = folder / name
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            result.skipped.append(f"{name} ({size:,} bytes, over the {MAX_FILE_BYTES:,} cap)")
            continue
        if total + size > MAX_FOLDER_BYTES:
            result.skipped.append(f"{name} (the folder's files pass {MAX_FOLDER_BYTES:,} bytes)")
            continue
        try:
            result.files[name] = path.read_bytes()
        except OSError as exc:
            raise TvqError(f"{path}: cannot read ({exc.strerror})") from None
        total += size
    return result


def copy_companions(source: Path, target: Path, dtype: str | None = None) -> None:
    """Copy `source`'s companion files into `target`; with `dtype` (a safetensors name), set
    config.json's dtype to it."""
    files = {name: (source / name).read_bytes() for name in companion_files(source)}
    if CONFIG in files and dtype is not None:
        files[CONFIG] = fit_config(files[CONFIG], dtype, where=source / CONFIG)
    write_companions(files, target)


def write_companions(files: dict[str, bytes], folder: Path) -> list[Path]:
    """Write files (relative paths) under `folder`; returns their paths."""
    written = []
    for name, data in sorted(files.items()):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        written.append(path)
    return written


def fit_config(
    data: bytes, dtype: str | None, vocab: dict[int, int] | None = None, where: object = CONFIG
) -> bytes:
    """config.json's bytes with `dtype` and `torch_dtype` set to `dtype` (a safetensors name;
    None leaves them), at the top level and in any sub-config that names a dtype (a multimodal
    model's text_config, ...), and a top-level `vocab_size` V replaced by `vocab[V]` where
    given. The bytes unchanged when nothing changes."""
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise TvqError(f"{where}: cannot set its dtype, not readable JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise TvqError(f"{where}: cannot set its dtype, not a JSON object")
    before = json.dumps(doc)

    def update(node: dict, top: bool) -> None:
        if top or any(key in node for key in DTYPE_KEYS):
            node.update(dict.fromkeys(DTYPE_KEYS, config_name(dtype)))
        for value in node.values():
            if isinstance(value, dict):
                update(value, False)

    if dtype is not None:
        update(doc, True)
    size = doc.get("vocab_size")
    if vocab and isinstance(size, int) and size in vocab:
        doc["vocab_size"] = vocab[size]
    if json.dumps(doc) == before:
        return data
    return (json.dumps(doc, indent=2) + "\n").encode()
