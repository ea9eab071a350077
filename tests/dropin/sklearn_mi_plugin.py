"""pytest plugin (loaded with `-p sklearn_mi_plugin`) that runs scikit-learn's own clustering
metric tests with `fastinterp.mutual_info_score` in place of scikit-learn's.

It replaces the name wherever scikit-learn's test modules and metric internals look it up
(`sklearn.metrics`, `sklearn.metrics.cluster`, `sklearn.metrics.cluster._supervised`, whose
adjusted / normalised MI and V-measure call it), before the test modules are imported, and
records which tests called it: the node ids go to the JSON file named by
FASTINTERP_SKLEARN_MI_REPORT, with each test's outcome.
"""
import json
import os

import pytest

import fastinterp
import sklearn.metrics
import sklearn.metrics.cluster
import sklearn.metrics.cluster._supervised as _supervised

_ours = fastinterp.mutual_info_score
_calls = [0]


def _patched(labels_true, labels_pred, *, contingency=None):
    _calls[0] += 1
    return _ours(labels_true, labels_pred, contingency=contingency)


for _module in (sklearn.metrics, sklearn.metrics.cluster, _supervised):
    _module.mutual_info_score = _patched

_report = {"exercising": {}, "outcomes": {}}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    before = _calls[0]
    yield
    if _calls[0] > before:
        _report["exercising"][item.nodeid] = _calls[0] - before


def pytest_runtest_logreport(report):
    if report.when == "call" or report.outcome != "passed":
        _report["outcomes"].setdefault(report.nodeid, report.outcome)
        if report.outcome != "passed":
            _report["outcomes"][report.nodeid] = report.outcome


def pytest_sessionfinish(session):
    path = os.environ.get("FASTINTERP_SKLEARN_MI_REPORT")
    if path:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(_report, f, indent=1)
