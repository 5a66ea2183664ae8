"""Data- and sequence-parallel process groups, built with megatron-core's ``parallel_state``.

The world of ``W`` ranks is split into ``W / sp`` sequence-parallel (SP) groups of ``sp``
consecutive ranks (``[0, 1], [2, 3], ...`` for sp = 2: SP traffic, an all-to-all in every mixer,
stays inside a node). The ranks holding the same position in every SP group form a data-parallel
(DP) group. megatron-core's ``initialize_model_parallel(context_parallel_size=sp)`` builds exactly
this layout (tensor and pipeline parallel sizes 1; its rank order puts context-parallel ranks next
to each other), and it works on gloo, so we use it rather than our own ``new_group`` calls; its
context-parallel group *is* our SP group.

Gradient reduction: every rank of an SP group computes the same loss on the same samples, and the
SP building blocks (``mdm_dist.parallel.sequence``) are written so that the exact gradient is the
*mean over all ranks* (data x sequence) of the per-rank gradients. DeepSpeed's default
data-parallel group (the whole world) therefore does the right reduction and ZeRO partitions over
all ``W`` ranks; DeepSpeed is given no ``mpu``. The loader uses :attr:`ParallelGroups.dp_rank` and
:attr:`ParallelGroups.dp_size`, so the ranks of an SP group read the same samples.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

import torch.distributed as dist


class ParallelLayoutError(ValueError):
    """The requested parallel layout cannot run this model; the message says what to change."""


@dataclass
class ParallelGroups:
    world_size: int
    rank: int
    sp_size: int
    sp_rank: int
    dp_size: int
    dp_rank: int
    sp_group: dist.ProcessGroup | None  # None when sp_size == 1
    dp_group: dist.ProcessGroup | None  # ranks with the same SP rank (data-parallel replicas)


def check_layout(world_size: int, sp: int, *, nheads: int | None = None, ngroups: int | None = None,
                 seqlen: int | None = None, attn_heads: int | None = None) -> None:
    """Raise :class:`ParallelLayoutError` if ``sp`` cannot split this world or this model.

    ``nheads``/``ngroups``: the Mamba-2 mixer's heads and B/C groups; ``seqlen``: tokens of the
    joint sequence; ``attn_heads``: heads of the attention blocks (None when there are none).
    """
    if sp < 1:
        raise ParallelLayoutError(f"'parallel.sequence_parallel' must be >= 1, got {sp}")
    if world_size % sp:
        raise ParallelLayoutError(
            f"world size {world_size} is not divisible by 'parallel.sequence_parallel' = {sp}; "
            f"launch a multiple of {sp} processes or choose a divisor of {world_size}"
        )
    if sp == 1:
        return
    if nheads is not None and nheads % sp:
        raise ParallelLayoutError(
            f"the Mamba-2 mixer has nheads = expand * d_model / headdim = {nheads} heads, not divisible "
            f"by 'parallel.sequence_parallel' = {sp} (each SP rank scans nheads / sp heads)"
        )
    if ngroups is not None and ngroups % sp and sp % ngroups:
        raise ParallelLayoutError(
            f"'model.ngroups' = {ngroups} and 'parallel.sequence_parallel' = {sp}: one must divide the "
            "other (groups are split across SP ranks, or replicated when fewer than the SP ranks)"
        )
    if seqlen is not None and seqlen < sp:
        raise ParallelLayoutError(
            f"the joint sequence has {seqlen} tokens, shorter than the sequence-parallel group of {sp} "
            "ranks; lower 'parallel.sequence_parallel'"
        )
    if attn_heads is not None and attn_heads % sp:
        raise ParallelLayoutError(
            f"'model.attn_heads' = {attn_heads} is not divisible by 'parallel.sequence_parallel' = {sp} "
            "(Ulysses attention gives each SP rank attn_heads / sp heads)"
        )


def check_model_layout(model_cfg, seqlen: int, world_size: int, sp: int) -> None:
    """:func:`check_layout` with the head counts read from a ``ModelConfig``."""
    nheads = int(model_cfg.expand * model_cfg.d_model) // model_cfg.headdim
    check_layout(world_size, sp, nheads=nheads, ngroups=model_cfg.ngroups, seqlen=seqlen,
                 attn_heads=model_cfg.attn_heads if model_cfg.attention_every else None)


def build_groups(sequence_parallel: int) -> ParallelGroups:
    """Create the SP and DP groups of the initialized default process group (collective: every
    rank must call it). With ``sequence_parallel == 1`` no group is created."""
    if not dist.is_initialized():
        raise RuntimeError("build_groups: torch.distributed is not initialized (init_process_group first)")
    world, rank = dist.get_world_size(), dist.get_rank()
    sp = sequence_parallel
    check_layout(world, sp)
    if sp == 1:
        return ParallelGroups(world, rank, 1, 0, world, rank, None, None)
    from megatron.core import parallel_state as ps  # slow import (~5 s): only when SP is used

    if ps.model_parallel_is_initialized():
        if ps.get_context_parallel_world_size() != sp:
            raise RuntimeError(
                f"megatron parallel_state is already initialized with context parallel size "
                f"{ps.get_context_parallel_world_size()}, not {sp}"
            )
    else:
        ps.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                                     context_parallel_size=sp)
    sp_group = ps.get_context_parallel_group()
    dp_group = ps.get_data_parallel_group(with_context_parallel=False)
    return ParallelGroups(
        world_size=world, rank=rank,
        sp_size=sp, sp_rank=dist.get_rank(sp_group),
        dp_size=world // sp, dp_rank=dist.get_rank(dp_group),
        sp_group=sp_group, dp_group=dp_group,
    )


def ensure_deepspeed_comm() -> None:
    """Let ``deepspeed.comm`` wrap the initialized torch.distributed default group (``zero.Init``'s
    config check and Ulysses' all-to-all read it; ``deepspeed.initialize`` would do it later)."""
    import deepspeed
    import deepspeed.comm

    if not deepspeed.comm.is_initialized():
        state = random.getstate()
        with torch.random.fork_rng(devices=[]):  # it draws random numbers: keep the seeded streams
            deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)
        random.setstate(state)


def destroy_groups() -> None:
    """Forget megatron's groups (tests that build several layouts in one process)."""
    try:
        from megatron.core import parallel_state as ps
    except ImportError:
        return
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
