"""scikit-learn's own tests of its clustering metrics, run with fastinterp.mutual_info_score
patched in (tests/dropin/sklearn_mi_plugin.py), plus the cases its tests do not reach."""
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from fastinterp import mutual_info_score

sklearn = pytest.importorskip("sklearn")
from sklearn.metrics import mutual_info_score as sk_mutual_info_score  # noqa: E402

TESTS = Path(sklearn.__file__).parent / "metrics" / "cluster" / "tests"
PLUGIN_DIR = Path(__file__).parent / "dropin"
# the tests of scikit-learn's files that call mutual_info_score directly, by name: each must
# be among those the plugin saw calling it (the rest call it through AMI / NMI / V-measure)
DIRECT = ("test_adjusted_mutual_info_score", "test_int_overflow_mutual_info_fowlkes_mallows_score",
          "test_v_measure_and_mutual_information", "test_mutual_info_score_positive_constant_label",
          "test_symmetry[mutual_info_score", "test_permute_labels[mutual_info_score",
          "test_format_invariance[mutual_info_score")


@pytest.mark.skipif(not (TESTS / "test_supervised.py").is_file(), reason="this scikit-learn ships no tests")
def test_sklearn_test_suite_passes_with_our_function(tmp_path):
    report = tmp_path / "report.json"
    env = {**os.environ, "FASTINTERP_SKLEARN_MI_REPORT": str(report),
           "PYTHONPATH": os.pathsep.join([str(PLUGIN_DIR), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "pytest", "-p", "sklearn_mi_plugin", "-q", "-p", "no:cacheprovider",
           "-k", "not array_api", "--rootdir", str(TESTS), str(TESTS / "test_supervised.py"),
           str(TESTS / "test_common.py")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    data = json.loads(report.read_text())
    exercising = data["exercising"]
    failed = {k: v for k, v in data["outcomes"].items() if v != "passed"}
    assert not failed, failed
    assert len(exercising) >= 40, sorted(exercising)
    for name in DIRECT:
        assert any(name in nodeid for nodeid in exercising), (name, sorted(exercising))
    print(f"{len(exercising)} of scikit-learn's tests call mutual_info_score; all passed:")
    print("\n".join(sorted(n.split("::", 1)[1] for n in exercising)))


def test_uint64_labels_above_2_63():
    x = np.array([2**63 + 5, 2**63 + 6, 2**63 + 5, 2**64 - 1], dtype=np.uint64)
    y = [0, 1, 1, 0]
    assert mutual_info_score(x, y) == pytest.approx(sk_mutual_info_score(x, y), abs=1e-12)
    assert mutual_info_score(y, x) == pytest.approx(sk_mutual_info_score(y, x), abs=1e-12)


@pytest.mark.parametrize("bad", [5, 2.5, "abc", b"ab"])
def test_not_array_like_is_sklearns_invalid_parameter_error(bad):
    for args in ((bad, [0, 1]), ([0, 1], bad)):
        with pytest.raises(ValueError, match="must be an array-like") as ours:
            mutual_info_score(*args)
        assert isinstance(ours.value, TypeError)  # InvalidParameterError is both
        with pytest.raises(ValueError) as theirs:
            sk_mutual_info_score(*args)
        assert isinstance(theirs.value, TypeError)
    with pytest.raises(TypeError, match="contingency"):
        mutual_info_score(None, None, contingency="table")


def test_continuous_warning_text_is_sklearns():
    for lt, lp in (([0.5, 1.5, 0.5], [0, 1, 1]), ([0, 1, 2], [0.1, 0.2, 0.3]), ([0.5, 1.5], [0.1, 0.2])):
        with warnings.catch_warnings(record=True) as ours:
            warnings.simplefilter("always")
            mutual_info_score(lt, lp)
        with warnings.catch_warnings(record=True) as theirs:
            warnings.simplefilter("always")
            sk_mutual_info_score(lt, lp)
        assert [str(w.message) for w in ours] == [str(w.message) for w in theirs if "Clustering" in str(w.message)]
