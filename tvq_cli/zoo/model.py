"""The zoo's backbone: a small pre-norm residual MLP whose tensor names carry the block index.

Names follow the usual transformer checkpoint layout (``layers.{i}.fc.weight``, ...), so that
code which groups or filters tensors by layer can be exercised on it. Heads live outside the
backbone, as with CLIP task vectors: a checkpoint is the backbone only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..errors import TvqError
from .data import N_PIXELS


@dataclass(frozen=True)
class BackboneConfig:
    """Architecture of the backbone; stored in every ``config.json``."""

    input_dim: int = N_PIXELS
    hidden_dim: int = 128
    num_layers: int = 6
    layer_norm_eps: float = 1e-5

    def to_dict(self) -> dict[str, object]:
        return {"model_type": "tvq-zoo-mlp", **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> BackboneConfig:
        fields = {k: d[k] for k in ("input_dim", "hidden_dim", "num_layers", "layer_norm_eps")}
        return cls(**fields)  # type: ignore[arg-type]


class ResidualBlock(nn.Module):
    """``x + fc(gelu(norm(x)))``: pre-norm keeps the residual stream easy to merge."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.fc = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc(nn.functional.gelu(self.norm(x)))


class Backbone(nn.Module):
    """64 pixels -> ``hidden_dim`` features (no classifier: heads are stored per task)."""

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Linear(config.input_dim, config.hidden_dim)
        self.layers = nn.ModuleList(
            ResidualBlock(config.hidden_dim, config.layer_norm_eps)
            for _ in range(config.num_layers)
        )
        self.final_norm = nn.LayerNorm(config.hidden_dim, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for layer in self.layers:
            h = layer(h)
        return self.final_norm(h)


def make_head(config: BackboneConfig, n_classes: int) -> nn.Linear:
    """A task's linear classifier on the backbone's features (saved as ``weight``/``bias``)."""
    return nn.Linear(config.hidden_dim, n_classes)


def backbone_state(model: Backbone) -> dict[str, torch.Tensor]:
    """A detached, contiguous float32 copy of the backbone weights, in a stable key order."""
    return {
        k: v.detach().to(torch.float32).contiguous().clone() for k, v in model.state_dict().items()
    }


def load_backbone(config: BackboneConfig, state: dict[str, torch.Tensor]) -> Backbone:
    """A backbone holding ``state`` (cast to float32); keys and shapes must match exactly.

    The throwaway random init runs on a forked RNG, so loading never shifts the caller's
    random stream (evaluating a checkpoint must not change what a seeded run does next).
    """
    with torch.random.fork_rng(devices=[]):
        model = Backbone(config)
    expected = model.state_dict()
    if set(state) != set(expected):
        missing = sorted(set(expected) - set(state))[:5]
        extra = sorted(set(state) - set(expected))[:5]
        raise TvqError(
            f"checkpoint does not match the zoo backbone: missing {missing}, unexpected {extra}"
        )
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise TvqError(
                f"tensor {k!r} has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}"
            )
    model.load_state_dict({k: v.to(torch.float32) for k, v in state.items()})
    model.eval()
    return model
