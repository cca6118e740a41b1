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
