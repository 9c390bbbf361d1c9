"""Shared fixtures: the repo root on sys.path, and sample corpora built once per test session."""
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors (test_kernels.py). Triton reads this
# when triton.language is first imported, so it is set before anything imports train_gpt.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

_spec = importlib.util.spec_from_file_location("make_sample", REPO_ROOT / "data" / "make_sample.py")
make_sample = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_sample)


@pytest.fixture(scope="session")
def sample(tmp_path_factory):
    """The default embedded sample, exactly as `python3 data/make_sample.py` builds it."""
    return make_sample.build(out=tmp_path_factory.mktemp("sample"), verbose=False)


@pytest.fixture(scope="session")
def small_sample(tmp_path_factory):
    """A smaller corpus of the same kind, so training tests spend little time on validation."""
    return make_sample.build(out=tmp_path_factory.mktemp("small_sample"), max_text_bytes=400_000, verbose=False)


def pytest_configure(config):
    config.addinivalue_line("markers",
                            "cuda: checks a CUDA path on a GPU; skipped without one (bench/gpu_check.py runs them)")
