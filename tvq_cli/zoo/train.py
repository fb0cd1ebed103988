"""The three training loops of the zoo: pretraining, linear probing, fine-tuning.

Fine-tuning keeps the task's head frozen at its linear probe (as CLIP task vectors keep the
zero-shot head frozen). That way one head per task serves every backbone: the pretrained one
(where it *is* the probe, the fair baseline), the fine-tuned ones, and any merge of them.
The learning rate is modest and the epochs few, so task vectors stay small next to the
weights, as they are for real fine-tunes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from .data import epoch_batches, jitter
from .model import Backbone, BackboneConfig, make_head


@dataclass(frozen=True)
class TrainConfig:
    """Every knob of the build; recorded in the manifest."""

    pretrain_epochs: int = 15
    pretrain_lr: float = 1e-3
    pretrain_weight_decay: float = 0.01
    pretrain_batch: int = 64
    probe_copies: int = 4  # jittered copies of the train set the probe is fitted on
    probe_steps: int = 150
    probe_lr: float = 2e-2
    finetune_epochs: int = 10
    finetune_lr: float = 2e-4
    finetune_batch: int = 64

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _set_deterministic(mode: bool, warn_only: bool = False) -> None:
    # The public setter also configures torch._inductor, and importing that costs ~2 s on a
    # small machine; the zoo never compiles anything, so set the flag on the core directly.
    setter = getattr(torch._C, "_set_deterministic_algorithms", None)
    if setter is None:
        torch.use_deterministic_algorithms(mode, warn_only=warn_only)
    else:
        setter(mode, warn_only=warn_only)


@contextmanager
def deterministic(seed: int, threads: int = 1) -> Iterator[None]:
    """Seeded, single-threaded, deterministic torch; restores the caller's settings after.

    One thread makes float reductions happen in a fixed order, so the same seed gives
    bit-identical checkpoints regardless of how many cores the machine has.
    """
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.set_num_threads(threads)
        _set_deterministic(True)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            _set_deterministic(old_det, warn_only=old_warn)
            torch.set_num_threads(old_threads)


def _adam(
    params: list[nn.Parameter], lr: float, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    # The fused CPU kernel is deterministic and several times faster for many small tensors.
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)


def _fit(
    model: Backbone,
    head: nn.Linear,
    opt: torch.optim.Optimizer,
    x: np.ndarray,
    y: np.ndarray,
    epochs: int,
    batch_size: int,
    rng: np.random.Generator,
) -> None:
    """Minibatch cross-entropy training on freshly jittered epochs; leaves ``model`` in eval."""
    model.train()
    for _ in range(epochs):
        for xb, yb in epoch_batches(x, y, rng, batch_size):
            logits = head(model(torch.from_numpy(xb)))
            loss = nn.functional.cross_entropy(logits, torch.from_numpy(yb))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()


def pretrain(
    config: BackboneConfig,
    x: np.ndarray,
    y: np.ndarray,
    cfg: TrainConfig,
    rng: np.random.Generator,
) -> Backbone:
    """Train a fresh backbone (plus a throwaway head) to classify ``y`` from jittered ``x``."""
    model = Backbone(config)
    head = make_head(config, int(y.max()) + 1)
    opt = _adam(
        [*model.parameters(), *head.parameters()], cfg.pretrain_lr, cfg.pretrain_weight_decay
    )
    _fit(model, head, opt, x, y, cfg.pretrain_epochs, cfg.pretrain_batch, rng)
    return model


def linear_probe(
    model: Backbone,
    x: np.ndarray,
    y: np.ndarray,
    n_classes: int,
    cfg: TrainConfig,
    rng: np.random.Generator,
) -> nn.Linear:
    """Fit a linear head on frozen features of jittered copies of ``x`` (full-batch Adam)."""
    xs = np.concatenate([jitter(x, rng) for _ in range(cfg.probe_copies)])
    ys = torch.from_numpy(np.tile(y, cfg.probe_copies))
    model.eval()
    with torch.no_grad():
        feats = model(torch.from_numpy(xs))
    head = make_head(model.config, n_classes)
    opt = _adam(list(head.parameters()), cfg.probe_lr)
    for _ in range(cfg.probe_steps):
        loss = nn.functional.cross_entropy(head(feats), ys)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    head.eval()
    for p in head.parameters():
        p.requires_grad_(False)
    return head


def finetune(
    model: Backbone,
    head: nn.Linear,
    x: np.ndarray,
    y: np.ndarray,
    cfg: TrainConfig,
    rng: np.random.Generator,
) -> Backbone:
    """Fine-tune ``model`` in place on one task through its frozen ``head``."""
    opt = _adam(list(model.parameters()), cfg.finetune_lr)
    _fit(model, head, opt, x, y, cfg.finetune_epochs, cfg.finetune_batch, rng)
    return model
