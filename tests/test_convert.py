"""torch_impl.to_numpy / load_numpy_: round trip, no aliasing, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import numpy_ref as ref
from torch_impl import load_numpy_, to_numpy


def test_round_trip_is_exact_and_copies() -> None:
    lstm = torch.nn.LSTM(3, 5, num_layers=2, bidirectional=True, proj_size=2,
                         dtype=torch.float64)
    params = ref.init_lstm_params(3, 5, num_layers=2, bidirectional=True, proj_size=2, rng=0)
    load_numpy_(lstm, params)
    back = to_numpy(lstm)
    assert list(back) == list(params)
    for k in params:
        np.testing.assert_array_equal(back[k], params[k], err_msg=k)
    back["bias_ih_l0"][0] = 99.0  # a copy: the module is untouched
    assert lstm.bias_ih_l0[0].item() == params["bias_ih_l0"][0]


def test_load_numpy_names_missing_extra_and_misshaped_keys() -> None:
    lstm = torch.nn.LSTM(3, 5)
    params = ref.init_lstm_params(3, 5, rng=0)
    with pytest.raises(ValueError, match=r"missing keys \['bias_hh_l0'\]"):
        load_numpy_(lstm, {k: v for k, v in params.items() if k != "bias_hh_l0"})
    with pytest.raises(ValueError, match=r"unexpected keys \['extra'\]"):
        load_numpy_(lstm, {**params, "extra": np.zeros(1)})
    with pytest.raises(ValueError, match=r"params\['bias_ih_l0'\]: expected shape \(20,\)"):
        load_numpy_(lstm, {**params, "bias_ih_l0": np.zeros(19)})


def test_to_numpy_accepts_a_state_dict_read_back_by_torch_load(tmp_path) -> None:
    lstm = torch.nn.LSTM(3, 5, num_layers=2, bidirectional=True, dtype=torch.float64)
    path = tmp_path / "lstm.pt"
    torch.save(lstm.state_dict(), path)
    state = torch.load(path)
    from_file = to_numpy(state)
    from_module = to_numpy(lstm)
    assert list(from_file) == list(from_module)
    for k in from_module:
        assert from_file[k].dtype == from_module[k].dtype == np.float64, k
        np.testing.assert_array_equal(from_file[k], from_module[k], err_msg=k)
    # what it gives loads back into a fresh module exactly
    twin = load_numpy_(torch.nn.LSTM(3, 5, num_layers=2, bidirectional=True,
                                     dtype=torch.float64), from_file)
    for k, v in twin.state_dict().items():
        assert torch.equal(v, lstm.state_dict()[k]), k
    from_file["bias_ih_l0"][0] = 99.0  # a copy: the loaded tensors are untouched
    assert state["bias_ih_l0"][0].item() == lstm.bias_ih_l0[0].item() != 99.0


def test_to_numpy_accepts_any_mapping_of_tensors() -> None:
    from types import MappingProxyType

    state = MappingProxyType({"w": torch.arange(6.0).reshape(2, 3).requires_grad_()})
    out = to_numpy(state)
    assert list(out) == ["w"] and isinstance(out["w"], np.ndarray)
    np.testing.assert_array_equal(out["w"], np.arange(6.0, dtype=np.float32).reshape(2, 3))


def test_to_numpy_refuses_what_is_neither_a_module_nor_a_state_dict() -> None:
    with pytest.raises(TypeError, match=r"module\['b'\]: expected a torch.Tensor, got ndarray"):
        to_numpy({"a": torch.zeros(2), "b": np.zeros(2)})
    with pytest.raises(TypeError, match=r"module: expected a state_dict with str keys"):
        to_numpy({0: torch.zeros(2)})
    with pytest.raises(TypeError, match=r"module: expected a torch.nn.Module or a state_dict "
                                        r"\(a mapping of str to torch.Tensor\), got list"):
        to_numpy([torch.zeros(2)])
    with pytest.raises(TypeError, match=r"got Tensor"):
        to_numpy(torch.zeros(2))
