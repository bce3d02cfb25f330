import os
import sys
from pathlib import Path

# One intra-op thread for this process and the runs it starts (set before torch starts its pool): every model here
# is tiny and overhead-bound, and a second thread only adds synchronisation (on a loaded 2-core machine
# tests/test_pso.py + tests/test_sharpening_loops.py took 38 s of CPU with one thread, 223 s with two). A value the
# user sets wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test downloads anything (set before huggingface_hub is imported)
if "FEWSTEP_EMBEDDING_CACHE" not in os.environ:  # the full worlds' prompt-embedding cache: one temporary folder per
    import atexit  # session (subprocess runs inherit it), never the user's ~/.cache
    import shutil
    import tempfile

    _cache = tempfile.mkdtemp(prefix="fewstep-embeddings-")
    os.environ["FEWSTEP_EMBEDDING_CACHE"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    """The slow tests run one at a time, whatever -n pyproject.toml adds for the fast suite: each needs up to ~19 GB
    of RAM (benchmarks/results/rehearsal.md) and both cores."""
    expr = config.getoption("markexpr", "") or ""
    if "slow" in expr and "not slow" not in expr and hasattr(config.option, "numprocesses"):
        config.option.numprocesses, config.option.dist = 0, "no"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def toy2d_tiny():
    import toy

    return toy.load_world("toy2d", budget="tiny", progress=False)


@pytest.fixture(scope="session")
def toy2d_tiny_height(toy2d_tiny):
    """toy2d_tiny with the unbounded height reward (`--model toy2d:reward=height`): large, steady reward gains for
    the loop tests that check a method climbs its reward."""
    from toy.toy2d import Toy2D

    return Toy2D(toy2d_tiny.weights, reward="height")


@pytest.fixture(scope="session")
def mnist_tiny():
    import toy

    return toy.load_world("mnist", budget="tiny", progress=False)


@pytest.fixture(scope="session")
def toy2d():
    """The real toy2d base models (built once, about 45 s on two cores, then cached)."""
    import toy

    return toy.load_world("toy2d", progress=False)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny diffusers models are overhead-bound: one intra-op thread is faster and immune to a loaded machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
