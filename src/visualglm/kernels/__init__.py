"""Hand-written kernels: CPU matrix-vector products for decoding (``cpu_gemv``)."""
