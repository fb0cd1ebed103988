"""Error statistics of a reconstruction against its reference, accumulated tensor by tensor:
what `inspect --against` and `extract --against` report."""

from __future__ import annotations

import math

import torch


class ErrorStats:
    """Running sums for rel-L2, cosine, max-abs and SNR of a reconstruction."""

    def __init__(self) -> None:
        self.err2 = self.ref2 = self.hat2 = self.dot = 0.0
        self.max_abs = 0.0
        self.count = 0

    def add(self, ref: torch.Tensor, hat: torch.Tensor) -> None:
        ref64, hat64 = ref.reshape(-1).double(), hat.reshape(-1).double()
        diff = hat64 - ref64
        self.err2 += float(diff @ diff)
        self.ref2 += float(ref64 @ ref64)
        self.hat2 += float(hat64 @ hat64)
        self.dot += float(ref64 @ hat64)
        if diff.numel():
            self.max_abs = max(self.max_abs, float(diff.abs().max()))
        self.count += ref.numel()

    def merge(self, other: ErrorStats) -> None:
        self.err2 += other.err2
        self.ref2 += other.ref2
        self.hat2 += other.hat2
        self.dot += other.dot
        self.max_abs = max(self.max_abs, other.max_abs)
        self.count += other.count

    def as_dict(self) -> dict:
        """rel_l2 and snr_db are null where the reference is all zeros (undefined ratio)."""
        rel = (
            math.sqrt(self.err2 / self.ref2) if self.ref2 > 0 else (0.0 if self.err2 == 0 else None)
        )
        denom = math.sqrt(self.ref2 * self.hat2)
        cosine = self.dot / denom if denom > 0 else (1.0 if self.err2 == 0 else 0.0)
        if self.err2 == 0:
            snr = None
        else:
            snr = 10 * math.log10(self.ref2 / self.err2) if self.ref2 > 0 else None
        return {
            "rel_l2": rel,
            "cosine": cosine,
            "max_abs_error": self.max_abs,
            "snr_db": snr,
            "parameters": self.count,
        }
