"""A Hugging Face config.json made true to the weights written beside it.

transformers >= 4.56 reads the dtype from `dtype` and older versions (and other readers: vLLM,
TGI, converters) from `torch_dtype`; since transformers 5 a model loads in the config's dtype by
default, so a config that names another dtype than the weights silently loads them cast (bf16
weights as fp32 at twice the memory, or fp32 weights cut to bf16). Both keys are written, equal.
`vocab_size` follows an embedding that grew (a LoRA adapter trained on a resized vocabulary
comes with the pretrained model's config).
"""

from __future__ import annotations

import json

from ..dtypes import CONFIG_DTYPES
from ..errors import TvqError

CONFIG_FILE = "config.json"


def fit_config(data: bytes, dtype: str | None, vocab: dict[int, int] | None = None) -> bytes:
    """config.json's bytes with `dtype` and `torch_dtype` set to `dtype` (a safetensors name,
    e.g. "BF16"; None leaves them) and `vocab_size` V replaced by `vocab[V]` where given.
    Unchanged bytes when nothing changes."""
    try:
        config = json.loads(data)
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except (ValueError, RecursionError) as exc:
        raise TvqError(f"{CONFIG_FILE} is not valid JSON ({exc})") from None
    before = dict(config)
    if dtype is not None:
        config["dtype"] = config["torch_dtype"] = CONFIG_DTYPES[dtype]
    size = config.get("vocab_size")
    if vocab and isinstance(size, int) and size in vocab:
        config["vocab_size"] = vocab[size]
    if config == before:
        return data
    return (json.dumps(config, indent=2) + "\n").encode()
