"""Compression for the edge: INT8 quantization and the edge bundle (`quantize`); structured pruning follows."""
