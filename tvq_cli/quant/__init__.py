"""Quantizer math: codes, ranges, compact scales, bit-packing, entropy coding. No file I/O."""
