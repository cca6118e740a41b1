"""The C consumer of the golden files, examples/c/golden_check.c, built and run.

It is compiled warning-free (C11, -Wall -Wextra -Werror -pedantic) and run on the six cases
numpy_ref.golden writes for it: it must pass them all and name every output and gradient.
Then it must fail: one stored value moved just past its tolerance is exit code 1 naming that
tensor (and one moved by half its tolerance still passes, so the rule is the file's, not
looser or tighter), a moved debugging aid (cache.*) is reported but does not fail the run,
and a truncated or corrupt file, or a case it does not implement, is exit code 2 with a
message, never a crash.
Skipped when no C compiler is installed.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from numpy_ref import golden

SOURCE = Path(__file__).resolve().parent.parent / "examples" / "c" / "golden_check.c"
CASES = ("lstm_cell-basic-float64", "lstm_cell-basic-float32", "gru_cell-basic-float64",
         "gru_cell-basic-float32", "attention-scaled_dot_lengths-float64",
         "attention-scaled_dot_lengths-float32")
# no lengths (checked); a projection and the other GRU (refused)
EXTRA = ("attention-scaled_dot_many-float32", "lstm_cell-proj-float64",
         "gru_cell-linear_before_reset_false-float64")
COUNTED = {"lstm_cell": 9, "gru_cell": 7, "attention": 5}  # outputs and gradients per case
CHECKED = ("output.", "grad.")  # the roles the exit status counts; cache.* is a debugging aid


def _compiler() -> str | None:
    return shutil.which("cc") or shutil.which("gcc")


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the compiled checker, a directory with the six golden cases and the extra ones)."""
    cc = _compiler()
    if cc is None:
        pytest.skip("no C compiler (cc or gcc) on PATH")
    root = tmp_path_factory.mktemp("c_consumer")
    exe = root / "golden_check"
    flags = ["-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", "-pedantic"]
    r = subprocess.run([cc, *flags, str(SOURCE), "-o", str(exe), "-lm"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"compile failed (warnings are errors):\n{r.stdout}{r.stderr}"
    gold = root / "golden"
    golden.write(gold, only=[*CASES, *EXTRA])
    assert sorted(p.stem for p in gold.glob("*.safetensors")) == sorted([*CASES, *EXTRA])
    return exe, gold


def _run(exe: Path, *args: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True,
                          errors="replace", timeout=60)


def _row(stdout: str, tensor: str) -> str:
    """The table row of `tensor` (its line starts with the name)."""
    rows = [ln for ln in stdout.splitlines() if ln.split()[:1] == [tensor]]
    assert len(rows) == 1, f"expected one row for {tensor}, got {rows}\n{stdout}"
    return rows[0]


def _tensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata()
    return load_file(str(path)), meta


def _perturbed(src: Path, dst: Path, tensor: str, index: int, by: float) -> np.ndarray:
    """Copy `src` to `dst` with tensor's flat element `index` moved by `by`; metadata kept."""
    tensors, meta = _tensors(src)
    moved = tensors[tensor].copy()
    flat = moved.reshape(-1)
    flat[index] = flat.dtype.type(float(flat[index]) + by)
    tensors[tensor] = moved
    save_file(tensors, str(dst), metadata=meta)
    return moved


def _sections(stdout: str) -> dict[str, str]:
    """The output of each case: from its title line (the case name first) to its '=>' line."""
    sections, current = {}, None
    for line in stdout.splitlines():
        if line and not line.startswith(" ") and line.split()[0] in CASES:
            current = line.split()[0]
            sections[current] = ""
        elif current is not None:
            sections[current] += line + "\n"
            if line.strip().startswith("=>"):
                current = None
    return sections


def test_passes_every_case_and_names_every_tensor(build: tuple[Path, Path]) -> None:
    exe, gold = build
    r = _run(exe, gold)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stderr == ""
    sections = _sections(r.stdout)
    assert sorted(sections) == sorted(CASES), r.stdout
    for case, text in sections.items():
        tensors, _ = _tensors(gold / f"{case}.safetensors")
        checked = [n for n in tensors if n.startswith(CHECKED)]
        assert len(checked) == COUNTED[case.split("-")[0]], checked
        for name in checked:
            assert _row(text, name).split()[-1] == "ok", (case, name)
        for name in (n for n in tensors if n.startswith("cache.")):
            assert "ok (debug, not counted)" in _row(text, name), (case, name)
        assert f"=> {len(checked)} of {len(checked)} tensors pass" in text
    total = 2 * sum(COUNTED.values())
    assert r.stdout.strip().splitlines()[-1] == f"PASS: {total} of {total} tensors pass"


@pytest.mark.parametrize(("case", "tensor"), [
    ("lstm_cell-basic-float64", "output.h_new"),
    ("lstm_cell-basic-float32", "grad.d_weight_ih"),
    ("gru_cell-basic-float64", "grad.d_bias_hh"),
    ("gru_cell-basic-float32", "output.h_new"),
    ("attention-scaled_dot_lengths-float64", "grad.d_query"),
    ("attention-scaled_dot_lengths-float32", "output.weights"),
])
def test_a_value_past_its_tolerance_fails(build: tuple[Path, Path], tmp_path: Path, case: str,
                                          tensor: str) -> None:
    exe, gold = build
    src = gold / f"{case}.safetensors"
    tensors, meta = _tensors(src)
    want = tensors[tensor].reshape(-1).astype(np.float64)
    index = int(np.argmax(np.abs(want)))  # the largest entry: rtol matters there in float64
    allowed = float(meta[f"atol.{tensor}"]) + float(meta[f"rtol.{tensor}"]) * abs(want[index])
    bad = tmp_path / f"{case}.safetensors"
    _perturbed(src, bad, tensor, index, 3 * allowed)
    r = _run(exe, bad)
    assert r.returncode == 1, r.stdout + r.stderr
    row = _row(r.stdout, tensor)
    assert row.split()[-1] == "FAIL", row
    assert f" {index} [" in row, f"the worst error is reported at flat index {index}: {row}"
    assert "1 of " in r.stdout and "elements fail" in r.stdout
    others = [n for n in tensors if n.startswith(CHECKED) and n != tensor]
    assert all(_row(r.stdout, n).split()[-1] == "ok" for n in others)

    if case.endswith("float64"):  # half the allowance: still a pass (our own error is ~1e-16)
        _perturbed(src, bad, tensor, index, 0.5 * allowed)
        r = _run(exe, bad)
        assert r.returncode == 0, r.stdout + r.stderr


def test_a_moved_debugging_aid_is_shown_not_counted(build: tuple[Path, Path],
                                                   tmp_path: Path) -> None:
    exe, gold = build
    bad = tmp_path / "lstm_cell-basic-float64.safetensors"
    _perturbed(gold / bad.name, bad, "cache.gates", 4, 1.0)
    r = _run(exe, bad)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "over (debug, not counted)" in _row(r.stdout, "cache.gates")


def test_a_nan_fails(build: tuple[Path, Path], tmp_path: Path) -> None:
    exe, gold = build
    bad = tmp_path / "attention-scaled_dot_lengths-float32.safetensors"
    _perturbed(gold / bad.name, bad, "grad.d_values", 0, float("nan"))
    r = _run(exe, bad)
    assert r.returncode == 1, r.stdout + r.stderr
    assert _row(r.stdout, "grad.d_values").split()[-1] == "FAIL"


def test_a_truncated_or_corrupt_file_is_exit_code_2(build: tuple[Path, Path],
                                                    tmp_path: Path) -> None:
    exe, gold = build
    data = (gold / "attention-scaled_dot_lengths-float32.safetensors").read_bytes()
    header = int.from_bytes(data[:8], "little")
    bad = tmp_path / "bad.safetensors"
    broken = {
        "truncated in the data": data[:-1],
        "truncated in the header": data[: 8 + header // 2],
        "truncated in the length": data[:5],
        "empty": b"",
        "header length past the end": (len(data)).to_bytes(8, "little") + data[8:],
        "header not JSON": data[:8] + b"[" + data[9 : 8 + header] + data[8 + header :],
        "an offset past the end": data.replace(b'"data_offsets":[', b'"data_offsets":[9', 1),
    }
    for what, content in broken.items():
        bad.write_bytes(content)
        r = _run(exe, bad)
        assert r.returncode == 2, f"{what}: exit {r.returncode}\n{r.stdout}{r.stderr}"
        assert r.stderr.startswith("golden_check: ") and str(bad) in r.stderr, (what, r.stderr)
    # a good file next to a broken one: every file is checked, the broken one decides the exit
    bad.write_bytes(data[:-1])
    r = _run(exe, gold / "lstm_cell-basic-float64.safetensors", bad)
    assert r.returncode == 2
    assert "=> 9 of 9 tensors pass" in r.stdout and "1 file(s) could not be checked" in r.stdout
    r = _run(exe, tmp_path / "missing")
    assert r.returncode == 2 and "cannot open" in r.stderr


def test_other_cases_of_the_two_ops(build: tuple[Path, Path]) -> None:
    """Attention without lengths (every key seen) is checked; an LSTM cell with a projection,
    which this program does not implement, is refused by name (exit 2), not mis-checked."""
    exe, gold = build
    r = _run(exe, gold / "attention-scaled_dot_many-float32.safetensors")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "=> 5 of 5 tensors pass" in r.stdout
    r = _run(exe, gold / "lstm_cell-proj-float64.safetensors")
    assert r.returncode == 2 and "projection (param.weight_hr)" in r.stderr, r.stderr
    r = _run(exe, gold / "gru_cell-linear_before_reset_false-float64.safetensors")
    assert r.returncode == 2 and "linear_before_reset=false" in r.stderr, r.stderr
