"""Fresh processes without the import bill: the repo's entry points run in children forked from a
warm interpreter.

Each `launch/*.py` process spends most of a short test run importing torch, DeepSpeed,
mosaicml-streaming and megatron-core (about 8 of the 13 s of a 1-step pretraining run on a slow
2-core machine). `run_script` and `start_script` run a script the way ``python SCRIPT ARGS`` or
the ``deepspeed`` launcher would: a new process per rank, with its own environment, working
directory, stdout and stderr, exit code and signals, and ``__main__`` executed from the file;
only the heavy, side-effect-free imports are already done, once per test session, in a
multiprocessing fork server (`PRELOAD`). `fork_ranks` starts torch.multiprocessing workers from the same
server.

The real launchers stay covered where their behaviour is the subject: `tests/test_demo.py` runs
`launch/demo.py`, which starts both training stages under ``deepspeed --num_accelerators 2``, and
`tests/test_data_vae_stage.py` runs the VAE stage under it directly.
"""

from __future__ import annotations

import atexit
import multiprocessing as mp
import os
import runpy
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# imported once in the fork server; none of them starts a thread or touches a device at import
PRELOAD = [
    "torch", "torch.distributed", "torch._dynamo", "torch.utils.checkpoint", "deepspeed", "deepspeed.runtime.engine",
    "deepspeed.runtime.zero.muon.muon_optimizer", "streaming", "megatron.core", "safetensors.torch", "PIL.Image",
    "mdm_dist.config", "mdm_dist.train.engine", "mdm_dist.data.loader", "mdm_dist.train.checkpoint",
    "mdm_dist.train.samples", "mdm_dist.train.metrics", "mdm_dist.models.vae",
]

# the fork server's environment, fixed when it starts: what the test suite's processes share
SERVER_ENV = {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled",
              "TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions")}

_ctx = None


def context():
    """The multiprocessing fork-server context, its server started with `PRELOAD` imported."""
    global _ctx
    if _ctx is None:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        saved = dict(os.environ)
        os.environ.update(SERVER_ENV)
        try:
            from multiprocessing import forkserver

            forkserver.ensure_running()
        finally:
            os.environ.clear()
            os.environ.update(saved)
        _ctx = ctx
    return _ctx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_env(rank: int, world: int, port: int) -> dict:
    """The variables the deepspeed launcher sets for local rank ``rank`` of ``world`` on one node."""
    return dict(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                LOCAL_SIZE=str(world), CROSS_RANK="0", CROSS_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def _child(script: str, argv: list[str], env: dict, cwd: str, out: str, err: str) -> None:
    """Run ``script`` as ``__main__`` with fd 1 / 2 in files, then exit as python would."""
    for fd, path in ((1, out), (2, err)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    sys.argv = [script, *argv]
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        if e.code is None:
            code = 0
        elif isinstance(e.code, int):
            code = e.code
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001 - an uncaught exception: traceback and exit 1, as python does
        traceback.print_exc()
        code = 1
    try:
        atexit._run_exitfuncs()  # a multiprocessing child skips them; python at exit does not
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


class Run:
    """A started script, one process per rank (`subprocess.Popen`-like: pid, send_signal, wait,
    communicate, returncode). Like the deepspeed launcher, a rank that fails takes the others
    down; stdout and stderr are those of every rank, rank 0 first."""

    def __init__(self, procs, files):
        self.procs, self.files, self.returncode = procs, files, None

    @property
    def pid(self) -> int:
        return self.procs[0].pid

    def send_signal(self, sig: int, rank: int = 0) -> None:
        os.kill(self.procs[rank].pid, sig)

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.time() + timeout
        while any(p.exitcode is None for p in self.procs):
            failed = [p for p in self.procs if p.exitcode not in (None, 0)]
            if failed:  # the launcher's behaviour: stop the other ranks
                time.sleep(2.0)
                for p in self.procs:
                    if p.exitcode is None:
                        p.kill()
            if deadline is not None and time.time() > deadline:
                for p in self.procs:
                    p.kill()
                raise subprocess.TimeoutExpired(self.procs[0].name, timeout)
            for p in self.procs:
                p.join(0.05)
        codes = [p.exitcode for p in self.procs]
        self.returncode = next((c for c in codes if c != 0), 0)
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        self.wait(timeout)
        out = "".join(Path(o).read_text(errors="replace") for o, _ in self.files)
        err = "".join(Path(e).read_text(errors="replace") for _, e in self.files)
        shutil.rmtree(Path(self.files[0][0]).parent, ignore_errors=True)
        return out, err


def start_script(script: str | Path, argv: list[str], env: dict, cwd: str | Path = REPO, ranks: int = 1) -> Run:
    """Start ``python SCRIPT ARGV`` (ranks == 1) or its ``deepspeed --num_accelerators RANKS``
    equivalent: the launcher's environment per rank and ``--local_rank=R`` first."""
    ctx = context()
    logs = Path(tempfile.mkdtemp(prefix="warm_run_"))
    port = free_port()
    procs, files = [], []
    for rank in range(ranks):
        e = dict(env)
        args = list(argv)
        if ranks > 1:
            e.update(launcher_env(rank, ranks, port))
            args = [f"--local_rank={rank}", *args]
        out, err = str(logs / f"rank{rank}.out"), str(logs / f"rank{rank}.err")
        p = ctx.Process(target=_child, args=(str(script), args, e, str(cwd), out, err),
                        name=f"{Path(script).name}:{rank}")
        p.start()
        procs.append(p)
        files.append((out, err))
    return Run(procs, files)


def run_script(script: str | Path, argv: list[str], env: dict, cwd: str | Path = REPO, ranks: int = 1,
               timeout: float = 300) -> subprocess.CompletedProcess:
    """`start_script`, waited for: a CompletedProcess with the ranks' stdout and stderr."""
    run = start_script(script, argv, env, cwd, ranks)
    out, err = run.communicate(timeout)
    return subprocess.CompletedProcess([str(script), *argv], run.returncode, out, err)
