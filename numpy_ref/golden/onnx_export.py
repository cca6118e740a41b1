r"""The golden cases as ONNX backend node tests: ``python -m numpy_ref.golden write --format onnx``.

Every golden case that one ONNX operator computes becomes a directory in exactly the layout of
ONNX's own node tests (``onnx/backend/test/data/node/<test>/``), so a runtime's backend-test
runner (``onnx.backend.test.runner.Runner``, ORT's ``onnx_test_runner``, ...) takes it as it
is::

    DIR/test_<family>_<config>_<dtype>/model.onnx     one node, every operand a graph input
    DIR/test_<...>/test_data_set_0/input_<i>.pb      onnx.TensorProto, graph input i
    DIR/test_<...>/test_data_set_0/output_<i>.pb     onnx.TensorProto, graph output i
    DIR/onnx_cases.json                              index: each directory's golden case,
                                                     operator, opset, dtype, tensor names,
                                                     the onnxruntime note; the skipped cases

The directory is the golden case's name with every run of other characters than letters and
digits made ``_`` and ``test_`` in front (the runners want the prefix): ``lstm-basic-float32``
is ``test_lstm_basic_float32``. The tensors carry the names of the node's formal parameters
(``X``, ``W``, ``R``, ``B``, ``sequence_lens``, ``initial_h``; ``Q``, ``K``, ``V``,
``attn_mask``; ...); an optional operand the case does not have is left out of the node (an
empty name) and of the graph. Every value is the golden case's own number: the inputs are the
stored inputs and parameters, the outputs the stored forward outputs (the float64 computation,
rounded for float32 cases), only moved into the operator's layout (a permutation of gate
blocks, a transposition, a reshape; a bool mask and key lengths made one ``attn_mask``). ONNX
has no backward, so there are forward outputs only (no gradients, no caches). float64 and
float32 cases both go out, whatever the spec allows (it allows both for every operator here).

The mapping, per golden family
------------------------------
``lstm``, ``gru``, ``rnn`` (one layer) -> ``LSTM``, ``GRU``, ``RNN`` (opset 22).
    ``X`` [T, B, I] (a batch_first x is transposed; ONNX's ``layout=1`` is avoided, as
    onnxruntime's CPU kernels refuse it), ``W`` [D, G*H, I], ``R`` [D, G*H, H], ``B`` [D,
    2*G*H] from `numpy_ref.layouts.to_onnx` (gates LSTM i o f c, GRU z r h), ``sequence_lens``
    int32 [B] = the lengths, ``initial_h`` (``initial_c``) [D, B, H] = h0 (c0); attributes
    ``hidden_size``, ``direction`` (``forward`` or ``bidirectional``), GRU
    ``linear_before_reset`` (1 for torch's GRU, 0 for the other one), RNN ``activations``
    (``Tanh`` or ``Relu`` per direction). Outputs ``Y`` [T, D, B, H] (our output [T, B, D*H]
    split per direction: ``output.reshape(T, B, D, H).transpose(0, 2, 1, 3)``; 0 at padded
    steps), ``Y_h`` = h_n and ``Y_c`` = c_n [D, B, H].
``lstm_cell``, ``gru_cell``, ``rnn_cell`` -> the same node over one step (T = 1): ``X`` =
    x[None], ``initial_h`` = h[None] (``initial_c`` = c[None]); outputs ``Y_h`` = h_new[None]
    (``Y_c`` = c_new[None]), ``Y`` left out (it holds the same numbers).
``attention`` (dot and scaled_dot scores) -> ``Attention`` (opset 23), 4-D inputs: ``Q`` [B,
    h, Tq, D] (a query [B, Hq] is [B, 1, 1, Hq], queries [B, Tq, Hq] are [B, 1, Tq, Hq]),
    ``K``, ``V`` [B, h_kv, Tk, D] (keys [B, Tk, Hk] are [B, 1, Tk, Hk]); grouped-query heads
    map as they are (ONNX's query head i reads kv head i // (h / h_kv), as ours). ``scale``:
    left out when ours is 1/sqrt(D) (ONNX's default), else the attribute. ``attn_mask`` [B,
    h, Tq, Tk], broadcast out in full: bool (True = attend) from the lengths (key j < lengths[b])
    and the case's bool mask; when the case has a float bias, the bias with -inf where the
    lengths or the mask forbid. ``is_causal=1`` for a causal case (Tq = Tk there: ONNX's causal
    mask is i >= j). ``softcap`` when the case has one. Outputs ``Y`` = the context and
    ``qk_matmul_output`` with ``qk_matmul_output_mode=3`` (after the softmax) = the weights, in
    the 4-D shapes.
``layer_norm`` (torch's) -> ``LayerNormalization`` (opset 17): ``X``, ``Scale`` = weight (ones
    without the affine), ``B`` = bias (left out without it), ``axis=-1``, ``epsilon``,
    ``stash_type`` = the case's dtype; output ``Y``.
``gelu`` -> ``Gelu`` (opset 20), ``approximate`` ``none`` or ``tanh``.
``linear`` -> ``Gemm`` (opset 13): ``A`` = x as [N, I] (leading axes flattened), ``B`` =
    weight [O, I] with ``transB=1``, ``C`` = bias; ``Y`` = y as [N, O].
``embedding`` -> ``Gather`` (opset 13): ``data`` = weight, ``indices`` = ids; ``output``.
``cross_entropy`` (class-index targets, no label smoothing) -> ``SoftmaxCrossEntropyLoss``
    (opset 13): ``scores`` = logits, ``labels`` = targets, ``weights`` = the class weights;
    ``reduction``, ``ignore_index``; ``output`` = the loss.

Skipped, with the reason printed (`SKIP_REASONS`): the models, the Transformer layers and
multi-head attention (several operators each), projected LSTMs and stacks of more than one
recurrent layer, ``general`` and ``additive`` attention scores, the Annotated Transformer's
layer norm, cross entropy with label smoothing or probability targets, and float64 attention
cases whose scale (or softcap) is not a float32 number (ONNX's float attributes are 32-bit:
the outputs would move by ~1e-8). A float attribute that changes a float64 output by less than
1e-12 relative (LayerNormalization's epsilon) is written as it is.

onnxruntime's CPU provider runs float32 everywhere; float64 it cannot run for ``LSTM``,
``GRU``, ``RNN`` (no double kernels) and the exact ``Gelu`` (its function body's ``Erf`` has
no double kernel). Those directories are written all the same (the spec allows double), and
`ORT_UNSUPPORTED` names them, as does the printed summary and the index.

Two float64 limits are ONNX's or onnxruntime's, not the data's (`F64_NOTES`, printed too):
``Gelu`` is defined by a function body whose constants (sqrt(2), sqrt(2/pi), 0.044715) are
float32, so a runtime that expands it (onnxruntime, ``onnx.reference``) is ~1e-9 off in float64;
onnxruntime's CPU ``Attention`` multiplies Q and K by sqrt(scale) rounded to float32, ~1e-8 off
in float64 unless the scale is 1. ``onnx.reference`` runs the float64 attention exactly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from numpy_ref import layouts
from numpy_ref.golden.files import cast, compute, float_dtype, matches
from numpy_ref.golden.registry import ROLES, Arrays, Config, all_cases

__all__ = ["F64_NOTES", "INDEX", "ORT_UNSUPPORTED", "SKIP_REASONS", "OnnxCase",
           "directory_name", "export_case", "export_cases", "onnx_module", "onnxruntime_note",
           "skip_reason", "summary_lines", "write_onnx"]

INDEX = "onnx_cases.json"
DATA_SET = "test_data_set_0"
PRODUCER = "numpy_ref.golden"

# ------------------------------------------------------------------------------------------
# why a case is not written (a short key, counted, and what it means)

SKIP_REASONS: dict[str, str] = {
    "composite": "a model, a Transformer layer or multi-head attention with its projections: "
                 "several ONNX operators, no single one",
    "lstm_projection": "an LSTM with projections (proj_size): ONNX's LSTM has none",
    "num_layers": "num_layers > 1: an ONNX LSTM/GRU/RNN node is one layer",
    "attention_score": "attention score 'general' or 'additive': ONNX's Attention is "
                       "dot-product only",
    "attention_option": "an attention option ONNX's Attention lacks",
    "float32_attribute": "a float64 case whose scale or softcap is not a float32 number: "
                         "ONNX's float attributes are 32-bit, the outputs would move by ~1e-8",
    "layer_norm_variant": "the Annotated Transformer's layer norm (unbiased std, eps added to "
                          "the std): LayerNormalization divides by sqrt(var + eps)",
    "cross_entropy_option": "cross entropy with label smoothing or class-probability targets: "
                            "SoftmaxCrossEntropyLoss has neither",
    "no_mapping": "a family this exporter does not map to ONNX",
}

COMPOSITE = ("multihead_attention", "bilstm_attention", "seq2seq", "transformer",
             "transformer_encoder_layer", "transformer_decoder_layer")
ATTENTION_OPTIONS = {"score", "layout", "causal", "scale", "additive_bias", "heads",
                     "kv_heads", "mask", "bias_shape", "d_weights", "softcap"}
OPSETS = {"LSTM": 22, "GRU": 22, "RNN": 22, "Attention": 23, "LayerNormalization": 17,
          "Gelu": 20, "Gemm": 13, "Gather": 13, "SoftmaxCrossEntropyLoss": 13}
RECURRENT = {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN"}

# what onnxruntime's CPU provider cannot run: (operator, dtype, attribute condition) -> why
ORT_UNSUPPORTED: dict[tuple[str, str, str], str] = {
    ("LSTM", "float64", ""): "onnxruntime's CPU LSTM kernel is float32 only ('LSTM operator "
                             "does not support double yet')",
    ("GRU", "float64", ""): "onnxruntime's CPU GRU kernel is float32 only ('GRU operator does "
                            "not support double yet')",
    ("RNN", "float64", ""): "onnxruntime's CPU provider has no float64 RNN kernel",
    ("Gelu", "float64", "approximate=none"): "onnxruntime's CPU Gelu(approximate='none') runs "
                                             "its function body, whose Erf has no float64 "
                                             "kernel",
}

# float64 outputs that runtimes compute less exactly than the data: operator -> why
F64_NOTES: dict[str, str] = {
    "Attention": "onnxruntime's CPU Attention scales Q and K by sqrt(scale) rounded to float32: "
                 "float64 outputs ~1e-8 off unless the scale is 1 (onnx.reference: exact)",
    "Gelu": "ONNX's Gelu function body holds its constants as float32: a runtime expanding it "
            "(onnxruntime, onnx.reference) is ~1e-9 off in float64",
}


def onnx_module() -> Any:
    """The onnx package (the ``frameworks`` extra), imported on first use: numpy_ref and the
    safetensors golden files need no onnx."""
    try:
        import onnx
        import onnx.checker
        import onnx.helper
        import onnx.numpy_helper
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            "the ONNX golden format needs the onnx package: "
            "pip install \"lstm-attention-reference[frameworks]\" (or pip install onnx)") from e
    return onnx


def onnxruntime_note(op: str, dtype: str, attrs: dict[str, Any] | None = None) -> str | None:
    """Why onnxruntime's CPU provider cannot run an `op` node of `dtype` with `attrs`, or None
    when it can (the `ORT_UNSUPPORTED` table)."""
    for (o, d, cond), why in ORT_UNSUPPORTED.items():
        if o != op or d != dtype:
            continue
        if cond:
            key, value = cond.split("=", 1)
            if str((attrs or {}).get(key, "none")) != value:
                continue
        return why
    return None


# ------------------------------------------------------------------------------------------
# which cases go out


def _f32_exact(value: float) -> bool:
    return float(np.float32(value)) == float(value)


def _attention_scale_attr(config: Config) -> float | None:
    """The Attention node's ``scale`` attribute (None: ONNX's default 1/sqrt(head size))."""
    o = config.options
    q_last = _attention_head_size(config)
    scale = float(o["scale"])
    return None if scale == 1 / math.sqrt(q_last) else scale


def _attention_head_size(config: Config) -> int:
    rng = np.random.default_rng(config.seed)
    inputs, _, _ = config.make(rng)
    return int(inputs["query"].shape[-1])


def skip_reason(config: Config, dtype: str) -> str | None:
    """The `SKIP_REASONS` key of why the case (`config`, `dtype`) has no ONNX form, or None."""
    o, family = config.options, config.family
    if family in COMPOSITE:
        return "composite"
    if family in ("lstm", "lstm_cell") and o.get("proj_size"):
        return "lstm_projection"
    if family in RECURRENT:
        return "num_layers" if o.get("num_layers", 1) != 1 else None
    if family in ("lstm_cell", "gru_cell", "rnn_cell", "gelu", "linear", "embedding"):
        return None
    if family == "attention":
        if o.get("score") not in ("dot", "scaled_dot"):
            return "attention_score"
        if set(o) - ATTENTION_OPTIONS:
            return "attention_option"
        if dtype == "float64":
            scale = _attention_scale_attr(config)
            if (scale is not None and not _f32_exact(scale)) or (
                    o.get("softcap") is not None and not _f32_exact(o["softcap"])):
                return "float32_attribute"
        return None
    if family == "layer_norm":
        return None if o.get("variant") == "torch" else "layer_norm_variant"
    if family == "cross_entropy":
        return "cross_entropy_option" if o.get("label_smoothing") or o.get("probabilities") \
            else None
    return "no_mapping"


# ------------------------------------------------------------------------------------------
# one case


@dataclasses.dataclass(frozen=True)
class OnnxCase:
    """One golden case as an ONNX node test.

    inputs / outputs: ``(formal name, array)`` in the graph's order (the ``input_<i>.pb`` /
    ``output_<i>.pb`` order), optional operands the case lacks left out. ``onnxruntime``: why
    onnxruntime's CPU provider cannot run it, or None.
    """

    case: str  # the golden case, e.g. "lstm-basic-float32"
    directory: str  # "test_lstm_basic_float32"
    op: str  # the ONNX operator
    opset: int
    dtype: str  # "float64" or "float32"
    attributes: dict[str, Any]
    model: Any  # onnx.ModelProto
    inputs: list[tuple[str, np.ndarray]]
    outputs: list[tuple[str, np.ndarray]]
    onnxruntime: str | None


@dataclasses.dataclass
class _Node:
    op: str
    attrs: dict[str, Any]
    inputs: list[tuple[str, np.ndarray | None]]  # None: an optional operand left out
    outputs: list[tuple[str, np.ndarray | None]]


def directory_name(case: str) -> str:
    """``lstm-basic-float32`` -> ``test_lstm_basic_float32`` (the runners want ``test_``)."""
    return "test_" + re.sub(r"[^0-9A-Za-z]+", "_", case).strip("_")


def _case_arrays(config: Config, dtype: str) -> dict[str, Arrays]:
    """The golden case's stored inputs and params and its forward outputs, as
    `numpy_ref.golden.build_case` stores them (float64 answers rounded to a float32 case)."""
    fdt = float_dtype(dtype)
    drawn = config.make(np.random.default_rng(config.seed))
    stored = {role: cast(a, fdt) for role, a in zip(ROLES[:3], drawn, strict=True)}
    want = compute(config, *stored.values(), np.float64)
    return {"input": stored["input"], "param": stored["param"],
            "output": cast(want["output"], fdt)}


def _recurrent(config: Config, a: dict[str, Arrays]) -> _Node:
    """lstm / gru / rnn, one layer, and their cells (T = 1)."""
    family, o = config.family, config.options
    mode = family.removesuffix("_cell")
    inp, out = a["input"], a["output"]
    cell = family.endswith("_cell")
    params = {f"{k}_l0": v for k, v in a["param"].items()} if cell else a["param"]
    onnx_params = layouts.to_onnx(params, mode)
    D = onnx_params["W"].shape[0]
    H = onnx_params["R"].shape[2]
    attrs: dict[str, Any] = {"hidden_size": int(H),
                             "direction": "bidirectional" if D == 2 else "forward"}
    if mode == "gru":
        attrs["linear_before_reset"] = int(bool(o.get("linear_before_reset", True)))
    if mode == "rnn":
        attrs["activations"] = [o.get("nonlinearity", "tanh").capitalize()] * D
    if cell:
        x, h0 = inp["x"][None], inp["h"][None]
        c0 = inp["c"][None] if mode == "lstm" else None
        lengths = None
        y = None
        h_n = out["h_new"][None]
        c_n = out["c_new"][None] if mode == "lstm" else None
    else:
        bf = bool(o.get("batch_first"))
        x = inp["x"].transpose(1, 0, 2) if bf else inp["x"]
        h0, c0 = inp.get("h0"), inp.get("c0")
        lengths = inp.get("lengths")
        output = out["output"].transpose(1, 0, 2) if bf else out["output"]
        T, B = output.shape[:2]
        y = output.reshape(T, B, D, H).transpose(0, 2, 1, 3)
        h_n, c_n = out["h_n"], out.get("c_n")
    inputs: list[tuple[str, np.ndarray | None]] = [
        ("X", x), ("W", onnx_params["W"]), ("R", onnx_params["R"]), ("B", onnx_params.get("B")),
        ("sequence_lens", None if lengths is None else lengths.astype(np.int32)),
        ("initial_h", h0)]
    outputs: list[tuple[str, np.ndarray | None]] = [("Y", y), ("Y_h", h_n)]
    if mode == "lstm":
        inputs.append(("initial_c", c0))
        outputs.append(("Y_c", c_n))
    return _Node(RECURRENT[mode], attrs, inputs, outputs)


def _attention(config: Config, a: dict[str, Arrays]) -> _Node:
    o, inp, out = config.options, a["input"], a["output"]
    layout = o["layout"]
    q, k, v = inp["query"], inp["keys"], inp["values"]
    if layout == "single":
        q = q[:, None, None]
    elif layout == "many":
        q = q[:, None]
    if layout != "heads":
        k, v = k[:, None], v[:, None]
    B, h, Tq, _ = q.shape
    Tk = k.shape[2]
    shape = (B, h, Tq, Tk)
    context = out["context"].reshape(B, h, Tq, v.shape[-1])
    weights = out["weights"].reshape(shape)
    def full(m: np.ndarray) -> np.ndarray:  # broadcast to our weights' shape, then 4-D
        return np.broadcast_to(m, out["weights"].shape).reshape(shape)

    allowed = np.ones(shape, bool)
    if "lengths" in inp:
        allowed &= (np.arange(Tk) < inp["lengths"][:, None])[:, None, None, :]
    if "mask" in inp:
        allowed &= full(inp["mask"])
    mask: np.ndarray | None = None
    if "bias" in inp:
        mask = np.where(allowed, full(inp["bias"]), -np.inf).astype(q.dtype)
    elif "lengths" in inp or "mask" in inp:
        mask = allowed
    attrs: dict[str, Any] = {"qk_matmul_output_mode": 3}
    scale = _attention_scale_attr(config)
    if scale is not None:
        attrs["scale"] = scale
    if o.get("causal"):
        if Tq != Tk:  # pragma: no cover  (no such golden case; ONNX aligns i >= j + 0)
            raise ValueError("a causal attention case with Tq != Tk")
        attrs["is_causal"] = 1
    if o.get("softcap") is not None:
        attrs["softcap"] = float(o["softcap"])
    return _Node("Attention", attrs,
                 [("Q", q), ("K", k), ("V", v), ("attn_mask", mask)],
                 [("Y", context), ("present_key", None), ("present_value", None),
                  ("qk_matmul_output", weights)])


def _layer_norm(config: Config, a: dict[str, Arrays]) -> _Node:
    x, p = a["input"]["x"], a["param"]
    scale = p.get("weight", np.ones(x.shape[-1], x.dtype))
    stash = 11 if x.dtype == np.float64 else 1  # TensorProto.DOUBLE / FLOAT
    return _Node("LayerNormalization",
                 {"axis": -1, "epsilon": float(config.options["eps"]), "stash_type": stash},
                 [("X", x), ("Scale", scale), ("B", p.get("bias"))],
                 [("Y", a["output"]["y"])])


def _gelu(config: Config, a: dict[str, Arrays]) -> _Node:
    return _Node("Gelu", {"approximate": config.options["approximate"]},
                 [("X", a["input"]["x"])], [("Y", a["output"]["y"])])


def _linear(config: Config, a: dict[str, Arrays]) -> _Node:
    x, p, y = a["input"]["x"], a["param"], a["output"]["y"]
    return _Node("Gemm", {"transB": 1},
                 [("A", x.reshape(-1, x.shape[-1])), ("B", p["weight"]), ("C", p.get("bias"))],
                 [("Y", y.reshape(-1, y.shape[-1]))])


def _embedding(config: Config, a: dict[str, Arrays]) -> _Node:
    return _Node("Gather", {"axis": 0},
                 [("data", a["param"]["weight"]), ("indices", a["input"]["ids"])],
                 [("output", a["output"]["out"])])


def _cross_entropy(config: Config, a: dict[str, Arrays]) -> _Node:
    o, inp = config.options, a["input"]
    return _Node("SoftmaxCrossEntropyLoss",
                 {"reduction": o["reduction"], "ignore_index": int(o["ignore_index"])},
                 [("scores", inp["logits"]), ("labels", inp["targets"]),
                  ("weights", inp.get("weight"))],
                 [("output", a["output"]["loss"])])


_BUILDERS = {"lstm": _recurrent, "gru": _recurrent, "rnn": _recurrent,
             "lstm_cell": _recurrent, "gru_cell": _recurrent, "rnn_cell": _recurrent,
             "attention": _attention, "layer_norm": _layer_norm, "gelu": _gelu,
             "linear": _linear, "embedding": _embedding, "cross_entropy": _cross_entropy}


def _model(node: _Node, graph_name: str) -> Any:
    onnx = onnx_module()
    helper = onnx.helper

    def names(pairs):
        out = [n if a is not None else "" for n, a in pairs]
        while out and out[-1] == "":
            out.pop()
        return out

    def infos(pairs):
        return [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype),
                                              list(a.shape)) for n, a in pairs if a is not None]

    n = helper.make_node(node.op, names(node.inputs), names(node.outputs), **node.attrs)
    graph = helper.make_graph([n], graph_name, infos(node.inputs), infos(node.outputs))
    opsets = [helper.make_opsetid("", OPSETS[node.op])]
    model = helper.make_model(graph, opset_imports=opsets, producer_name=PRODUCER)
    model.ir_version = helper.find_min_ir_version_for(opsets)
    onnx.checker.check_model(model, full_check=True)
    return model


def export_case(config: Config, dtype: str) -> OnnxCase:
    """The golden case (`config`, `dtype`) as an ONNX node test (in memory).

    Raises ValueError naming the `SKIP_REASONS` key when the case has no ONNX form.
    """
    reason = skip_reason(config, dtype)
    if reason is not None:
        raise ValueError(f"{config.case(dtype)}: {reason}: {SKIP_REASONS[reason]}")
    node = _BUILDERS[config.family](config, _case_arrays(config, dtype))
    directory = directory_name(config.case(dtype))
    model = _model(node, directory)
    note = onnxruntime_note(node.op, dtype, node.attrs)
    return OnnxCase(config.case(dtype), directory, node.op, OPSETS[node.op], dtype,
                    dict(node.attrs), model,
                    [(n, np.array(a, order="C")) for n, a in node.inputs if a is not None],
                    [(n, np.array(a, order="C")) for n, a in node.outputs if a is not None],
                    note)


def export_cases(only: Sequence[str] | None = None
                 ) -> tuple[list[OnnxCase], dict[str, str]]:
    """Every golden case matching `only` (all when None; the ``--only`` rule): (the exported
    cases, {skipped case: `SKIP_REASONS` key}), in registry order."""
    exported, skipped = [], {}
    selected = [(n, c, d) for n, c, d in all_cases() if matches(n, only)]
    if not selected:
        raise ValueError(f"no case matches {list(only or [])}")
    for name, config, dtype in selected:
        reason = skip_reason(config, dtype)
        if reason is None:
            exported.append(export_case(config, dtype))
        else:
            skipped[name] = reason
    dirs = Counter(c.directory for c in exported)
    clash = [d for d, k in dirs.items() if k > 1]
    if clash:  # pragma: no cover  (case names differ in more than punctuation)
        raise ValueError(f"cases share a directory name: {clash}")
    return exported, skipped


# ------------------------------------------------------------------------------------------
# writing


def _stale(out: Path) -> set[str]:
    try:
        return set(json.loads((out / INDEX).read_text())["cases"])
    except (OSError, ValueError, KeyError, TypeError):
        return set()


def write_onnx(directory: str | Path, only: Sequence[str] | None = None) -> dict[str, Any]:
    """Write the ONNX node tests of the golden cases matching `only` into `directory` (see the
    module docstring) and the index ``onnx_cases.json``; directories that an earlier index
    listed and this one does not are removed. Returns the index (a dict)."""
    onnx = onnx_module()
    out = Path(directory)
    exported, skipped = export_cases(only)
    out.mkdir(parents=True, exist_ok=True)
    stale = _stale(out)
    cases = {}
    for c in exported:
        d = out / c.directory
        if d.exists():
            shutil.rmtree(d)
        (d / DATA_SET).mkdir(parents=True)
        onnx.save_model(c.model, str(d / "model.onnx"))
        for kind, tensors in (("input", c.inputs), ("output", c.outputs)):
            for i, (name, a) in enumerate(tensors):
                proto = onnx.numpy_helper.from_array(a, name)
                (d / DATA_SET / f"{kind}_{i}.pb").write_bytes(proto.SerializeToString())
        cases[c.directory] = {
            "case": c.case, "op": c.op, "opset": c.opset, "dtype": c.dtype,
            "attributes": c.attributes,
            "inputs": [n for n, _ in c.inputs], "outputs": [n for n, _ in c.outputs],
            "onnxruntime": c.onnxruntime or "runs"}
    for name in stale - set(cases):
        if re.fullmatch(r"test_[0-9A-Za-z_]+", name) and (out / name / "model.onnx").exists():
            shutil.rmtree(out / name)
    index = {
        "format": "ONNX backend node tests of numpy_ref's golden cases",
        "written_by": "python -m numpy_ref.golden write --format onnx",
        "cases": cases,
        "skipped": {n: {"reason": r, "why": SKIP_REASONS[r]} for n, r in skipped.items()},
    }
    (out / INDEX).write_text(json.dumps(index, indent=1) + "\n")
    return index


def summary_lines(index: dict[str, Any]) -> list[str]:
    """What `write_onnx` wrote and skipped, as printed by the command line: counts per
    operator and dtype, per skip reason, and the cases onnxruntime cannot run."""
    cases = index["cases"].values()
    per_op = Counter((c["op"], c["opset"], c["dtype"]) for c in cases)
    lines = [f"  {op} (opset {opset}) {dtype}: {n}" for (op, opset, dtype), n in
             sorted(per_op.items())]
    reasons = Counter(s["reason"] for s in index["skipped"].values())
    if reasons:
        lines.append(f"skipped {sum(reasons.values())} cases that no ONNX operator expresses:")
        lines += [f"  {n} x {r}: {SKIP_REASONS[r]}" for r, n in reasons.most_common()]
    no_ort = Counter((c["op"], c["dtype"], c["onnxruntime"]) for c in cases
                     if c["onnxruntime"] != "runs")
    runs = sum(c["onnxruntime"] == "runs" for c in cases)
    lines.append(f"onnxruntime (CPU) runs {runs} of them; written but not run by it:")
    lines += [f"  {n} x {op} {dtype}: {why}" for (op, dtype, why), n in sorted(no_ort.items())]
    noted = sorted({c["op"] for c in cases if c["dtype"] == "float64" and c["op"] in F64_NOTES})
    if noted:
        lines.append("float64 notes:")
        lines += [f"  {op}: {F64_NOTES[op]}" for op in noted]
    return lines
