"""Hand-written kernels: CPU matrix-vector products for decoding and float32 GEMMs for bf16 (``cpu``)."""
