"""Quantizer math and dense bit-packing of integer codes."""
