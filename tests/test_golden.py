"""Golden vectors (`numpy_ref.golden`): written, verified, deterministic, and torch's semantics.

- `write` then `verify` passes, in-process (`main`) and through ``python -m numpy_ref.golden``;
  two writes (in two processes too) are byte-identical.
- `verify` catches damage, each time naming the case: an output or gradient off by 1e-3
  relative (hash updated, so only the value check can see it, and the stored tolerance alone
  rejects it), a perturbed input, bytes changed without the hash, a missing file, an extra
  file, a manifest entry with a wrong shape.
- The four cases the C consumer reads have exactly the format's tensor names, shapes, dtypes
  and metadata; a float32 case stores the float64 answer on its float32 inputs, rounded.
- The files mean what their semantics say, checked with torch (`torch_impl.reference`) and not
  numpy_ref: torch.nn.LSTMCell, torch.nn.LSTM on a packed batch, masked softmax attention,
  torch.nn.MultiheadAttention, F.cross_entropy, F.embedding, F.linear, the torch_impl models,
  F.layer_norm (and the Annotated Transformer's LayerNorm in torch ops), F.gelu,
  torch.nn.TransformerEncoderLayer / DecoderLayer and torch.nn.Transformer reproduce the
  stored outputs and gradients of the float64 files within 1e-10 (the Transformer's padding
  rows, which torch computes from what they hold, set to 0 as the files have them).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file, save_file

from numpy_ref import golden
from torch_impl import BiLSTMAttention, Seq2SeqAttention, load_numpy_, reference

REPO = Path(__file__).resolve().parents[1]
SPEC = ("lstm_cell-basic", "attention-scaled_dot_lengths")
TIGHT = 1e-10  # torch float64 against the stored float64 values


@pytest.fixture(scope="module")
def full(tmp_path_factory) -> Path:
    """Every case, written once."""
    d = tmp_path_factory.mktemp("golden")
    assert golden.main(["write", str(d)]) == 0
    return d


@pytest.fixture
def small(tmp_path) -> Path:
    """The four spec cases only, in a directory of their own (safe to damage)."""
    assert golden.main(["write", str(tmp_path), *[a for c in SPEC for a in ("--only", c)]]) == 0
    return tmp_path


def _manifest(d: Path) -> dict:
    return json.loads((d / "manifest.json").read_text())


def _rehash(d: Path, case: str) -> None:
    """Make the manifest's sha256 and size match the case's file as it is now."""
    m = _manifest(d)
    data = (d / f"{case}.safetensors").read_bytes()
    m["cases"][case].update(sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    (d / "manifest.json").write_text(json.dumps(m, indent=1))


def _rewrite(d: Path, case: str, tensor: str, change) -> tuple[float, float]:
    """Rewrite one tensor of a case with safetensors (metadata kept), rehash; returns the
    changed entry's (old, new) value."""
    path = d / f"{case}.safetensors"
    tensors = load_file(str(path))
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata()
    a = tensors[tensor].copy()
    j = np.unravel_index(np.argmax(np.abs(a)), a.shape)
    old = float(a[j])
    a[j] = change(a[j])
    tensors[tensor] = a
    save_file(tensors, str(path), metadata=meta)
    _rehash(d, case)
    return old, float(a[j])


def _problems(d: Path) -> list[str]:
    assert golden.main(["verify", str(d)]) == 1
    problems = golden.verify(d)
    assert problems
    return problems


# --------------------------------------------------------------------------------------------
# writing and verifying


def test_write_then_verify_every_case(full):
    m = _manifest(full)
    assert set(m["cases"]) == {n for n, _, _ in golden.all_cases()}
    assert golden.verify(full) == []
    assert golden.main(["verify", str(full)]) == 0
    families = {e["family"] for e in m["cases"].values()}
    assert families == {"lstm_cell", "lstm", "gru_cell", "gru", "rnn_cell", "rnn", "attention",
                        "multihead_attention", "embedding", "linear", "cross_entropy",
                        "bilstm_attention", "seq2seq", "layer_norm", "gelu",
                        "transformer_encoder_layer", "transformer_decoder_layer",
                        "transformer"}
    assert len(golden.CONFIGS) == 67 and len(m["cases"]) == 134
    total = sum(e["size"] for e in m["cases"].values())
    assert total < 4 << 20, f"the golden set is {total} bytes"
    for name, e in m["cases"].items():
        assert e["semantics"] and e["file"] == f"{name}.safetensors"
        for t, info in e["tensors"].items():
            role = t.split(".", 1)[0]
            assert info["role"] == role
            assert ("atol" in info) == (role in ("output", "grad", "cache")), (name, t)
            if info["dtype"] in ("F64", "F32"):
                assert info["dtype"] == {"float64": "F64", "float32": "F32"}[e["dtype"]]


def test_cli_in_a_subprocess_writes_what_main_writes(full, tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "numpy_ref.golden", *args], cwd=REPO,
                              capture_output=True, text=True, timeout=120)

    w = cli("write", str(tmp_path), "--only", "lstm_cell-basic")
    assert w.returncode == 0, w.stderr
    assert "wrote 2 files" in w.stdout and "RuntimeWarning" not in w.stderr
    v = cli("verify", str(tmp_path))
    assert v.returncode == 0 and "OK: 2 cases" in v.stdout, v.stdout + v.stderr
    for f in ("lstm_cell-basic-float64.safetensors", "lstm_cell-basic-float32.safetensors"):
        # another process: safetensors' metadata order would differ unless written sorted
        assert (tmp_path / f).read_bytes() == (full / f).read_bytes(), f
    listing = cli("list", str(tmp_path))
    assert listing.returncode == 0 and "grad.d_weight_ih" in listing.stdout


def test_rewrite_is_byte_identical(full, tmp_path):
    assert golden.main(["write", str(tmp_path)]) == 0
    names = sorted(p.name for p in full.iterdir())
    assert names == sorted(p.name for p in tmp_path.iterdir())
    for n in names:
        assert (full / n).read_bytes() == (tmp_path / n).read_bytes(), n


def test_only_patterns_and_stale_files(tmp_path):
    assert golden.main(["write", str(tmp_path), "--only", "linear-*-float32"]) == 0
    assert sorted(_manifest(tmp_path)["cases"]) == ["linear-basic-float32",
                                                    "linear-no_bias-float32"]
    assert golden.main(["write", str(tmp_path), "--only", "embedding-basic"]) == 0
    # the previous manifest's files are removed, so the directory verifies
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == [
        "embedding-basic-float32.safetensors", "embedding-basic-float64.safetensors"]
    assert golden.verify(tmp_path) == []
    assert golden.main(["write", str(tmp_path), "--only", "no_such_case"]) == 2


def test_float32_tolerances_are_tight(full):
    """The stored float32 allowance is far below a 1e-3 relative error of the tensor (for a
    gradient, of the case's largest gradient, the policy's scale)."""
    for name, e in _manifest(full)["cases"].items():
        if e["dtype"] != "float32":
            continue
        t = load_file(str(full / e["file"]))
        grad_scale = max(float(np.abs(a).max()) for k, a in t.items() if k.startswith("grad."))
        for k, info in e["tensors"].items():
            if "atol" not in info:
                continue
            assert info["rtol"] == 0.0 and info["atol"] > 0, (name, k)
            scale = grad_scale if k.startswith("grad.") else float(np.abs(t[k]).max())
            assert info["atol"] < 1e-4 * scale, (name, k, info["atol"], scale)


# --------------------------------------------------------------------------------------------
# damage is caught


@pytest.mark.parametrize(("case", "tensor"), [
    ("lstm_cell-basic-float64", "output.h_new"),
    ("lstm_cell-basic-float32", "output.c_new"),
    ("attention-scaled_dot_lengths-float64", "grad.d_keys"),
    ("attention-scaled_dot_lengths-float32", "output.context"),
    ("attention-scaled_dot_lengths-float32", "grad.d_query"),
])
def test_a_wrong_stored_value_fails(small, case, tensor):
    info = _manifest(small)["cases"][case]["tensors"][tensor]
    old, new = _rewrite(small, case, tensor, lambda v: v * (1 + 1e-3))
    assert abs(new - old) > info["atol"] + info["rtol"] * abs(old)  # the tolerance rejects it
    problems = _problems(small)
    assert all(p.startswith(f"{case}: ") for p in problems), problems
    assert any(tensor in p and "stored tolerance" in p for p in problems), problems
    assert not any("sha256" in p for p in problems)


@pytest.mark.parametrize("case", ["lstm_cell-basic-float64", "lstm_cell-basic-float32"])
def test_a_perturbed_input_fails(small, case):
    _rewrite(small, case, "input.x", lambda v: v * (1 + 1e-3))
    problems = _problems(small)
    assert all(p.startswith(f"{case}: ") for p in problems), problems
    assert any("output.h_new" in p for p in problems) and any("grad." in p for p in problems)


def test_changed_bytes_without_the_hash_fail(small):
    case = "attention-scaled_dot_lengths-float64"
    path = small / f"{case}.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # the last tensor's last byte: the file still parses
    path.write_bytes(bytes(data))
    problems = _problems(small)
    assert any(p.startswith(f"{case}: sha256") for p in problems), problems


def test_a_missing_file_fails(small):
    (small / "lstm_cell-basic-float32.safetensors").unlink()
    problems = _problems(small)
    assert problems == ["lstm_cell-basic-float32: file 'lstm_cell-basic-float32.safetensors' "
                        "missing (expected lstm_cell-basic-float32.safetensors)"]


def test_an_extra_file_fails(small):
    shutil.copy(small / "lstm_cell-basic-float32.safetensors", small / "stray.safetensors")
    assert _problems(small) == ["stray.safetensors: a file the manifest does not list"]


def test_a_wrong_shape_in_the_manifest_fails(small):
    m = _manifest(small)
    m["cases"]["attention-scaled_dot_lengths-float32"]["tensors"]["output.weights"][
        "shape"] = [2, 4, 3]
    (small / "manifest.json").write_text(json.dumps(m))
    problems = _problems(small)
    assert any(p.startswith("attention-scaled_dot_lengths-float32: tensor output.weights: "
                            "shape [2, 3, 4] in the file, [2, 4, 3]") for p in problems)


def test_a_renamed_tensor_fails(small):
    case = "lstm_cell-basic-float64"
    path = small / f"{case}.safetensors"
    t = load_file(str(path))
    t["grad.d_weights_ih"] = t.pop("grad.d_weight_ih")
    save_file(t, str(path))  # metadata dropped too
    _rehash(small, case)
    problems = _problems(small)
    assert any("grad.d_weight_ih is in the manifest but not in the file" in p for p in problems)
    assert any("metadata 'case'" in p for p in problems)


# --------------------------------------------------------------------------------------------
# the format's four cases


def _header(path: Path) -> dict:
    """The safetensors header, read with the standard library only."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n])


def _spec_tensors(B, I, H, Tq, Tk):
    cell = {"input.x": [B, I], "input.h": [B, H], "input.c": [B, H],
            "param.weight_ih": [4 * H, I], "param.weight_hh": [4 * H, H],
            "param.bias_ih": [4 * H], "param.bias_hh": [4 * H],
            "cotangent.d_h_new": [B, H], "cotangent.d_c_new": [B, H],
            "output.h_new": [B, H], "output.c_new": [B, H],
            "grad.d_x": [B, I], "grad.d_h": [B, H], "grad.d_c": [B, H],
            "grad.d_weight_ih": [4 * H, I], "grad.d_weight_hh": [4 * H, H],
            "grad.d_bias_ih": [4 * H], "grad.d_bias_hh": [4 * H], "cache.gates": [B, 4 * H]}
    Ba = 2
    att = {"input.query": [Ba, Tq, H], "input.keys": [Ba, Tk, H], "input.values": [Ba, Tk, H],
           "input.lengths": [Ba], "cotangent.d_context": [Ba, Tq, H],
           "cotangent.d_weights": [Ba, Tq, Tk], "output.context": [Ba, Tq, H],
           "output.weights": [Ba, Tq, Tk], "grad.d_query": [Ba, Tq, H],
           "grad.d_keys": [Ba, Tk, H], "grad.d_values": [Ba, Tk, H],
           "cache.scores": [Ba, Tq, Tk]}
    return {"lstm_cell-basic": cell, "attention-scaled_dot_lengths": att}


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("stem", SPEC)
def test_spec_cases_have_the_format_exactly(small, stem, dtype):
    case = f"{stem}-{dtype}"
    path = small / f"{case}.safetensors"
    header = _header(path)
    meta = header.pop("__metadata__")
    want = _spec_tensors(B=3, I=4, H=5, Tq=3, Tk=4)[stem]
    assert {k: v["shape"] for k, v in header.items()} == want
    fcode = {"float64": "F64", "float32": "F32"}[dtype]
    for k, v in header.items():
        assert v["dtype"] == ("I64" if k == "input.lengths" else fcode), k
    checked = [k for k in want if k.split(".")[0] in ("output", "grad", "cache")]
    keys = {"case", "family", "config", "op", "dtype", "semantics"}
    keys |= {f"{p}.{k}" for k in checked for p in ("atol", "rtol")}
    assert keys <= set(meta)
    assert meta["case"] == case and meta["dtype"] == dtype
    assert meta["op"] == stem.split("-")[0]  # what the C consumer dispatches on
    for k in checked:
        atol, rtol = float(meta[f"atol.{k}"]), float(meta[f"rtol.{k}"])
        assert repr(atol) == meta[f"atol.{k}"]
        if dtype == "float64":
            assert atol == rtol == 1e-7
        else:
            assert rtol == 0.0 and 0 < atol < 1e-5
    t = load_file(str(path))
    if stem == "attention-scaled_dot_lengths":
        assert meta["score"] == "scaled_dot" and meta["scale"] == repr(1 / math.sqrt(5))
        lengths = t["input.lengths"]
        assert lengths.min() >= 1 and lengths.max() <= 4 and lengths.min() < 4
        for b, n in enumerate(lengths):
            assert np.all(t["output.weights"][b, :, n:] == 0)
        raw = np.einsum("bqh,bkh->bqk", t["input.query"].astype(np.float64),
                        t["input.keys"].astype(np.float64)) / math.sqrt(5)
        np.testing.assert_allclose(t["cache.scores"], raw, rtol=1e-6 if dtype == "float32"
                                   else 1e-14, atol=1e-6 if dtype == "float32" else 1e-14)
    else:
        assert meta["proj_size"] == "0"
    if dtype == "float32":  # the float64 answer on the float32 inputs, rounded
        config = golden.CONFIGS[stem]
        split = {r: {k.split(".", 1)[1]: v for k, v in t.items() if k.startswith(r + ".")}
                 for r in golden.ROLES}
        exact = config.run(*[golden.cast(split[r], np.float64)
                             for r in ("input", "param", "cotangent")])
        for role, arrays in zip(("output", "grad", "cache"), exact, strict=True):
            for k, a in arrays.items():
                np.testing.assert_array_equal(t[f"{role}.{k}"], a.astype(np.float32))


# --------------------------------------------------------------------------------------------
# torch's semantics, independently of numpy_ref


def _t(a: np.ndarray, grad: bool = False) -> torch.Tensor:
    return torch.from_numpy(np.array(a)).requires_grad_(grad)


def _same(name: str, ours, stored: np.ndarray) -> None:
    got = ours.detach().numpy() if isinstance(ours, torch.Tensor) else np.asarray(ours)
    np.testing.assert_allclose(got, stored, rtol=TIGHT, atol=TIGHT, err_msg=name)


def _load(full: Path, case: str) -> tuple[dict, dict, dict, dict]:
    t = load_file(str(full / f"{case}.safetensors"))
    split = {r: {k.split(".", 1)[1]: v for k, v in t.items() if k.startswith(r + ".")}
             for r in golden.ROLES}
    return split["input"], split["param"], split["cotangent"], t


def _check_grads(t: dict, outputs: dict, cotangents: dict, leaves: dict) -> None:
    """Outputs against output.*, autograd of them under the cotangents against grad.d_*."""
    for k, v in outputs.items():
        _same(f"output.{k}", v, t[f"output.{k}"])
    names = list(leaves)
    grads = torch.autograd.grad([outputs[k] for k in cotangents],
                                [leaves[n] for n in names],
                                [_t(c) for c in cotangents.values()], allow_unused=True)
    stored = {k[len("grad.d_"):] for k in t if k.startswith("grad.")}
    assert stored == set(names), (stored ^ set(names))
    for n, g in zip(names, grads, strict=True):
        _same(f"grad.d_{n}", g, t[f"grad.d_{n}"])


def test_torch_lstm_cell(full):
    inp, par, cot, t = _load(full, "lstm_cell-basic-float64")
    cell = torch.nn.LSTMCell(4, 5).double()
    cell.load_state_dict({k: _t(v) for k, v in par.items()})
    x, h, c = (_t(inp[k], True) for k in ("x", "h", "c"))
    h_new, c_new = cell(x, (h, c))
    gates = x @ cell.weight_ih.T + cell.bias_ih + h @ cell.weight_hh.T + cell.bias_hh
    i, f, g, o = gates.chunk(4, 1)
    _same("cache.gates", torch.cat([i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()], 1),
          t["cache.gates"])
    _check_grads(t, {"h_new": h_new, "c_new": c_new},
                 {"h_new": cot["d_h_new"], "c_new": cot["d_c_new"]},
                 {"x": x, "h": h, "c": c, **dict(cell.named_parameters())})


def test_torch_lstm_packed_bidirectional_2layer(full):
    case = "lstm-bidirectional_2layer_lengths-float64"
    inp, par, cot, t = _load(full, case)
    options = _manifest(full)["cases"][case]["options"]
    assert options["num_layers"] == 2 and options["bidirectional"]
    T = inp["x"].shape[0]
    lstm = reference.recurrent_module(par, num_layers=2, bidirectional=True)
    x = _t(inp["x"], True)
    lengths = torch.from_numpy(inp["lengths"])
    assert sorted(lengths.tolist()) != lengths.tolist() and T in lengths.tolist()
    out, (h_n, c_n) = reference.run_packed(lstm, x, None, lengths)
    _check_grads(t, {"output": out, "h_n": h_n, "c_n": c_n},
                 {"output": cot["d_output"], "h_n": cot["d_h_n"], "c_n": cot["d_c_n"]},
                 {"x": x, **dict(lstm.named_parameters())})


def test_torch_lstm_all_options(full):
    inp, par, cot, t = _load(full, "lstm-all_options-float64")
    lstm = reference.recurrent_module(par, num_layers=2, bidirectional=True, batch_first=True)
    assert lstm.proj_size == 2
    x, h0, c0 = (_t(inp[k], True) for k in ("x", "h0", "c0"))
    out, (h_n, c_n) = reference.run_packed(lstm, x, (h0, c0), torch.from_numpy(inp["lengths"]))
    _check_grads(t, {"output": out, "h_n": h_n, "c_n": c_n},
                 {"output": cot["d_output"], "h_n": cot["d_h_n"], "c_n": cot["d_c_n"]},
                 {"x": x, "h0": h0, "c0": c0, **dict(lstm.named_parameters())})


@pytest.mark.parametrize(("case", "module"), [
    ("gru_cell-basic-float64", "GRUCell"), ("rnn_cell-tanh-float64", "RNNCell"),
    ("rnn_cell-relu_no_bias-float64", "RNNCell")])
def test_torch_gru_and_rnn_cells(full, case, module):
    inp, par, cot, t = _load(full, case)
    options = _manifest(full)["cases"][case]["options"]
    kw = {} if module == "GRUCell" else {"nonlinearity": options["nonlinearity"]}
    cell = getattr(torch.nn, module)(options["input_size"], options["hidden_size"],
                                     bias=options["bias"], dtype=torch.float64, **kw)
    cell.load_state_dict({k: _t(v) for k, v in par.items()})
    x, h = (_t(inp[k], True) for k in ("x", "h"))
    _check_grads(t, {"h_new": cell(x, h)}, {"h_new": cot["d_h_new"]},
                 {"x": x, "h": h, **dict(cell.named_parameters())})


@pytest.mark.parametrize("case", ["gru-basic-float64", "gru-bidirectional_2layer_lengths-float64",
                                  "gru-no_bias-float64", "rnn-tanh_bidirectional_lengths-float64",
                                  "rnn-relu_batch_first-float64"])
def test_torch_gru_and_rnn_layers_packed(full, case):
    inp, par, cot, t = _load(full, case)
    o = _manifest(full)["cases"][case]["options"]
    mode = case.split("-")[0].upper()
    kw = {"nonlinearity": o["nonlinearity"]} if mode == "RNN" else {}
    module = reference.recurrent_module(par, mode=mode, num_layers=o["num_layers"],
                                        bidirectional=o["bidirectional"],
                                        batch_first=o["batch_first"], **kw)
    x = _t(inp["x"], True)
    leaves = {"x": x}
    h0 = None
    if o["initial_state"]:
        h0 = leaves["h0"] = _t(inp["h0"], True)
    lengths = torch.from_numpy(inp["lengths"]) if "lengths" in inp else None
    out, h_n = reference.run_packed(module, x, h0, lengths)
    _check_grads(t, {"output": out, "h_n": h_n},
                 {"output": cot["d_output"], "h_n": cot["d_h_n"]},
                 {**leaves, **dict(module.named_parameters())})


def test_the_other_gru_against_its_formula(full):
    """The linear_before_reset=False files (torch has no such GRU) against the independent
    per-sequence writing of tests/test_gru_rnn.py, in torch ops with autograd."""
    from test_gru_rnn import Case, run_independent

    inp, par, cot, t = _load(full, "gru-linear_before_reset_false-float64")
    o = _manifest(full)["cases"]["gru-linear_before_reset_false-float64"]["options"]
    case = Case("gru", T=o["seq_len"], B=o["batch"], I=o["input_size"], H=o["hidden_size"],
                L=o["num_layers"], bidirectional=o["bidirectional"],
                batch_first=o["batch_first"], use_h0=True, bias=True,
                lengths=tuple(o["lengths"]), seed=0, linear_before_reset=False)
    got = run_independent(case, {"params": par, "x": inp["x"], "h0": inp["h0"], **cot}, False)
    for name in ("output", "h_n"):
        _same(f"output.{name}", got[name], t[f"output.{name}"])
    for name, value in got.items():
        if name.startswith("d_"):
            _same(f"grad.{name}", value, t[f"grad.{name}"])


def test_torch_attention_scaled_dot_lengths(full):
    inp, _, cot, t = _load(full, "attention-scaled_dot_lengths-float64")
    q, k, v = (_t(inp[n], True) for n in ("query", "keys", "values"))
    options = {"score": "scaled_dot", "lengths": torch.from_numpy(inp["lengths"])}
    _same("cache.scores", reference.attention_scores(q, k, score="scaled_dot"),
          t["cache.scores"])
    c, w = reference.attention(q, k, v, **options)
    sdpa, _ = reference.attention(q, k, v, **options, path="sdpa")
    _same("SDPA context", sdpa, t["output.context"])
    _check_grads(t, {"context": c, "weights": w},
                 {"context": cot["d_context"], "weights": cot["d_weights"]},
                 {"query": q, "keys": k, "values": v})


def test_torch_attention_heads_gqa_causal_bias(full):
    inp, _, cot, t = _load(full, "attention-heads_gqa_causal_bias_lengths-float64")
    q, k, v, bias = (_t(inp[n], True) for n in ("query", "keys", "values", "bias"))
    assert q.shape[1] > k.shape[1], "grouped-query heads"
    options = {"score": "dot", "lengths": torch.from_numpy(inp["lengths"]), "causal": True,
               "bias": bias}
    c, w = reference.attention(q, k, v, **options)
    sdpa, _ = reference.attention(q, k, v, **options, path="sdpa")
    _same("SDPA context", sdpa, t["output.context"])
    _check_grads(t, {"context": c, "weights": w},
                 {"context": cot["d_context"], "weights": cot["d_weights"]},
                 {"query": q, "keys": k, "values": v, "bias": bias})


def test_torch_multihead_attention(full):
    inp, par, cot, t = _load(full, "multihead_attention-key_padding_mask-float64")
    mha = torch.nn.MultiheadAttention(6, 2, batch_first=True).double()
    mha.load_state_dict({k: _t(v) for k, v in par.items()})
    q, k, v = (_t(inp[n], True) for n in ("query", "key", "value"))
    out, w = mha(q, k, v, key_padding_mask=torch.from_numpy(inp["key_padding_mask"]),
                 need_weights=True, average_attn_weights=True)
    _check_grads(t, {"output": out, "weights": w},
                 {"output": cot["d_output"], "weights": cot["d_weights"]},
                 {"query": q, "key": k, "value": v, **dict(mha.named_parameters())})


def test_torch_multihead_attention_without_weights(full):
    """need_weights=False: torch's other path (a query may see no key there without NaN)."""
    inp, par, cot, t = _load(full, "multihead_attention-no_weights_key_padding_mask-float64")
    assert "output.weights" not in t and "cotangent.d_weights" not in t
    mha = torch.nn.MultiheadAttention(6, 2, batch_first=True).double()
    mha.load_state_dict({k: _t(v) for k, v in par.items()})
    q, k, v = (_t(inp[n], True) for n in ("query", "key", "value"))
    out, w = mha(q, k, v, key_padding_mask=torch.from_numpy(inp["key_padding_mask"]),
                 need_weights=False)
    assert w is None
    _check_grads(t, {"output": out}, {"output": cot["d_output"]},
                 {"query": q, "key": k, "value": v, **dict(mha.named_parameters())})


@pytest.mark.parametrize("config", ["kdim_vdim_float_mask", "bool_attn_mask"])
def test_torch_multihead_attention_options(full, config):
    case = f"multihead_attention-{config}-float64"
    inp, par, cot, t = _load(full, case)
    o = _manifest(full)["cases"][case]["options"]
    mha = torch.nn.MultiheadAttention(o["embed_dim"], o["num_heads"], bias=o["bias"],
                                      kdim=o["kdim"], vdim=o["vdim"],
                                      batch_first=o["batch_first"]).double()
    mha.load_state_dict({k: _t(v) for k, v in par.items()})
    q, k, v = (_t(inp[n], True) for n in ("query", "key", "value"))
    out, w = mha(q, k, v, attn_mask=torch.from_numpy(inp["attn_mask"]), need_weights=True,
                 average_attn_weights=o["average_attn_weights"])
    _check_grads(t, {"output": out, "weights": w},
                 {"output": cot["d_output"], "weights": cot["d_weights"]},
                 {"query": q, "key": k, "value": v, **dict(mha.named_parameters())})


@pytest.mark.parametrize("config", ["mean", "ignore_index_label_smoothing_weight",
                                    "sum_spatial", "none_probabilities"])
def test_torch_cross_entropy(full, config):
    case = f"cross_entropy-{config}-float64"
    inp, _, cot, t = _load(full, case)
    o = _manifest(full)["cases"][case]["options"]
    logits = _t(inp["logits"], True)
    targets = torch.from_numpy(inp["targets"])
    if config in ("ignore_index_label_smoothing_weight", "sum_spatial"):
        assert (targets == o["ignore_index"]).any()
    loss = F.cross_entropy(logits, targets, ignore_index=o["ignore_index"],
                           reduction=o["reduction"], label_smoothing=o["label_smoothing"],
                           weight=_t(inp["weight"]) if "weight" in inp else None)
    _check_grads(t, {"loss": loss}, {"loss": cot["d_loss"]}, {"logits": logits})


@pytest.mark.parametrize("config", ["basic", "padding_idx"])
def test_torch_embedding(full, config):
    case = f"embedding-{config}-float64"
    inp, par, cot, t = _load(full, case)
    weight = _t(par["weight"], True)
    out = F.embedding(torch.from_numpy(inp["ids"]), weight,
                      padding_idx=_manifest(full)["cases"][case]["options"]["padding_idx"])
    _check_grads(t, {"out": out}, {"out": cot["d_out"]}, {"weight": weight})


@pytest.mark.parametrize("config", ["basic", "no_bias"])
def test_torch_linear(full, config):
    inp, par, cot, t = _load(full, f"linear-{config}-float64")
    x = _t(inp["x"], True)
    p = {k: _t(v, True) for k, v in par.items()}
    y = F.linear(x, p["weight"], p.get("bias"))
    _check_grads(t, {"y": y}, {"y": cot["d_y"]}, {"x": x, **p})


@pytest.mark.parametrize("case", ["bilstm_attention-default-float64",
                                  "bilstm_attention-seed_compatible-float64"])
def test_torch_classifier(full, case):
    inp, par, cot, t = _load(full, case)
    o = _manifest(full)["cases"][case]["options"]
    model = BiLSTMAttention(o["vocab_size"], o["embedding_dim"], o["n_hidden"],
                            o["num_classes"], seed_compatible=o["seed_compatible"]).double()
    load_numpy_(model, par)
    lengths = inp.get("lengths")
    logits, attention = model(torch.from_numpy(inp["ids"]),
                              None if lengths is None else torch.from_numpy(lengths))
    _check_grads(t, {"logits": logits, "attention": attention},
                 {"logits": cot["d_logits"], "attention": cot["d_attention"]},
                 dict(model.named_parameters()))


@pytest.mark.parametrize("config", ["luong_additive", "bahdanau", "luong_scaled_dot_2_layers",
                                    "bahdanau_2_layers"])
def test_torch_seq2seq(full, config):
    case = f"seq2seq-{config}-float64"
    inp, par, cot, t = _load(full, case)
    o = _manifest(full)["cases"][case]["options"]
    model = Seq2SeqAttention(o["src_vocab"], o["tgt_vocab"], o["embedding_dim"],
                             o["hidden_size"], decoder=o["decoder"], score=o["score"],
                             num_layers=o["num_layers"]).double()
    load_numpy_(model, par)
    logits, attention = model(torch.from_numpy(inp["src"]), torch.from_numpy(inp["tgt"]),
                              torch.from_numpy(inp["src_lengths"]))
    _check_grads(t, {"logits": logits, "attention": attention},
                 {"logits": cot["d_logits"], "attention": cot["d_attention"]},
                 dict(model.named_parameters()))


@pytest.mark.parametrize("config", ["affine", "no_affine", "annotated"])
def test_torch_layer_norm(full, config):
    case = f"layer_norm-{config}-float64"
    inp, par, cot, t = _load(full, case)
    o = _manifest(full)["cases"][case]["options"]
    x = _t(inp["x"], True)
    p = {k: _t(v, True) for k, v in par.items()}
    assert set(p) == ({"weight", "bias"} if o["elementwise_affine"] else set())
    if o["variant"] == "torch":
        y = F.layer_norm(x, (o["normalized_shape"],), p.get("weight"), p.get("bias"),
                         eps=o["eps"])
        _, mean, r = torch.native_layer_norm(x, (o["normalized_shape"],), None, None, o["eps"])
    else:  # the Annotated Transformer's: a_2 * (x - mean) / (std + eps) + b_2
        mean = x.mean(-1, keepdim=True)
        r = 1 / (x.std(-1, keepdim=True) + o["eps"])
        y = p["weight"] * (x - mean) * r + p["bias"]
    _same("cache.r", r, t["cache.r"])
    _same("cache.x_hat", (x - mean) * r, t["cache.x_hat"])
    _check_grads(t, {"y": y}, {"y": cot["d_y"]}, {"x": x, **p})


@pytest.mark.parametrize("config", ["exact", "tanh"])
def test_torch_gelu(full, config):
    case = f"gelu-{config}-float64"
    inp, _, cot, t = _load(full, case)
    x = _t(inp["x"], True)
    y = F.gelu(x, approximate=_manifest(full)["cases"][case]["options"]["approximate"])
    _check_grads(t, {"y": y}, {"y": cot["d_y"]}, {"x": x})


def _without_padding(out: torch.Tensor, kpm: np.ndarray | None, batch_first: bool
                     ) -> torch.Tensor:
    """out with the rows its key padding mask [N, T] marks set to 0, as the files store them
    (torch computes those rows from what they hold; its other rows never read them)."""
    if kpm is None:
        return out
    rows = torch.from_numpy(kpm if batch_first else kpm.T)[:, :, None]
    return out.masked_fill(rows, 0.0)


def _torch_mask(inp: dict, name: str) -> torch.Tensor | None:
    return torch.from_numpy(inp[name]) if name in inp else None


@pytest.mark.parametrize("config", ["post_norm_key_padding_mask", "pre_norm_causal_gelu"])
def test_torch_transformer_encoder_layer(full, config):
    case = f"transformer_encoder_layer-{config}-float64"
    inp, par, cot, t = _load(full, case)
    o = _manifest(full)["cases"][case]["options"]
    layer = torch.nn.TransformerEncoderLayer(
        o["d_model"], o["nhead"], o["dim_feedforward"], dropout=0.0,
        activation=o["activation"], layer_norm_eps=o["eps"], batch_first=o["batch_first"],
        norm_first=o["norm_first"], dtype=torch.float64)
    layer.load_state_dict({k: _t(v) for k, v in par.items()})
    src = _t(inp["src"], True)
    out = layer(src, src_mask=_torch_mask(inp, "src_mask"),
                src_key_padding_mask=_torch_mask(inp, "src_key_padding_mask"))
    out = _without_padding(out, inp.get("src_key_padding_mask"), o["batch_first"])
    _check_grads(t, {"out": out}, {"out": cot["d_out"]},
                 {"src": src, **dict(layer.named_parameters())})


@pytest.mark.parametrize("config", ["post_norm_causal_memory_key_padding_mask",
                                    "pre_norm_float_memory_mask"])
def test_torch_transformer_decoder_layer(full, config):
    case = f"transformer_decoder_layer-{config}-float64"
    inp, par, cot, t = _load(full, case)
    o = _manifest(full)["cases"][case]["options"]
    layer = torch.nn.TransformerDecoderLayer(
        o["d_model"], o["nhead"], o["dim_feedforward"], dropout=0.0,
        activation=o["activation"], layer_norm_eps=o["eps"], batch_first=o["batch_first"],
        norm_first=o["norm_first"], dtype=torch.float64)
    layer.load_state_dict({k: _t(v) for k, v in par.items()})
    tgt, memory = _t(inp["tgt"], True), _t(inp["memory"], True)
    out = layer(tgt, memory, tgt_mask=_torch_mask(inp, "tgt_mask"),
                memory_mask=_torch_mask(inp, "memory_mask"),
                memory_key_padding_mask=_torch_mask(inp, "memory_key_padding_mask"))
    _check_grads(t, {"out": out}, {"out": cot["d_out"]},
                 {"tgt": tgt, "memory": memory, **dict(layer.named_parameters())})


@pytest.mark.filterwarnings("ignore:enable_nested_tensor is True:UserWarning")
def test_torch_transformer(full):
    case = "transformer-two_layers_masks-float64"
    inp, par, cot, t = _load(full, case)
    o = _manifest(full)["cases"][case]["options"]
    model = torch.nn.Transformer(o["d_model"], o["nhead"], o["num_encoder_layers"],
                                 o["num_decoder_layers"], o["dim_feedforward"], dropout=0.0,
                                 dtype=torch.float64)
    model.load_state_dict({k: _t(v) for k, v in par.items()})
    src, tgt = _t(inp["src"], True), _t(inp["tgt"], True)
    out = model(src, tgt, tgt_mask=_torch_mask(inp, "tgt_mask"),
                **{k: _torch_mask(inp, k) for k in ("src_key_padding_mask",
                                                    "tgt_key_padding_mask",
                                                    "memory_key_padding_mask")})
    out = _without_padding(out, inp["tgt_key_padding_mask"], batch_first=False)
    _check_grads(t, {"out": out}, {"out": cot["d_out"]},
                 {"src": src, "tgt": tgt, **dict(model.named_parameters())})


def test_an_inflated_tolerance_fails_even_when_file_and_manifest_agree(small):
    """A wrong value hidden by a huge atol, written into both the file and the manifest (hash
    updated): verify recomputes the policy's tolerance and refuses the stored one."""
    case, tensor = "lstm_cell-basic-float32", "output.h_new"
    path = small / f"{case}.safetensors"
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(path))
    meta[f"atol.{tensor}"] = repr(1.0)
    tensors[tensor] = tensors[tensor] + np.float32(0.5)
    save_file(tensors, str(path), metadata=meta)
    m = _manifest(small)
    m["cases"][case]["tensors"][tensor]["atol"] = 1.0
    (small / "manifest.json").write_text(json.dumps(m))
    _rehash(small, case)
    problems = _problems(small)
    assert any(p.startswith(f"{case}: {tensor}: stored tolerance atol=1") for p in problems), \
        problems


@pytest.mark.parametrize("cases", [{}, [], {"x": 5}])
def test_a_manifest_without_usable_cases_fails(small, cases):
    m = _manifest(small)
    m["cases"] = cases
    (small / "manifest.json").write_text(json.dumps(m))
    problems = _problems(small)
    assert len(problems) == 1 and "manifest.json" in problems[0], problems


def test_write_to_an_unwritable_place_is_a_clean_error(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert golden.main(["write", str(blocker / "sub"), "--only", "lstm_cell-basic"]) == 2
    assert "error: cannot write to" in capsys.readouterr().err
