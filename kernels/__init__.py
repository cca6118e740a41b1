"""Numba-compiled versions of the hot ops, with the signatures of `numpy_ref`.

Nothing is exported yet: the fused attention core and the LSTM kernels arrive with the
kernels issue. Tests and benchmarks will swap backends by module (``numpy_ref`` <-> ``kernels``).
"""
