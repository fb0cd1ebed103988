"""The small non-weight files of a model folder that make it a complete model: config,
generation settings, tokenizer, chat templates, processor settings, model card and license.

An allowlist, not a denylist: what a folder may also hold (optimizer and trainer state,
pickled training arguments, ONNX and GGUF exports, checkpoints of earlier steps, remote code)
is never picked up. Each file is at most `MAX_FILE_BYTES` and a folder's files together at most
`MAX_FOLDER_BYTES`; a file past either cap is left out and named in `skipped`.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import TvqError

CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tekken.json",
    "chat_template.jinja",
    "chat_template.json",
    "additional_chat_templates/*.jinja",
)
PROCESSOR_FILES = (
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
)
CARD_FILES = ("README.md", "LICENSE", "LICENSE.md", "LICENSE.txt", "NOTICE", "USE_POLICY.md")
MODEL_FILES = CONFIG_FILES + TOKENIZER_FILES + PROCESSOR_FILES + CARD_FILES
MAX_FILE_BYTES = 64 * 2**20  # covers the largest tokenizers (Gemma's 17 MB, Tekken's 15 MB)
MAX_FOLDER_BYTES = 64 * 2**20


@dataclass
class ModelFiles:
    """A model's small files by path relative to its folder ('/'-separated), and those left
    out with the reason."""

    files: dict[str, bytes] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(len(d) for d in self.files.values())

    def overlay(self, other: ModelFiles, patterns: tuple[str, ...]) -> ModelFiles:
        """These files, with those matching `patterns` taken from `other` instead when it has
        any (a set such as a tokenizer's files is taken whole from one folder)."""
        taken = {p: d for p, d in other.files.items() if is_one_of(p, patterns)}
        if not taken:
            return self
        kept = {p: d for p, d in self.files.items() if not is_one_of(p, patterns)}
        return ModelFiles({**kept, **taken}, self.skipped + other.skipped)


def is_one_of(path: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(path, p) for p in patterns)


def model_file_paths(folder: Path) -> list[str]:
    """The allowlisted files present in `folder`, sorted."""
    found = []
    for pattern in MODEL_FILES:
        for path in folder.glob(pattern):
            if path.is_file():  # symlinks followed: a hub cache's snapshot links to blobs
                found.append(path.relative_to(folder).as_posix())
    return sorted(set(found))


def read_model_files(folder: Path) -> ModelFiles:
    """The allowlisted small files of a model folder, within the size caps."""
    result = ModelFiles()
    total = 0
    for rel in model_file_paths(folder):
        path = folder / rel
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            result.skipped.append(f"{rel} ({size:,} bytes, over the {MAX_FILE_BYTES:,} cap)")
            continue
        if total + size > MAX_FOLDER_BYTES:
            result.skipped.append(f"{rel} (the folder's files pass {MAX_FOLDER_BYTES:,} bytes)")
            continue
        try:
            result.files[rel] = path.read_bytes()
        except OSError as exc:
            raise TvqError(f"{path}: cannot read ({exc.strerror})") from None
        total += size
    return result


def write_model_files(files: dict[str, bytes], folder: Path) -> list[Path]:
    """Write files (relative paths) under `folder`; returns their paths."""
    written = []
    for rel, data in sorted(files.items()):
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        written.append(path)
    return written
