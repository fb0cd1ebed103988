"""The small files that travel with a model's weights in a Hugging Face folder.

A folder tvq writes gets the pretrained folder's *companion files*, an allow-list: the
config, the generation settings, the tokenizer in each format transformers reads, chat
templates, processor configs, and the model card and licence. Nothing else comes along: no
other weights (`.bin`, `.pt`, `.pth`, `.gguf`, `.onnx`, `onnx/`, `.npz`, ...), which would not
match the merged tensors, no pickles, no training state, and no code (`modeling_*.py` runs with
`trust_remote_code`).

When the weights' dtype changes (`--dtype`), config.json says so: transformers 5 loads a
model in its config's `dtype` (older readers: `torch_dtype`), so a stale value would load bf16
weights as fp32 (twice the memory) or fp32 weights as bf16. Both keys get the new value.
"""

from __future__ import annotations

import fnmatch
import json
import shutil
from pathlib import Path

from ..dtypes import config_name
from ..errors import TvqError

CONFIG = "config.json"
COMPANIONS = (  # names, or patterns of paths relative to the folder
    CONFIG,
    "generation_config.json",
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
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
    "README.md",
    "LICENSE*",
    "NOTICE*",
    "USE_POLICY.md",
)
DTYPE_KEYS = ("dtype", "torch_dtype")


def companion_files(folder: Path) -> list[str]:
    """The companion files in `folder`, as paths relative to it."""
    found = []
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        if path.is_file() and any(fnmatch.fnmatchcase(name, p) for p in COMPANIONS):
            found.append(name)
    return found


def copy_companions(source: Path, target: Path, dtype: str | None = None) -> None:
    """Copy `source`'s companion files into `target`; with `dtype` (a safetensors name), set
    config.json's dtype to it."""
    for name in companion_files(source):
        out = target / name
        out.parent.mkdir(parents=True, exist_ok=True)
        if name == CONFIG and dtype is not None:
            out.write_text(_with_dtype(source / name, config_name(dtype)))
        else:
            shutil.copyfile(source / name, out)


def _with_dtype(config: Path, dtype: str) -> str:
    """config.json with `dtype` and `torch_dtype` set to `dtype`, at the top level and in any
    sub-config that names a dtype (a multimodal model's text_config, ...)."""
    try:
        doc = json.loads(config.read_text())
    except (OSError, ValueError) as exc:
        raise TvqError(f"{config}: cannot set its dtype, not readable JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise TvqError(f"{config}: cannot set its dtype, not a JSON object")

    def update(node: dict, top: bool) -> None:
        if top or any(key in node for key in DTYPE_KEYS):
            node.update(dict.fromkeys(DTYPE_KEYS, dtype))
        for value in node.values():
            if isinstance(value, dict):
                update(value, False)

    update(doc, True)
    return json.dumps(doc, indent=2) + "\n"
