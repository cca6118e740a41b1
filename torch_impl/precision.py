"""True float32 on CUDA, for every comparison with torch and every torch benchmark row.

On an Ampere or later GPU torch may compute float32 matrix products and convolutions in TF32
(10 mantissa bits instead of 23): `true_float32` switches both off, process-wide, as a
comparison against our float32 results needs. It changes nothing on the CPU.
"""

from __future__ import annotations

import torch


def true_float32() -> None:
    """Switch off TF32 in torch's CUDA matmuls and cuDNN (process-wide, idempotent)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
