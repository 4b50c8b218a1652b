import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _no_user_calibration(tmp_path_factory):
    """The cost model's figures are the built-in ones in every test: a calibration stored on this
    machine (``sparse-compiler calibrate``) must not change what the tests plan."""
    mp = pytest.MonkeyPatch()
    mp.setenv("SPARSE_COMPILER_CACHE", str(tmp_path_factory.mktemp("calibration")))
    yield
    mp.undo()


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch and starts from the same random state."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    yield
    torch._dynamo.reset()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
