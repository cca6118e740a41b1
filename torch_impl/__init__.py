"""PyTorch counterparts of the `numpy_ref` models and the converters between the two.

`BiLSTMAttention`, `Seq2SeqAttention` and `Attention` are `nn.Module`s whose state_dicts are
the parameter dicts of `numpy_ref.models`; `to_numpy(module)` gives such a dict and
`load_numpy_(module, params)` loads one. The LSTM's counterpart is `torch.nn.LSTM` itself.
"""

from torch_impl.convert import load_numpy_, to_numpy
from torch_impl.modules import (
    Attention,
    BahdanauDecoder,
    BiLSTMAttention,
    LuongDecoder,
    Seq2SeqAttention,
)

__all__ = ["Attention", "BahdanauDecoder", "BiLSTMAttention", "LuongDecoder",
           "Seq2SeqAttention", "load_numpy_", "to_numpy"]
