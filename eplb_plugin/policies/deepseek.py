"""DeepSeek's EPLB policy, output-identical to deepseek-ai/EPLB, vectorized over layers.

The reference walks every layer in Python; here each greedy step runs once for all rows
(layers, or layers x nodes) at a time, using the same torch ops in the same order so that
ties break the same way: ``sort(descending=True)`` for the packing order, the first
maximum for replication, and the first lightest pack with room for packing.
"""

from __future__ import annotations

import numpy as np
import torch

from ..layout import ExpertLayout, Topology


def balanced_packing(weight: torch.Tensor, num_packs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack items into ``num_packs`` packs of equal item count, heaviest first onto the lightest.

    Args:
        weight: [rows, items] float32; items % num_packs == 0.
    Returns:
        (pack_index [rows, items] int64, rank_in_pack [rows, items] int64).
    """
    rows, items = weight.shape
    per_pack = items // num_packs
    if per_pack == 1:
        pack_index = torch.arange(items, dtype=torch.int64).expand(rows, items).contiguous()
        return pack_index, torch.zeros(rows, items, dtype=torch.int64)
    # The greedy loop runs in numpy (a tenth of torch's per-op overhead on small arrays);
    # the order comes from torch's sort so that ties among equal loads match the reference.
    order = weight.float().sort(-1, descending=True).indices.numpy()
    w = weight.float().numpy()
    pack_weight = np.zeros((rows, num_packs), dtype=np.float32)
    pack_items = np.zeros((rows, num_packs), dtype=np.int64)
    pack_index = np.empty((rows, items), dtype=np.int64)
    rank_in_pack = np.empty((rows, items), dtype=np.int64)
    row = np.arange(rows)
    for i in range(items):
        item = order[:, i]
        # the first lightest pack among those with room, as the reference's min() picks:
        # an argmin over (room ? weight : inf) would pick a full pack when every pack with
        # room weighs inf, leaving positions of the inverse permutation unwritten
        room = pack_items < per_pack
        masked = np.where(room, pack_weight, np.inf)
        pack = (room & (masked == masked.min(-1, keepdims=True))).argmax(-1)
        pack_index[row, item] = pack
        rank_in_pack[row, item] = pack_items[row, pack]
        pack_weight[row, pack] += w[row, item]
        pack_items[row, pack] += 1
    pack_index, rank_in_pack = torch.from_numpy(pack_index), torch.from_numpy(rank_in_pack)
    return pack_index, rank_in_pack


def replicate_experts(
    weight: torch.Tensor, num_phy: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Give each redundant slot to the expert with the highest load per replica.

    Args:
        weight: [rows, num_log] float32.
        num_phy: slots per row (>= num_log).
    Returns:
        (phy2log [rows, num_phy] int64, rank [rows, num_phy] int64 replica index,
        logcnt [rows, num_log] int64).
    """
    rows, num_log = weight.shape
    phy2log = np.tile(np.arange(num_phy, dtype=np.int64), (rows, 1))
    rank = np.zeros((rows, num_phy), dtype=np.int64)
    logcnt = np.ones((rows, num_log), dtype=np.int64)
    w = weight.float().numpy()
    row = np.arange(rows)
    for i in range(num_log, num_phy):
        # float32 / float32 as the reference's float32 / int64 tensor division computes it
        chosen = (w / logcnt.astype(np.float32)).argmax(-1)
        phy2log[:, i] = chosen
        rank[:, i] = logcnt[row, chosen]
        logcnt[row, chosen] += 1
    phy2log, rank, logcnt = (torch.from_numpy(a) for a in (phy2log, rank, logcnt))
    return phy2log, rank, logcnt


def _inverse(perm: torch.Tensor) -> torch.Tensor:
    """Row-wise inverse of a permutation [rows, n] int64."""
    # full of -1, not empty: should perm ever not be a permutation, the unwritten positions
    # fail the layout's validation instead of carrying whatever the memory held
    inv = torch.full_like(perm, -1)
    inv.scatter_(1, perm, torch.arange(perm.size(1), dtype=torch.int64).expand(perm.shape))
    return inv


def hierarchical(
    weight: torch.Tensor, num_phy: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Groups -> nodes, replicas within each node, replicas -> GPUs of the node.

    Args:
        weight: [L, E] float32.
    Returns:
        (phy2log [L, P] int64, rank [L, P] int64, logcnt [L, E] int64).
    """
    num_layers, num_log = weight.shape
    group_size = num_log // num_groups
    groups_per_node = num_groups // num_nodes
    slots_per_gpu = num_phy // num_gpus
    log_per_node = num_log // num_nodes

    # 1. expert groups -> nodes
    group_load = weight.unflatten(-1, (num_groups, group_size)).sum(-1)
    group_pack, group_rank = balanced_packing(group_load, num_nodes)
    log2mlog = (
        ((group_pack * groups_per_node + group_rank) * group_size).unsqueeze(-1)
        + torch.arange(group_size, dtype=torch.int64)
    ).flatten(-2)
    mlog2log = _inverse(log2mlog)

    # 2. replicas within each node: rows are (layer, node)
    mlog_load = weight.gather(-1, mlog2log).view(-1, log_per_node)
    phy2mlog, phy_rank, mlogcnt = replicate_experts(mlog_load, num_phy // num_nodes)

    # 3. a node's replicas -> its GPUs
    phy_load = (mlog_load / mlogcnt).gather(-1, phy2mlog)
    pack, rank_in_pack = balanced_packing(phy_load, num_gpus // num_nodes)
    pphy2phy = _inverse(pack * slots_per_gpu + rank_in_pack)

    pphy2mlog = phy2mlog.gather(-1, pphy2phy)
    node_base = torch.arange(0, num_log, log_per_node, dtype=torch.int64).view(1, -1, 1)
    pphy2mlog = (pphy2mlog.view(num_layers, num_nodes, -1) + node_base).flatten(-2)
    pphy2log = mlog2log.gather(-1, pphy2mlog)
    pphy_rank = phy_rank.gather(-1, pphy2phy).view(num_layers, -1)
    logcnt = mlogcnt.view(num_layers, -1).gather(-1, log2mlog)
    return pphy2log, pphy_rank, logcnt


def deepseek_tensors(
    weight: torch.Tensor, topology: Topology
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DeepSeek's policy on a validated [L, E] float32 load -> (phy2log, rank, logcnt)."""
    t = topology
    if t.hierarchical:
        return hierarchical(weight, t.num_replicas, t.num_groups, t.num_nodes, t.num_gpus)
    return hierarchical(weight, t.num_replicas, 1, 1, t.num_gpus)


def deepseek_policy(
    weight: torch.Tensor,
    topology: Topology,
    previous: ExpertLayout | None = None,
    *,
    steps: torch.Tensor | None = None,
) -> ExpertLayout:
    """Placement exactly as deepseek-ai/EPLB computes it (equal split across replicas).

    It takes no options. Args:
        weight: [L, E] float32 load (validated by ``plan``); ``previous`` and ``steps``
            (per-step loads) are ignored: DeepSeek plans on the window's sum.
    """
    phy2log, rank, _logcnt = deepseek_tensors(weight, topology)
    return ExpertLayout.from_phy2log(phy2log, topology, weight.shape[1], rank=rank)
