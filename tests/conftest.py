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


_SHM_PATTERN = "/dev/shm/deepspeed_allreduce_buffer_*"


def pytest_sessionstart(session):
    import glob

    session.config._mdm_shm_before = set(glob.glob(_SHM_PATTERN))


def pytest_sessionfinish(session, exitstatus):
    """DeepSpeed's CPU accelerator leaves two ~66 MB shared-memory buffers per distributed run;
    remove the ones this test session created so repeated runs do not fill /dev/shm."""
    import glob
    import os

    before = getattr(session.config, "_mdm_shm_before", set())
    for path in set(glob.glob(_SHM_PATTERN)) - before:
        try:
            os.remove(path)
        except OSError:
            pass
