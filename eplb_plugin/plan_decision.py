"""The plan decision every rank learns at the collect step, so that every rank acts alike.

With ``plan_on="rank0"`` rank 0 broadcasts its decision and, when it acts, the new layout;
with ``"all"`` every rank planned on its own and the ranks check that they agree.
"""

from __future__ import annotations

import logging

import torch

from .comm import Communicator

log = logging.getLogger("eplb_plugin.runtime")

# The decision codes (a header's [0]). Across ranks the smallest code wins, so a plan that is
# not ready or failed on any rank is dropped on every rank.
ACT, SKIP, FAILED, NOT_READY = 1.0, 0.0, -1.0, -2.0


def share_decision(
    comm: Communicator,
    plan_on: str,
    header: torch.Tensor,
    phy2log: torch.Tensor,
    share: torch.Tensor,
) -> float:
    """Make this rank's decision the one every rank takes (collective); its code.

    Args:
        comm: the EP ranks' Communicator.
        plan_on: ``config.plan_on``: ``"rank0"`` (rank 0's decision is broadcast into the
            tensors below) or ``"all"`` (see :func:`ranks_agree`).
        header: [3] float64 (code, predicted balancedness before, after).
        phy2log: [L, P] int64 and share: [L, P] float32, the new layout (set when the code
            is ``ACT``).
    """
    if plan_on == "rank0":
        comm.broadcast(header, 0)
        if header[0] == ACT:
            comm.broadcast(phy2log, 0)
            comm.broadcast(share, 0)
    elif comm.world_size > 1:
        header[0] = ranks_agree(comm, header, phy2log, share)
    return float(header[0])


def ranks_agree(
    comm: Communicator, header: torch.Tensor, phy2log: torch.Tensor, share: torch.Tensor
) -> float:
    """The decision every rank takes for ``plan_on="all"`` (collective).

    The lowest code of any rank wins (not ready, then failed); otherwise every rank must
    have computed the same decision and layout, else the plan is dropped as failed.

    Args:
        header: [3] float64 (code, balancedness before, after); phy2log: [L, P] int64;
        share: [L, P] float32. Unset when this rank's plan failed, is None or not ready.
    """
    code = float(header[0])
    weights = torch.arange(1, phy2log.numel() + 1, dtype=torch.float64)
    fingerprint = torch.tensor([code, float(header[1]), float(header[2]), 0.0, 0.0])
    if code == ACT:
        fingerprint[3] = (phy2log.flatten().to(torch.float64) * weights).sum()
        fingerprint[4] = (share.flatten().to(torch.float64) * weights).sum()
    low, high = fingerprint.clone(), fingerprint.clone()
    comm.all_reduce(low, op="min")
    comm.all_reduce(high, op="max")
    if float(low[0]) < 0:
        return float(low[0])
    if not torch.equal(low, high):
        # a policy that is not deterministic across ranks would give ranks different
        # maps: tokens sent to slots that hold other experts, or a move that hangs
        log.error(
            "rank %d: ranks planned different layouts (plan_on='all' needs a policy that "
            "is deterministic across ranks; use plan_on='rank0')", comm.rank,
        )  # fmt: skip
        return FAILED
    return code
