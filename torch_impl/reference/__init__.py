"""The one torch reference of each op, shared by the tests, the benchmarks and the golden checks.

Each function takes torch tensors in the layouts and options of the `numpy_ref` op of the same
name and computes it with torch's own modules and functions, so that autograd gives the
gradients that ours are compared with:

- `attention` (and `attention_scores`, its first step): the scores written out in torch ops,
  a ``masked_fill`` of -inf, ``torch.softmax`` and ``@ values`` (``path="explicit"``, which
  also returns the weights), or ``F.scaled_dot_product_attention`` (``path="sdpa"``, the
  dot-product scores).
- `recurrent_module` / `run_packed`: ``nn.LSTM`` (``nn.GRU``, ``nn.RNN``) holding a `numpy_ref`
  parameter dict, run on a batch packed by its lengths (``pack_padded_sequence`` with
  ``enforce_sorted=False``), as torch users run a padded batch.
- `transformer_module` (`build_module` from sizes alone): ``nn.TransformerEncoderLayer``,
  ``nn.TransformerDecoderLayer``, their stacks or ``nn.Transformer`` holding a `numpy_ref`
  parameter dict, dropout 0, in train mode (torch's regular path); `layer_norm` (torch's and
  the Annotated Transformer's) and `feed_forward` in torch ops.

A reference is only useful if it is written independently of what it checks: nothing here
imports `numpy_ref` or `kernels`.
"""

from torch_impl.reference.attention import attention, attention_scores, from_heads, to_heads
from torch_impl.reference.recurrent import recurrent_module, run_packed
from torch_impl.reference.transformer import (
    build_module,
    feed_forward,
    layer_norm,
    transformer_module,
)

__all__ = ["attention", "attention_scores", "build_module", "feed_forward", "from_heads",
           "layer_norm", "recurrent_module", "run_packed", "to_heads", "transformer_module"]
