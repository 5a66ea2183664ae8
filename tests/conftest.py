"""Suite-wide test settings."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """The tests use tiny tensors, which gain nothing from intra-op threads; on a shared 2-core
    machine OpenMP's spinning threads make them ~30x slower. Restore the setting afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
