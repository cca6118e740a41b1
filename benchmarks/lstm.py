"""Recurrent problems and backends (the LSTM, the GRU and the Elman RNN) for the registry in
`benchmarks.cases`.

Problem: a `torch.nn.LSTM`-style stack (`nn.GRU`, `nn.RNN` with tanh for the ops "gru" and
"rnn"), time-major x [T, B, I], default zero initial states. forward+backward backpropagates
random cotangents of output, h_n and (LSTM) c_n (never ``.sum()``, which would give every
output the same weight), and returns the gradient of x and of every parameter. The reference is
`numpy_ref` in float64 on the same inputs (the float32 inputs upcast exactly).

Work: the matrix products the layer cannot avoid, per layer and direction (In = I for layer 0,
D*H above it; G = 4 gate blocks for the LSTM, 3 for the GRU, 1 for the RNN): forward, the input
product of all steps at once [T*B, In] @ [In, GH] and T - 1 recurrent products [B, H] @ [H, GH]
(step t needs h_{t-1}; h_0 is zero, so the first step needs none); backward, d_x [T*B, GH] @
[GH, In] and d_weight_ih [GH, T*B] @ [T*B, In] over all steps, T products d_h [B, GH] @ [GH, H]
back through the recurrence, and d_weight_hh [GH, T*B] @ [T*B, H]. The pointwise gate math is
not counted. The ceiling is the best BLAS time of exactly these products
(`benchmarks.ceilings`): what the LSTM would take if it were nothing but its matrix products.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import partial
from types import ModuleType

import numpy as np
import torch

import numpy_ref
from benchmarks.ceilings import Product, gemm_ceiling, gemm_work
from benchmarks.core import OP_PASSES, Backend, Prepared, Problem
from numpy_ref import init_gru_params, init_lstm_params, init_rnn_params
from torch_impl import reference
from torch_impl.precision import true_float32

FORWARD_NAMES = ("output", "h_n", "c_n")
GATES = {"lstm": 4, "gru": 3, "rnn": 1}
MODULES = {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN"}


@dataclass(frozen=True)
class LSTMInputs:
    """One LSTM problem's inputs, all of one dtype."""

    x: np.ndarray  # [T, B, I]
    params: dict[str, np.ndarray]  # torch.nn.LSTM state_dict names and shapes
    d_output: np.ndarray  # [T, B, D*H]  cotangent of output
    d_h_n: np.ndarray  # [L*D, B, H]  cotangent of h_n
    d_c_n: np.ndarray | None  # [L*D, B, H]  cotangent of c_n (the LSTM's only)
    num_layers: int
    bidirectional: bool
    mode: str = "lstm"  # "lstm", "gru" or "rnn"

    def astype(self, dtype: np.dtype) -> LSTMInputs:
        """The same inputs converted to `dtype` (exact when widening float32 to float64)."""
        return replace(
            self,
            x=self.x.astype(dtype),
            params={k: v.astype(dtype) for k, v in self.params.items()},
            d_output=self.d_output.astype(dtype),
            d_h_n=self.d_h_n.astype(dtype),
            d_c_n=None if self.d_c_n is None else self.d_c_n.astype(dtype),
        )


def lstm_problem(
    T: int,
    B: int,
    I: int,
    H: int,
    *,
    num_layers: int = 1,
    bidirectional: bool = True,
    suites: tuple[str, ...] = ("default",),
    sweep: tuple[str, str] | None = None,
    mode: str = "lstm",
) -> Problem:
    """An LSTM (mode "gru": a GRU, "rnn": a tanh RNN) of sequence length T, batch B, input size
    I and hidden size H (`sweep`: its family and swept size's name when it is a point of a size
    sweep)."""
    D = 2 if bidirectional else 1
    size = f"T{T},B{B},I{I},H{H}" + (f",L{num_layers}" if num_layers > 1 else "")
    size += ",bi" if bidirectional else ""

    def make(dtype: np.dtype, rng: np.random.Generator) -> LSTMInputs:
        init = {"lstm": init_lstm_params, "gru": init_gru_params, "rnn": init_rnn_params}[mode]
        params = init(I, H, num_layers=num_layers, bidirectional=bidirectional, rng=rng)
        inputs = LSTMInputs(
            x=rng.standard_normal((T, B, I)),
            params=params,
            d_output=rng.standard_normal((T, B, D * H)),
            d_h_n=rng.standard_normal((num_layers * D, B, H)),
            d_c_n=rng.standard_normal((num_layers * D, B, H)) if mode == "lstm" else None,
            num_layers=num_layers,
            bidirectional=bidirectional,
            mode=mode,
        )
        return inputs.astype(dtype)

    products = lstm_products(T, B, I, H, num_layers=num_layers, D=D, gates=GATES[mode])

    def work(pass_: str, dtype: np.dtype) -> float:
        return gemm_work(products[pass_])

    return Problem(
        op=mode,
        size=size,
        suites=suites,
        make=make,
        reference=lambda inputs, pass_: _numpy_lstm(inputs.astype(np.float64), pass_),
        work=work,
        ceilings={pass_: gemm_ceiling(products[pass_]) for pass_ in OP_PASSES},
        shape=dict(T=T, B=B, I=I, H=H, L=num_layers, bidirectional=bidirectional),
        sweep=sweep,
    )


def lstm_products(T: int, B: int, I: int, H: int, *, num_layers: int, D: int, gates: int = 4
                  ) -> dict[str, list[Product]]:
    """pass -> the matrix products of the layer with `gates` blocks (see the module
    docstring)."""
    G = gates
    forward, backward = [], []
    for layer in range(num_layers):
        In = I if layer == 0 else D * H
        forward += [Product(T * B, In, G * H, count=D)]
        if T > 1:  # the problems start from zero states: step 0 has no recurrent product
            forward.append(Product(B, H, G * H, count=D * (T - 1)))
        backward += [Product(T * B, G * H, In, count=D), Product(G * H, T * B, In, count=D),
                     Product(B, G * H, H, count=D * T), Product(G * H, T * B, H, count=D)]
    return {"forward": forward, "forward+backward": forward + backward}


def _numpy_lstm(inputs: LSTMInputs, pass_: str, module: ModuleType = numpy_ref
                ) -> dict[str, np.ndarray]:
    """`module`'s LSTM, GRU or RNN (numpy_ref's API) on `inputs`, in their dtype: the named
    forward outputs and gradients."""
    mode = inputs.mode
    output, state, cache = getattr(module, f"{mode}_forward")(
        inputs.x, inputs.params, num_layers=inputs.num_layers,
        bidirectional=inputs.bidirectional,
    )
    result = {"output": output, "h_n": state[0], "c_n": state[1]} if mode == "lstm" else \
        {"output": output, "h_n": state}
    if pass_ == "forward+backward":
        c_n = {"d_c_n": inputs.d_c_n} if mode == "lstm" else {}
        d_x, d_params, _ = getattr(module, f"{mode}_backward")(inputs.d_output, cache,
                                                               d_h_n=inputs.d_h_n, **c_n)
        result["d_x"] = d_x
        result.update({f"d_{k}": v for k, v in d_params.items()})
    return result


def module_backend(name: str, module: ModuleType, op: str = "lstm") -> Backend:
    """A CPU backend calling ``module.<op>_forward`` / ``module.<op>_backward`` (numpy_ref's
    signatures): numpy_ref itself, or kernels; unavailable while `module` lacks them."""

    def prepare(inputs: LSTMInputs, pass_: str) -> Prepared:
        return Prepared(run=partial(_numpy_lstm, inputs, pass_, module),
                        collect=lambda result: result)

    return Backend(name=name, op=op, device="cpu", passes=OP_PASSES, prepare=prepare,
                   available=lambda: hasattr(module, f"{op}_forward"))


def _prepare_torch(inputs: LSTMInputs, pass_: str, *, device: str) -> Prepared:
    """`torch.nn.LSTM` (GRU, RNN) holding the same weights (`torch_impl.reference`); forward
    under no_grad, backward by autograd."""
    if device == "cuda":
        # The numerical policy (README): TF32 would put float32 rows near 1e-3 of the reference.
        true_float32()
    x = torch.from_numpy(inputs.x).to(device)
    lstm = inputs.mode == "lstm"
    module = reference.recurrent_module(inputs.params, mode=MODULES[inputs.mode],
                                        num_layers=inputs.num_layers,
                                        bidirectional=inputs.bidirectional, dtype=x.dtype,
                                        device=device)

    def synchronize() -> None:
        if device == "cuda":  # CUDA calls return before the GPU is done; stop the clock after
            torch.cuda.synchronize()

    if pass_ == "forward":

        def run() -> tuple[torch.Tensor, ...]:
            with torch.no_grad():
                output, state = module(x)
            synchronize()
            return (output, *state) if lstm else (output, state)

        names = FORWARD_NAMES if lstm else FORWARD_NAMES[:2]
    else:
        x.requires_grad_(True)
        param_names, leaves = zip(*module.named_parameters(), strict=True)
        cotangents = tuple(torch.from_numpy(a).to(device)
                           for a in (inputs.d_output, inputs.d_h_n, inputs.d_c_n)
                           if a is not None)

        def run() -> tuple[torch.Tensor, ...]:
            output, state = module(x)
            outputs = (output, *state) if lstm else (output, state)
            grads = torch.autograd.grad(outputs, (x, *leaves), cotangents)
            synchronize()
            return (*(t.detach() for t in outputs), *grads)

        names = (*(FORWARD_NAMES if lstm else FORWARD_NAMES[:2]), "d_x",
                 *(f"d_{k}" for k in param_names))

    def collect(result: tuple[torch.Tensor, ...]) -> Mapping[str, np.ndarray]:
        return {k: t.cpu().numpy() for k, t in zip(names, result, strict=True)}

    return Prepared(run=run, collect=collect)


NUMPY_REF = module_backend("numpy_ref", numpy_ref)


def torch_backend(op: str, device: str) -> Backend:
    """torch's nn.LSTM / nn.GRU / nn.RNN for `op` on `device`."""
    return Backend(name="torch", op=op, device=device, passes=OP_PASSES,
                   prepare=partial(_prepare_torch, device=device), memory="torch",
                   **({"available": torch.cuda.is_available} if device == "cuda" else {}))


TORCH_CPU = torch_backend("lstm", "cpu")
TORCH_CUDA = torch_backend("lstm", "cuda")
