import numpy as np
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


# ----------------------------------------------------------------------------- the form tables
import ast  # noqa: E402
import importlib  # noqa: E402
import importlib.util  # noqa: E402
import inspect  # noqa: E402
import pathlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from fastinterp.kernels import dispatch  # noqa: E402
from fastinterp.kernels import head_mask, mi, nnls, normalize, pursuit, sinkhorn, sinkhorn_batch  # noqa: E402

KERNEL_MODULES = (normalize, head_mask, pursuit, nnls, mi, sinkhorn, sinkhorn_batch)
KERNELS_DIR = pathlib.Path(dispatch.__file__).parent


def test_every_kernel_has_a_table():
    declared = {}
    for module in KERNEL_MODULES:
        assert isinstance(module.FORMS, dict) and module.FORMS, module.__name__
        for kernel, forms in module.FORMS.items():
            assert dispatch.REGISTRY[kernel].forms is forms  # registered, not a copy
            assert forms and all(isinstance(f, dispatch.Form) and name == f.name for name, f in forms.items())
            declared.setdefault(kernel, module)
    assert set(declared) == {
        "l2_normalize_rows", "masked_head_projection", "pursuit_select", "pursuit_topk", "solve_gram",
        "nnls_gram", "nnls_coordinate_descent", "mi_curves", "mutual_info_score",
        "mutual_info_contingency", "sinkhorn", "sinkhorn_batched"}
    assert {k for k in dispatch.REGISTRY if not k.startswith("\0")} >= set(declared)
    # each kernel asks choose_backend, under its own name, for the form it runs; registered
    # kernels never describe their forms at the call (no cpu=/gpu=: the table says)
    sources = "".join(inspect.getsource(m) for m in KERNEL_MODULES)
    for kernel in declared:
        assert f'choose_backend("{kernel}"' in sources, kernel
    for module in KERNEL_MODULES:
        for node in ast.walk(ast.parse(inspect.getsource(module))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "choose_backend":
                assert not {kw.arg for kw in node.keywords} & {"cpu", "gpu"}, module.__name__
    assert set(pursuit.FORMS["pursuit_select"]) == {"triton", "torch", "torch-bf16-screen"}
    screen = pursuit.FORMS["pursuit_select"]["torch-bf16-screen"]
    assert screen.variant and screen.backend == "torch" and screen.device == "cpu"
    assert screen.switch_env == pursuit.SCREEN_ENV == "FASTINTERP_PURSUIT_SCREEN"
    assert mi.FORMS["mi_curves"]["numba"].device == "cpu" and mi.FORMS["mi_curves"]["numba"].needs == "numba"


def test_form_declarations_are_checked():
    with pytest.raises(ValueError, match="must start with one of"):
        dispatch.Form("cupy", print)
    with pytest.raises(ValueError, match="a variant is named"):
        dispatch.Form("torch-fast", print)  # a variant must say so
    with pytest.raises(ValueError, match="has no plain"):
        dispatch.register("bad", dispatch.Form("torch-x", print, variant=True), dispatch.triton_form(print))
    with pytest.raises(KeyError, match="not registered"):
        choose_backend("no-such-kernel", [])


# ----------------------------------------------------------------------------- last_backend names the form
def _signals(b=6, m=3000, d=32):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, d, generator=g)
    atoms = torch.nn.functional.normalize(torch.randn(m, d, generator=g), dim=1)
    return q, atoms


needs_screen = pytest.mark.skipif(not pursuit._bf16_screen_available(torch.device("cpu")),
                                  reason="this CPU has no native bf16 (screening unavailable)")


@needs_screen
def test_last_backend_names_screened_vs_exact_pursuit(monkeypatch):
    monkeypatch.delenv(pursuit.SCREEN_ENV, raising=False)
    monkeypatch.delenv(K.ENV_VAR, raising=False)
    q, atoms = _signals()
    auto = pursuit.select_atoms(q, atoms)
    assert K.last_backend["pursuit_select"] == "torch-bf16-screen"  # the automatic CPU pick at M >= 2048
    exact = pursuit.select_atoms(q, atoms, screen=False)
    assert K.last_backend["pursuit_select"] == "torch"
    assert torch.equal(auto[0], exact[0])  # same atoms; scores agree to fp32 rounding
    torch.testing.assert_close(auto[1], exact[1])
    # the form that ran is the form's own function, bit for bit
    direct = pursuit.FORMS["pursuit_select"]["torch-bf16-screen"].fn(
        q, atoms, torch.empty((6, 0), dtype=torch.int64), None, None, float("-inf"), False, None, None)
    assert all(torch.equal(a, b) for a, b in zip(auto, direct))
    pursuit.select_atoms(q, atoms[:100])  # below SCREEN_MIN_ATOMS: exact
    assert K.last_backend["pursuit_select"] == "torch"
    pursuit.select_atoms(q, atoms[:100], screen=True)
    assert K.last_backend["pursuit_select"] == "torch-bf16-screen"
    pursuit.select_atoms(q, atoms[:100], backend="torch-bf16-screen")  # explicit form name
    assert K.last_backend["pursuit_select"] == "torch-bf16-screen"
    pursuit.select_atoms(q, atoms, q2=q, dictionary2=atoms)  # q2: the screen does not apply
    assert K.last_backend["pursuit_select"] == "torch"
    pursuit.select_atoms(q, atoms, mask_value=0.0)
    assert K.last_backend["pursuit_select"] == "torch"
    pursuit.select_atoms(q.double(), atoms.double())
    assert K.last_backend["pursuit_select"] == "torch"
    monkeypatch.setenv(pursuit.SCREEN_ENV, "0")  # the variant's switch: env > the call's default
    pursuit.select_atoms(q, atoms)
    assert K.last_backend["pursuit_select"] == "torch"
    pursuit.select_atoms(q, atoms, screen=True)  # the call's own switch > env
    assert K.last_backend["pursuit_select"] == "torch-bf16-screen"
    monkeypatch.setenv(pursuit.SCREEN_ENV, "1")
    pursuit.select_atoms(q, atoms[:100])
    assert K.last_backend["pursuit_select"] == "torch-bf16-screen"
    monkeypatch.setenv(K.ENV_VAR, "triton")
    pursuit.select_atoms(q, atoms[:100])
    assert K.last_backend["pursuit_select"] == "triton"


def test_screen_unavailable_falls_back_unless_named(monkeypatch):
    monkeypatch.delenv(K.ENV_VAR, raising=False)
    monkeypatch.setitem(pursuit._screen_ok, "cpu", False)  # as on a CPU without native bf16
    assert dispatch.available_forms("pursuit_select")["torch-bf16-screen"] is False
    q, atoms = _signals()
    pursuit.select_atoms(q, atoms, screen=True)
    assert K.last_backend["pursuit_select"] == "torch"
    with pytest.raises(RuntimeError, match="'torch-bf16-screen' needs native bf16"):
        pursuit.select_atoms(q, atoms, backend="torch-bf16-screen")


def test_explicit_form_errors_are_clear():
    q, atoms = _signals(m=64)
    with pytest.raises(RuntimeError, match="does not apply to this call"):
        pursuit.select_atoms(q, atoms, q2=q, dictionary2=atoms, backend="torch-bf16-screen")
    with pytest.raises(ValueError, match="has no 'numba' form"):
        pursuit.select_atoms(q, atoms, backend="numba")
    with pytest.raises(ValueError, match="has no 'triton' form"):
        mi.mi_curves([[1, 2]], [[2]], backend="triton")
    with pytest.raises(ValueError, match="choose one of"):
        sinkhorn.sinkhorn([], [], np.ones((2, 2)), 1.0, backend="cuda")


def test_unavailable_numba_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(dispatch, "HAS_NUMBA", False)
    assert dispatch.available_backends()["numba"] is False
    assert dispatch.available_forms("mi_curves") == {"numba": False}
    with pytest.raises(RuntimeError, match="'numba' form needs numba"):
        mi.mi_curves([[1, 2]], [[2]], backend="numba")
    with pytest.raises(RuntimeError, match="'numba' form needs numba"):
        sinkhorn.sinkhorn_batched(None, None, [np.ones((2, 2))], 1.0)


def test_last_backend_for_numba_and_single_form_kernels():
    mi.mi_curves([[1, 2]], [[2]])
    assert K.last_backend["mi_curves"] == "numba"
    mi.mutual_info_score([0, 1, 1], [1, 0, 0])
    assert K.last_backend["mutual_info_score"] == "numba"
    sinkhorn.sinkhorn([], [], np.ones((2, 3)), 1.0)
    assert K.last_backend["sinkhorn"] == "numba"
    sinkhorn.sinkhorn_batched(None, None, np.ones((2, 2, 3)), 1.0)
    assert K.last_backend["sinkhorn_batched"] == "numba"
    gram = torch.eye(2).expand(3, 2, 2)
    nnls.nnls_gram(gram, torch.ones(3, 2))
    assert K.last_backend["nnls_gram"] == "torch"
    pursuit.topk_atoms(*_signals(m=50), k=2)
    assert K.last_backend["pursuit_topk"] == "torch"
    x = torch.randn(3, 4)
    l2_normalize_rows(x, backend="torch")
    assert K.last_backend["l2_normalize_rows"] == "torch"
    l2_normalize_rows(x, backend="triton")
    assert K.last_backend["l2_normalize_rows"] == "triton"


def test_numba_free_import(tmp_path):
    """Without numba the kernels still import, say so, and refuse the Numba forms clearly."""
    code = (
        "import sys; sys.modules['numba'] = None\n"
        "from fastinterp.kernels import dispatch, mi, sinkhorn\n"
        "assert not dispatch.HAS_NUMBA and not dispatch.available_backends()['numba']\n"
        "try:\n    mi.mi_curves([[1]], [[1]])\nexcept RuntimeError as e:\n    print('refused:', e)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "refused: kernel 'mi_curves': the 'numba' form needs numba" in res.stdout


# ----------------------------------------------------------------------------- the environment
def test_environment_is_read_in_one_place():
    """os.environ appears in kernels/ only inside dispatch.env_value (and aot.py's copy of the
    environment for its compile subprocess)."""
    uses = []
    for path in sorted(KERNELS_DIR.glob("*.py")):
        tree = ast.parse(path.read_text())
        for fn in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.Module))]:
            for node in ast.walk(fn):
                if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                        and node.value.id == "os" and node.attr in ("environ", "getenv"):
                    uses.append((path.name, getattr(fn, "name", "<module>")))
    innermost = {(p, f) for p, f in uses if f != "<module>"}
    assert innermost == {("dispatch.py", "env_value"), ("aot.py", "resource_table")}
    aot_src = (KERNELS_DIR / "aot.py").read_text()
    assert aot_src.count("os.environ") == 1 and "os.environ.items()" in aot_src  # the subprocess copy


def test_every_override_goes_through_env_value(monkeypatch):
    env = {}
    seen = []

    def fake(name):
        seen.append(name)
        return env.get(name, "")

    monkeypatch.setattr(dispatch, "env_value", fake)
    x = torch.randn(3, 4)
    assert choose_backend("l2_normalize_rows", (x,)) == "torch"
    env["FASTINTERP_BACKEND"] = "triton"
    env["TRITON_INTERPRET"] = "1"
    assert choose_backend("l2_normalize_rows", (x,)) == "triton"
    env["TRITON_INTERPRET"] = "0"
    assert not dispatch.triton_interpreting() and not dispatch.available_backends()["triton"]
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        choose_backend("l2_normalize_rows", (x,))
    del env["FASTINTERP_BACKEND"]
    if pursuit._bf16_screen_available(torch.device("cpu")):
        q, atoms = _signals()
        env["FASTINTERP_PURSUIT_SCREEN"] = "0"
        pursuit.select_atoms(q, atoms)
        assert K.last_backend["pursuit_select"] == "torch"
        env["FASTINTERP_PURSUIT_SCREEN"] = "1"
        pursuit.select_atoms(q, atoms[:100])
        assert K.last_backend["pursuit_select"] == "torch-bf16-screen"
    assert {"FASTINTERP_BACKEND", "TRITON_INTERPRET"} <= set(seen) <= set(dispatch.ENV_VARS)
    assert set(dispatch.environment()) == set(dispatch.ENV_VARS)


def test_available_backends_tell_the_truth(monkeypatch):
    has_numba = importlib.util.find_spec("numba") is not None
    assert dispatch.HAS_NUMBA == has_numba == dispatch.available_backends()["numba"]
    has_triton = importlib.util.find_spec("triton") is not None
    assert dispatch.HAS_TRITON == has_triton
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert dispatch.available_backends()["triton"] == (has_triton and torch.cuda.is_available())
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.available_backends()["triton"] == has_triton
    forms = dispatch.available_forms("pursuit_select")
    assert forms["torch"] is True
    assert forms["torch-bf16-screen"] == pursuit._bf16_screen_available(torch.device("cpu"))


def test_sinkhorn_public_names_stay_importable():
    from fastinterp.kernels.sinkhorn import (  # noqa: F401
        CONVERGED, METHODS, NOT_CONVERGED, NUMERICAL_ERROR, sinkhorn, sinkhorn_batched, sinkhorn_fixed)
    assert sinkhorn_batched is sinkhorn_batch.sinkhorn_batched
    assert importlib.import_module("fastinterp.kernels.sinkhorn").__all__ == [
        "FORMS", "METHODS", "sinkhorn", "sinkhorn_batched", "sinkhorn_fixed"]
