"""The contracts: input validation and argument plumbing, one module per op family.

A math module (`numpy_ref.layers`, `numpy_ref.models`, ...) reads as forward/backward pairs; the
checks every backend shares live here, so `kernels` calls the same functions and rejects the
same inputs with the same messages. Each function validates one public call and returns its
arguments normalised (arrays of the right rank and dtype, defaults filled in).
"""
