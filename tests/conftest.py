"""Make the repository's top-level modules (model, palora, tasks, ...) importable from the tests, however
pytest is started."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: thread hand-offs dominate, and on 2 shared cores two threads per process ran 6x slower.
    Modules of tiny-model tests use it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
