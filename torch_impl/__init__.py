"""PyTorch counterparts of the `numpy_ref` models and the converters between the two.

`to_numpy(module)` gives a `numpy_ref` parameter dict; `load_numpy_(module, params)` loads one.
The LSTM's counterpart is `torch.nn.LSTM` itself (same `state_dict` names).
"""

from torch_impl.convert import load_numpy_, to_numpy

__all__ = ["load_numpy_", "to_numpy"]
