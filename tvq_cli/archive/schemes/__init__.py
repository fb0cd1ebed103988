"""Quantization schemes, one module each, registered by name: `get("rtvq")`."""

from . import fq, rtvq, tvq  # noqa: F401 - importing registers each scheme
from .base import REGISTRY, Inputs, RoleCoder, Scheme, get

__all__ = ["REGISTRY", "Inputs", "RoleCoder", "Scheme", "get"]
