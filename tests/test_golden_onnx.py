"""The golden cases as ONNX node tests (`numpy_ref.golden.onnx_export`, ``write --format onnx``).

- The command writes exactly the expected number of node tests per operator and dtype and
  skips exactly the expected number per reason, printing each reason with its count.
- Every directory has ONNX's node-test layout (``model.onnx``, ``test_data_set_0/input_<i>.pb``
  / ``output_<i>.pb`` named and typed as the graph's inputs and outputs) and passes
  ``onnx.checker.check_model(full_check=True)``.
- ONNX Runtime (CPU) and ONNX's reference evaluator run every model on its inputs and give its
  outputs: float64 within 1e-10, float32 within 1e-5 (of max(1, max|want|)), except the listed
  exclusions and precision deviations, each with its reason (and each checked still to hold).
- The exported numbers are the golden case's own: mapped back to our layouts by the inverse
  of each operator's mapping, written here, the inputs, parameters and outputs equal
  `numpy_ref.golden.build_case`'s tensors exactly.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("safetensors")

from onnx import numpy_helper  # noqa: E402
from onnx.reference import ReferenceEvaluator  # noqa: E402

from numpy_ref import golden, layouts  # noqa: E402
from numpy_ref.golden import onnx_export  # noqa: E402

EXPORTED = {  # (operator, dtype) -> node tests written
    ("LSTM", "float64"): 4, ("LSTM", "float32"): 4,  # lstm_cell-basic and three one-layer
    ("GRU", "float64"): 5, ("GRU", "float32"): 5,  # both cells and three layers
    ("RNN", "float64"): 3, ("RNN", "float32"): 3,
    ("Attention", "float64"): 11, ("Attention", "float32"): 12,  # heads_mask_scale: f32 only
    ("LayerNormalization", "float64"): 2, ("LayerNormalization", "float32"): 2,
    ("Gelu", "float64"): 2, ("Gelu", "float32"): 2,
    ("Gemm", "float64"): 2, ("Gemm", "float32"): 2,
    ("Gather", "float64"): 2, ("Gather", "float32"): 2,
    ("SoftmaxCrossEntropyLoss", "float64"): 2, ("SoftmaxCrossEntropyLoss", "float32"): 2,
}
SKIPPED = {"composite": 34, "attention_score": 12, "num_layers": 8, "lstm_projection": 6,
           "cross_entropy_option": 4, "layer_norm_variant": 2, "float32_attribute": 1}
# the golden families and the operator each maps to: none may export zero cases
FAMILY_OP = {"lstm": "LSTM", "lstm_cell": "LSTM", "gru": "GRU", "gru_cell": "GRU",
             "rnn": "RNN", "rnn_cell": "RNN", "attention": "Attention",
             "layer_norm": "LayerNormalization", "gelu": "Gelu", "linear": "Gemm",
             "embedding": "Gather", "cross_entropy": "SoftmaxCrossEntropyLoss"}

# onnxruntime's CPU provider cannot run these (checked: it still fails on each)
ORT_CANNOT = {
    ("LSTM", "float64"): "no float64 LSTM kernel ('LSTM operator does not support double yet')",
    ("GRU", "float64"): "no float64 GRU kernel ('GRU operator does not support double yet')",
    ("RNN", "float64"): "no float64 RNN kernel (NOT_IMPLEMENTED)",
    ("Gelu", "float64", "none"): "Gelu(approximate='none') runs its function body, whose Erf "
                                 "has no float64 kernel",
}
# onnx.reference cannot run these (checked: it still fails, or disagrees, on each)
REFERENCE_CANNOT = {
    "test_lstm_batch_first_lengths": "onnx.reference's LSTM ignores sequence_lens",
    "test_gru_linear_before_reset_false": "onnx.reference's GRU ignores sequence_lens",
    "test_rnn_cell_relu_no_bias": "onnx.reference's RNN knows no 'Relu' activation",
    "test_rnn_relu_batch_first": "onnx.reference's RNN knows no 'Relu' activation",
    "test_layer_norm_affine_float64": "onnx.reference's LayerNormalization has stash_type=1 "
                                      "only (a float64 case asks for 11, double statistics)",
    "test_layer_norm_no_affine_float64": "the same",
}
# runs, but to a looser float64 tolerance: (runtime, operator) -> (tolerance, why)
F64_LOOSER = {
    ("onnxruntime", "Attention"): (1e-7, "onnxruntime multiplies Q and K by sqrt(scale) "
                                         "rounded to float32 (exact only for scale 1)"),
    ("onnxruntime", "Gelu"): (1e-8, "ONNX's Gelu function body holds sqrt(2/pi) and 0.044715 "
                                    "as float32 constants"),
    ("reference", "Gelu"): (1e-8, "the same: onnx.reference runs Gelu's function body"),
}
TOL = {"float64": 1e-10, "float32": 1e-5}


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[Path, str, dict]:
    """Every case written with the command line once: (directory, stdout, index)."""
    d = tmp_path_factory.mktemp("onnx")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert golden.main(["write", "--format", "onnx", str(d)]) == 0
    return d, buf.getvalue(), json.loads((d / onnx_export.INDEX).read_text())


def _load(d: Path) -> tuple[object, list[np.ndarray], list[np.ndarray]]:
    model = onnx.load(str(d / "model.onnx"))
    data = d / "test_data_set_0"
    ins = [numpy_helper.to_array(onnx.load_tensor(str(data / f"input_{i}.pb")))
           for i in range(len(list(data.glob("input_*.pb"))))]
    outs = [numpy_helper.to_array(onnx.load_tensor(str(data / f"output_{i}.pb")))
            for i in range(len(list(data.glob("output_*.pb"))))]
    return model, ins, outs


def _feeds(model, ins) -> dict[str, np.ndarray]:
    return {i.name: a for i, a in zip(model.graph.input, ins, strict=True)}


def _err(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| / max(1, max |want|)."""
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, want.shape,
                                                                 got.dtype, want.dtype)
    if not want.size:
        return 0.0
    g, w = got.astype(np.float64), want.astype(np.float64)
    return float(np.abs(g - w).max() / max(1.0, float(np.abs(w).max())))


def _ort_cannot(entry: dict) -> str | None:
    return ORT_CANNOT.get((entry["op"], entry["dtype"])) or ORT_CANNOT.get(
        (entry["op"], entry["dtype"], entry["attributes"].get("approximate")))


def _reference_cannot(name: str) -> str | None:
    return next((why for prefix, why in REFERENCE_CANNOT.items() if name.startswith(prefix)),
                None)


def _tol(runtime: str, entry: dict) -> float:
    if entry["dtype"] == "float64" and (runtime, entry["op"]) in F64_LOOSER:
        return F64_LOOSER[runtime, entry["op"]][0]
    return TOL[entry["dtype"]]


# ------------------------------------------------------------------------------------------
# what is written


def test_counts_per_operator_dtype_and_skip_reason(written) -> None:
    _, stdout, index = written
    got = Counter((e["op"], e["dtype"]) for e in index["cases"].values())
    assert dict(got) == EXPORTED
    reasons = Counter(s["reason"] for s in index["skipped"].values())
    assert dict(reasons) == SKIPPED
    assert sum(EXPORTED.values()) + sum(SKIPPED.values()) == len(golden.all_cases())
    families = {c.family for _, c, _ in golden.all_cases()}
    exported_families = {e["case"].split("-")[0] for e in index["cases"].values()}
    for family, op in FAMILY_OP.items():
        if family in families:  # a family with golden cases exports some, in both dtypes
            assert family in exported_families, family
            assert got[op, "float64"] and got[op, "float32"], op
    assert f"wrote {sum(EXPORTED.values())} ONNX node tests" in stdout
    for (op, dtype), n in EXPORTED.items():
        assert f"{op} (opset {onnx_export.OPSETS[op]}) {dtype}: {n}\n" in stdout
    for reason, n in SKIPPED.items():
        assert f"{n} x {reason}: {onnx_export.SKIP_REASONS[reason]}" in stdout
    runs = sum(_ort_cannot(e) is None for e in index["cases"].values())
    assert f"onnxruntime (CPU) runs {runs} of them" in stdout
    assert runs == 54


def test_every_directory_has_the_node_test_layout(written) -> None:
    d, _, index = written
    dirs = {p.name for p in d.iterdir() if p.is_dir()}
    assert dirs == set(index["cases"])
    for name, entry in index["cases"].items():
        assert name == onnx_export.directory_name(entry["case"]) and name.startswith("test_")
        assert sorted(p.name for p in (d / name).iterdir()) == ["model.onnx", "test_data_set_0"]
        model, ins, outs = _load(d / name)
        onnx.checker.check_model(model, full_check=True)
        assert [n.op_type for n in model.graph.node] == [entry["op"]]
        assert [(o.domain, o.version) for o in model.opset_import] == [("", entry["opset"])]
        for kind, values, tensors, names in (
                ("input", model.graph.input, ins, entry["inputs"]),
                ("output", model.graph.output, outs, entry["outputs"])):
            assert [v.name for v in values] == names
            assert len(tensors) == len(values)
            for i, v in enumerate(values):
                proto = onnx.load_tensor(str(d / name / "test_data_set_0" / f"{kind}_{i}.pb"))
                assert proto.name == v.name
                assert proto.data_type == v.type.tensor_type.elem_type
                assert list(proto.dims) == [x.dim_value for x in v.type.tensor_type.shape.dim]
            floats = [t for t in tensors if t.dtype.kind == "f"]
            assert floats and all(t.dtype == np.dtype(entry["dtype"]) for t in floats)
        assert (entry["onnxruntime"] == "runs") == (_ort_cannot(entry) is None), name
        if _ort_cannot(entry):
            assert entry["onnxruntime"].startswith("onnxruntime's CPU")


def test_every_skip_is_named_with_its_reason(written) -> None:
    _, _, index = written
    families = Counter(n.split("-")[0] for n in index["skipped"])
    assert {f for f in families if f in FAMILY_OP} == {"lstm", "lstm_cell", "gru", "rnn",
                                                        "attention", "layer_norm",
                                                        "cross_entropy"}
    assert index["skipped"]["attention-heads_mask_scale-float64"]["reason"] == \
        "float32_attribute"
    assert "attention-heads_mask_scale-float32" not in index["skipped"]
    assert index["skipped"]["lstm-proj-float32"]["reason"] == "lstm_projection"
    assert index["skipped"]["transformer-two_layers_masks-float64"]["reason"] == "composite"
    for s in index["skipped"].values():
        assert s["why"] == onnx_export.SKIP_REASONS[s["reason"]]


# ------------------------------------------------------------------------------------------
# two runtimes


def _run(runtime: str, model, feeds):
    if runtime == "onnxruntime":
        session = ort.InferenceSession(model.SerializeToString(),
                                       providers=["CPUExecutionProvider"])
        return session.run(None, feeds)
    return ReferenceEvaluator(model).run(None, feeds)


@pytest.mark.parametrize("runtime", ["onnxruntime", "reference"])
def test_runtimes_reproduce_the_outputs(written, runtime) -> None:
    d, _, index = written
    ort.set_default_logger_severity(4)  # the expected failures print nothing
    worst: dict[tuple[str, str], float] = {}
    ran, problems = 0, []
    for name, entry in index["cases"].items():
        model, ins, outs = _load(d / name)
        cannot = _ort_cannot(entry) if runtime == "onnxruntime" else _reference_cannot(name)
        try:
            got = _run(runtime, model, _feeds(model, ins))
        except Exception as e:  # any runtime error is a "cannot run"
            if not cannot:
                problems.append(f"{name}: {runtime} failed: {e}")
            continue
        err = max(_err(np.asarray(g), w) for g, w in zip(got, outs, strict=True))
        if cannot:  # an exclusion that no longer holds must be dropped from the list
            if err <= TOL[entry["dtype"]]:
                problems.append(f"{name}: {runtime} now runs it (listed: {cannot})")
            continue
        ran += 1
        key = (entry["op"], entry["dtype"])
        worst[key] = max(worst.get(key, 0.0), err)
        if err > _tol(runtime, entry):
            problems.append(f"{name}: {runtime} error {err:.3g} > {_tol(runtime, entry):.3g}")
    assert not problems, "\n".join(problems)
    assert ran == (54 if runtime == "onnxruntime" else len(index["cases"]) - 10)
    print(f"\n{runtime}: worst error / max(1, max|want|) per operator and dtype")
    for (op, dtype), e in sorted(worst.items()):
        print(f"  {op} {dtype}: {e:.3g}")


# ------------------------------------------------------------------------------------------
# the numbers are the golden case's own


def _ours(entry: dict, config, onnx_in: dict, onnx_out: dict, want: dict) -> dict:
    """The exported tensors moved back to the golden layout: {golden tensor name: array}."""
    op, o = entry["op"], config.options
    family = config.family
    got: dict[str, np.ndarray] = {}
    if op in ("LSTM", "GRU", "RNN"):
        mode = op.lower()
        params = layouts.from_onnx(onnx_in["W"], onnx_in["R"], onnx_in.get("B"), mode=mode)
        if family.endswith("_cell"):
            got |= {f"param.{k.removesuffix('_l0')}": v for k, v in params.items()}
            got |= {"input.x": onnx_in["X"][0], "input.h": onnx_in["initial_h"][0],
                    "output.h_new": onnx_out["Y_h"][0]}
            if mode == "lstm":
                got |= {"input.c": onnx_in["initial_c"][0], "output.c_new": onnx_out["Y_c"][0]}
            return got
        got |= {f"param.{k}": v for k, v in params.items()}
        T, D, B, H = onnx_out["Y"].shape
        y = onnx_out["Y"].transpose(0, 2, 1, 3).reshape(T, B, D * H)
        swap = (lambda a: a.transpose(1, 0, 2)) if o["batch_first"] else (lambda a: a)
        got |= {"input.x": swap(onnx_in["X"]), "output.output": swap(y),
                "output.h_n": onnx_out["Y_h"]}
        if "sequence_lens" in onnx_in:
            got["input.lengths"] = onnx_in["sequence_lens"].astype(np.int64)
        if "initial_h" in onnx_in:
            got["input.h0"] = onnx_in["initial_h"]
        if mode == "lstm":
            got["output.c_n"] = onnx_out["Y_c"]
            if "initial_c" in onnx_in:
                got["input.c0"] = onnx_in["initial_c"]
        return got
    if op == "Attention":  # a head axis of one (and a query axis of one) inserted
        for ours, theirs in (("input.query", "Q"), ("input.keys", "K"), ("input.values", "V")):
            got[ours] = onnx_in[theirs].reshape(want[ours].shape)
        got["output.context"] = onnx_out["Y"].reshape(want["output.context"].shape)
        w = want["output.weights"]
        got["output.weights"] = onnx_out["qk_matmul_output"].reshape(w.shape)
        # attn_mask: the lengths, the bool mask and the float bias, in the weights' shape
        masks = [k for k in ("input.lengths", "input.mask", "input.bias") if k in want]
        assert ("attn_mask" in onnx_in) == bool(masks)
        if masks:
            allowed = np.ones(w.shape, bool)
            if "input.lengths" in want:
                lengths = want["input.lengths"].reshape(-1, *[1] * (w.ndim - 1))
                allowed &= np.arange(w.shape[-1]) < lengths
            if "input.mask" in want:
                allowed &= want["input.mask"]
            m = onnx_in["attn_mask"].reshape(w.shape)
            if "input.bias" in want:
                bias = np.broadcast_to(want["input.bias"], w.shape)
                np.testing.assert_array_equal(m, np.where(allowed, bias, -np.inf))
            else:
                np.testing.assert_array_equal(m, allowed)
            got |= {k: want[k] for k in masks}  # checked just above
        assert entry["attributes"].get("is_causal", 0) == int(o["causal"])
        return got
    if op == "LayerNormalization":
        got |= {"input.x": onnx_in["X"], "output.y": onnx_out["Y"]}
        if o["elementwise_affine"]:
            got |= {"param.weight": onnx_in["Scale"], "param.bias": onnx_in["B"]}
        else:
            assert "B" not in onnx_in and (onnx_in["Scale"] == 1).all()
        return got
    if op == "Gelu":
        return {"input.x": onnx_in["X"], "output.y": onnx_out["Y"]}
    if op == "Gemm":
        got |= {"input.x": onnx_in["A"].reshape(want["input.x"].shape),
                "param.weight": onnx_in["B"],
                "output.y": onnx_out["Y"].reshape(want["output.y"].shape)}
        if "C" in onnx_in:
            got["param.bias"] = onnx_in["C"]
        return got
    if op == "Gather":
        return {"param.weight": onnx_in["data"], "input.ids": onnx_in["indices"],
                "output.out": onnx_out["output"]}
    assert op == "SoftmaxCrossEntropyLoss"
    got |= {"input.logits": onnx_in["scores"], "input.targets": onnx_in["labels"],
            "output.loss": onnx_out["output"]}
    if "weights" in onnx_in:
        got["input.weight"] = onnx_in["weights"]
    return got


def test_exported_numbers_are_the_golden_cases(written) -> None:
    d, _, index = written
    configs = {c.case(dt): (c, dt) for _, c, dt in golden.all_cases()}
    for name, entry in index["cases"].items():
        config, dtype = configs[entry["case"]]
        want, _, _ = golden.build_case(config, dtype)
        model, ins, outs = _load(d / name)
        got = _ours(entry, config, _feeds(model, ins),
                    {v.name: a for v, a in zip(model.graph.output, outs, strict=True)}, want)
        expected = {k for k in want if k.split(".")[0] in ("input", "param", "output")}
        assert set(got) == expected, (name, set(got) ^ expected)
        for k, a in got.items():
            assert a.dtype == want[k].dtype, (name, k)
            np.testing.assert_array_equal(a, want[k], err_msg=f"{name}: {k}")


# ------------------------------------------------------------------------------------------
# the command line


def test_format_is_validated_and_safetensors_stays_the_default(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        golden.main(["write", "--format", "onnnx", str(tmp_path / "x")])
    assert e.value.code == 2
    assert "invalid choice: 'onnnx'" in capsys.readouterr().err
    assert golden.main(["write", str(tmp_path / "st"), "--only", "gelu-exact"]) == 0
    names = sorted(p.name for p in (tmp_path / "st").iterdir())
    assert names == ["gelu-exact-float32.safetensors", "gelu-exact-float64.safetensors",
                     "manifest.json"]


def test_only_and_stale_directories(tmp_path, capsys) -> None:
    d = tmp_path / "o"
    assert golden.main(["write", "--format", "onnx", str(d), "--only", "gelu"]) == 0
    assert sorted(p.name for p in d.iterdir()) == [
        "onnx_cases.json", "test_gelu_exact_float32", "test_gelu_exact_float64",
        "test_gelu_tanh_float32", "test_gelu_tanh_float64"]
    (d / "mine").mkdir()  # not ours: kept
    assert golden.main(["write", "--format", "onnx", str(d), "--only", "rnn_cell-tanh",
                        "--only", "lstm-proj"]) == 0
    assert sorted(p.name for p in d.iterdir()) == [
        "mine", "onnx_cases.json", "test_rnn_cell_tanh_float32", "test_rnn_cell_tanh_float64"]
    out = capsys.readouterr().out
    assert "2 x lstm_projection" in out and "1 x RNN float64" in out
    assert golden.main(["write", "--format", "onnx", str(d), "--only", "nothing"]) == 2
    assert "no case matches" in capsys.readouterr().err


def test_without_onnx_the_error_says_what_to_install(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(ModuleNotFoundError, match=r"lstm-attention-reference\[frameworks\]"):
        onnx_export.onnx_module()
    assert golden.main(["write", "--format", "onnx", str(tmp_path)]) == 2
    assert 'pip install "lstm-attention-reference[frameworks]"' in capsys.readouterr().err
