"""Which weights of a model folder belong to `nn.Linear` layers.

A packed (compressed-tensors) output may quantize only Linear weights: the loader builds packed
parameters for every Linear it is not told to ignore, and none for anything else (a GPT-2
`Conv1D` or an embedding is 2-D too, and packing it gives a model that loads and runs wrong).
That is a question about the architecture, not about shapes, so it is answered by building the
model from its `config.json` with transformers on the meta device: no weight is allocated or
read. transformers is imported only here, only when asked.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from ..errors import TvqError

CONFIG = "config.json"


def linear_layers(folder: Path) -> set[str] | None:
    """Module names of the model's Linear layers; None when transformers does not know the
    architecture (a model of one's own, such as the example zoo's)."""
    try:
        import transformers
    except ImportError:
        raise TvqError(
            "finding a model's Linear layers needs transformers: pip install 'tvq-cli[deploy]'"
        ) from None
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    except (ValueError, KeyError, OSError):
        return None
    architecture = next(iter(config.architectures or []), None)
    model_class = getattr(transformers, architecture, None) if architecture else None
    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            if model_class is not None:
                model = model_class(config)
            else:
                model = transformers.AutoModel.from_config(config)
    except Exception as exc:  # transformers raises many kinds for configs it cannot build
        raise TvqError(f"{folder}: transformers cannot build the model ({exc})") from None
    return {name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
