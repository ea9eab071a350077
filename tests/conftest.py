"""Shared fixtures. Triton kernels run under the interpreter when there is no GPU: the flag
must be set before any kernel module is imported, hence here, first."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fastinterp  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Never touch the user's real concept cache from tests."""
    monkeypatch.setenv("FASTINTERP_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="session")
def tiny_clip():
    """(model, preprocess, tokenizer) of the tiny random-weight ViT, seeded."""
    torch.manual_seed(0)
    return fastinterp.load_clip(fastinterp.TINY_MODEL)
