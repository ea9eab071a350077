import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastinterp.kernels as K
from fastinterp.kernels import choose_backend, l2_normalize_rows


def test_automatic_choice_on_cpu(monkeypatch):
    monkeypatch.delenv(K.ENV_VAR, raising=False)
    x = torch.randn(3, 4)
    assert choose_backend("k", [x], cpu="torch") == "torch"
    assert choose_backend("k2", [x], cpu="numba", gpu=None) == "numba"
    assert K.last_backend["k"] == "torch" and K.last_backend["k2"] == "numba"


def test_environment_override(monkeypatch):
    x = torch.randn(3, 4)
    monkeypatch.setenv(K.ENV_VAR, "triton")
    assert choose_backend("k", [x], cpu="torch") == "triton"  # interpreter is on in tests
    assert choose_backend("numba-only", [x], cpu="numba", gpu=None) == "numba"  # no such form: ignored
    monkeypatch.setenv(K.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match="FASTINTERP_BACKEND"):
        choose_backend("k", [x], cpu="torch")


def test_explicit_backend_errors():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="choose one of"):
        choose_backend("k", [x], cpu="torch", backend="cupy")
    with pytest.raises(ValueError, match="has no 'numba' form"):
        choose_backend("k", [x], cpu="torch", backend="numba")


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        choose_backend("k", [torch.randn(2, 2)], cpu="torch", backend="triton")


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(0, 9), cols=st.integers(1, 70), scale=st.sampled_from([1e-3, 1.0, 1e3]))
def test_l2_normalize_triton_matches_torch(rows, cols, scale):
    x = torch.randn(rows, cols) * scale
    if rows:
        x[0] = 0.0  # a zero row stays zero
    got = l2_normalize_rows(x, backend="triton")
    want = l2_normalize_rows(x, backend="torch")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    if rows > 1:
        torch.testing.assert_close(want[1:].norm(dim=1), torch.ones(rows - 1))
        assert torch.all(want[0] == 0)


def test_l2_normalize_strided_input_and_errors():
    x = torch.randn(6, 10)[:, ::2]
    torch.testing.assert_close(l2_normalize_rows(x, backend="triton"), torch.nn.functional.normalize(x, dim=1))
    with pytest.raises(ValueError, match="2-D"):
        l2_normalize_rows(torch.randn(3))
    with pytest.raises(TypeError, match="floating"):
        l2_normalize_rows(torch.ones(2, 2, dtype=torch.int64))
