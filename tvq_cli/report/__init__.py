"""Reports: what an archive costs and what error it adds (`inspect`), and rich tables of any
report for people (`render`); the same dicts go out as JSON for pipelines."""

from .inspect import inspect_archive, quantization_settings, storage_summary

__all__ = ["inspect_archive", "quantization_settings", "storage_summary"]
