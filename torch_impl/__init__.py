"""PyTorch counterparts of the `numpy_ref` models and the converters between the two.

`BiLSTMAttention`, `Seq2SeqAttention`, `TransformerSeq2Seq` and `Attention` are `nn.Module`s
whose state_dicts are the parameter dicts of `numpy_ref.models`; `to_numpy(module)` gives such
a dict and `load_numpy_(module, params)` loads one. The recurrent layers' counterparts are
`torch.nn.LSTM`, `nn.GRU` and `nn.RNN` themselves; the models take ``cell="lstm" | "gru"``.

`torch_impl.functions` holds the autograd bridges (`attention`, `multihead_attention`, `lstm`,
`lstm_cell`, `gru`, `gru_cell`, `rnn`, `rnn_cell`): our hand-written forward/backward pairs as
differentiable torch ops. Every module takes ``backend="torch" | "numpy_ref" | "kernels"`` to
run its attention and recurrent layers on them. `torch_impl.reference` is the one torch
reference of each op that the tests, benchmarks and golden checks compare with.
`torch_impl.recorder` (`record`) records a module's intermediates under the names of
`numpy_ref.divergence`, so that `numpy_ref.first_divergence` can say where it goes wrong.
"""

try:
    import torch  # noqa: F401
except ModuleNotFoundError as e:  # numpy_ref needs NumPy alone; torch_impl adds torch
    raise ModuleNotFoundError("torch_impl needs PyTorch: pip install "
                              "'lstm-attention-reference[torch]'") from e

from torch_impl import functions, recorder
from torch_impl.convert import load_numpy_, to_numpy
from torch_impl.modules import (
    Attention,
    BahdanauDecoder,
    BiLSTMAttention,
    LuongDecoder,
    Seq2SeqAttention,
)
from torch_impl.recorder import Recorder, record
from torch_impl.transformer import TransformerSeq2Seq

__all__ = ["Attention", "BahdanauDecoder", "BiLSTMAttention", "LuongDecoder",
           "Recorder", "Seq2SeqAttention", "TransformerSeq2Seq", "functions", "load_numpy_",
           "record", "recorder", "to_numpy"]
