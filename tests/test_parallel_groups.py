"""Process groups of mdm_dist.parallel.groups; also holds ``spawn``, the 2-process gloo launcher
that the other tests/test_parallel_*.py files import."""

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import _warm

from mdm_dist.parallel.groups import ParallelLayoutError, build_groups, check_layout

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _entry(rank, world, port, env, fn, args):
    os.environ.clear()
    os.environ.update(env)  # the caller's environment (the fork server's is the one it started with)
    os.environ.update(_warm.launcher_env(rank, world, port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()
    # The worker passed. Leave without the interpreter's teardown: after a bf16-autocast ZeRO-3
    # run on CPU, a native thread still joinable at static destruction aborts the process
    # ("terminate called without an active exception", SIGABRT) in about 1 run of 3, after every
    # assertion and destroy_process_group have passed, and spawn would report that as a failure.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(fn, *args, world: int = 2) -> None:
    """Run ``fn(rank, world, *args)`` in ``world`` fresh gloo processes; re-raise their failure."""
    cache = os.path.join(REPO, ".cache")
    os.makedirs(os.path.join(cache, "torch_extensions"), exist_ok=True)
    for key, value in (("OMP_NUM_THREADS", "1"), ("DS_ACCELERATOR", "cpu"),
                       ("TORCH_EXTENSIONS_DIR", os.path.join(cache, "torch_extensions"))):
        os.environ.setdefault(key, value)
    _warm.context()  # fresh processes forked from a warm interpreter (tests/_warm.py), not re-importing torch
    mp.start_processes(_entry, args=(world, _warm.free_port(), dict(os.environ), fn, args), nprocs=world, join=True,
                       start_method="forkserver")


# ----------------------------------------------------------------------------------------------


def test_impossible_layouts_raise_clear_errors():
    with pytest.raises(ParallelLayoutError, match="world size 3 is not divisible"):
        check_layout(3, 2)
    with pytest.raises(ParallelLayoutError, match="6 heads, not divisible"):
        check_layout(4, 4, nheads=6)
    with pytest.raises(ParallelLayoutError, match="shorter than the sequence-parallel group"):
        check_layout(4, 4, nheads=8, seqlen=3)
    with pytest.raises(ParallelLayoutError, match="ngroups' = 3"):
        check_layout(2, 2, nheads=6, ngroups=3)
    with pytest.raises(ParallelLayoutError, match="attn_heads' = 3"):
        check_layout(2, 2, nheads=8, attn_heads=3)
    check_layout(4, 2, nheads=8, ngroups=1, seqlen=31, attn_heads=4)  # fine
    check_layout(3, 1, nheads=5, seqlen=1)  # no SP: anything goes


def _groups_worker(rank, world):
    g = build_groups(2)
    assert (g.sp_size, g.sp_rank, g.dp_size, g.dp_rank) == (2, rank, 1, 0)
    assert dist.get_process_group_ranks(g.sp_group) == [0, 1]
    assert dist.get_process_group_ranks(g.dp_group) == [rank]
    x = torch.tensor([float(rank + 1)])
    dist.all_reduce(x, group=g.sp_group)
    assert x.item() == 3.0
    with pytest.raises(ParallelLayoutError, match="not divisible"):
        build_groups(4)
    g1 = build_groups(1)
    assert (g1.sp_size, g1.dp_size, g1.dp_rank, g1.sp_group) == (1, 2, rank, None)


def test_build_groups_two_ranks():
    spawn(_groups_worker)
