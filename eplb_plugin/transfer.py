"""Transfer planning: what each rank copies, sends and receives when the layout changes.

Pure host code (no communication, no device), deterministic: every rank computes the same
plan from the same (old, new) layouts, so the ranks agree on every message without talking.

Rules (issue 5):

- only slots whose logical expert changes are written;
- an expert the destination rank already holds (old layout) is copied locally, never received;
- an expert a rank needs in several slots is received once and fanned out locally;
- the sender of each received expert is one of the ranks that hold it in the old layout,
  same-node holders first, then the holder that sends the least so far (spreads the load);
- bytes are counted per rank: sent, received, copied locally.

On top of the plan, :func:`chunk_layers` and :func:`plan_rounds` cut the work into chunks of
layers (one per engine step) and rounds of bounded size (one collective each) so that each
rank's extra memory stays within a staging budget.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .layout import ExpertLayout, Topology


@dataclass(frozen=True)
class Transfer:
    """One expert copy from one rank to another, for one layer.

    Attributes:
        layer: MoE layer.
        expert: logical expert moved.
        src_rank: sender; holds ``expert`` in the old layout at ``src_slot``.
        src_slot: global slot read on the sender (old contents).
        dst_rank: receiver; does not hold ``expert`` in the old layout.
        dst_slot: global slot the received bytes are written to (the receiver's first new
            slot of ``expert``; its other new slots of ``expert`` copy from it locally).
    """

    layer: int
    expert: int
    src_rank: int
    src_slot: int
    dst_rank: int
    dst_slot: int


@dataclass
class LayerActions:
    """What one rank does for one layer. Local slot indices are in ``[0, slots_per_gpu)``.

    Attributes:
        layer, rank: which.
        new_to_old: [S] int64 local slot whose *old* contents each local slot gets from the
            local shuffle: itself when unchanged, another local slot for a local copy, -1 for
            slots filled afterwards (received, or fanned out from a received slot).
        fanout: [S] int64, -1 except slots copied from a received slot after the receive
            (value: that received slot's local index).
        recv_slots: [n] int64 local slots written by received bytes, in ``recvs`` order.
        recvs: transfers this rank receives (``dst_rank == rank``).
        sends: transfers this rank sends (``src_rank == rank``).
        changed: local slots whose expert changes.
        local_copies: slots filled by a local copy (including fan-out).
    """

    layer: int
    rank: int
    new_to_old: torch.Tensor
    fanout: torch.Tensor
    recv_slots: torch.Tensor
    recvs: list[Transfer]
    sends: list[Transfer]
    changed: int
    local_copies: int


@dataclass
class TransferPlan:
    """Every rank's actions to go from ``old`` to ``new``.

    Attributes:
        old_phy2log, new_phy2log: [L, P] int64.
        topology: where slots live.
        bytes_per_slot: bytes of one slot over all its tensors.
        transfers: every cross-rank copy, sorted by (layer, src_rank, dst_rank, dst_slot).
        layers: layers with at least one changed slot, ascending.
        actions: ``actions[layer][rank]`` for every changed layer.
        bytes_sent, bytes_received, bytes_local: [num_gpus] int64 per rank.
        slots_changed: [num_gpus] int64 slots whose expert changes, per rank.
    """

    old_phy2log: torch.Tensor
    new_phy2log: torch.Tensor
    topology: Topology
    bytes_per_slot: int
    transfers: list[Transfer]
    layers: list[int]
    actions: dict[int, list[LayerActions]]
    bytes_sent: torch.Tensor
    bytes_received: torch.Tensor
    bytes_local: torch.Tensor
    slots_changed: torch.Tensor
    _by_layer: dict[int, list[Transfer]] = field(default_factory=dict, repr=False)

    @property
    def total_bytes(self) -> int:
        """Bytes crossing between ranks (each transfer counted once)."""
        return int(self.bytes_sent.sum())

    @property
    def cross_node_bytes(self) -> int:
        t = self.topology
        n = sum(1 for x in self.transfers if t.node_of_gpu(x.src_rank) != t.node_of_gpu(x.dst_rank))
        return n * self.bytes_per_slot

    def layer_transfers(self, layer: int) -> list[Transfer]:
        return self._by_layer.get(layer, [])

    def summary(self) -> dict[str, object]:
        return {
            "layers_changed": len(self.layers),
            "transfers": len(self.transfers),
            "bytes_total": self.total_bytes,
            "bytes_cross_node": self.cross_node_bytes,
            "bytes_sent": self.bytes_sent.tolist(),
            "bytes_received": self.bytes_received.tolist(),
            "bytes_local": self.bytes_local.tolist(),
            "slots_changed": self.slots_changed.tolist(),
        }


def _phy2log(layout: ExpertLayout | torch.Tensor, name: str) -> torch.Tensor:
    tensor = layout.phy2log if isinstance(layout, ExpertLayout) else torch.as_tensor(layout)
    if tensor.dim() != 2 or tensor.dtype.is_floating_point or tensor.dtype == torch.bool:
        raise ValueError(
            f"{name} must be an ExpertLayout or an integer [layers, slots] phy2log, "
            f"got {tensor.dtype} shape {tuple(tensor.shape)}"
        )
    return tensor.to(torch.int64).cpu()


def plan_transfer(
    old: ExpertLayout | torch.Tensor,
    new: ExpertLayout | torch.Tensor,
    topology: Topology,
    bytes_per_slot: int,
) -> TransferPlan:
    """Plan every rank's local copies, sends and receives from ``old`` to ``new``.

    Args:
        old: layout in force (or its phy2log [L, P] int).
        new: target layout (or its phy2log [L, P] int); every expert that ``new`` places
            must exist somewhere in ``old`` for the same layer.
        topology: P slots over ``num_gpus`` ranks and ``num_nodes`` nodes.
        bytes_per_slot: bytes one slot holds over all its tensors (> 0).
    Returns:
        TransferPlan.
    """
    old_p, new_p = _phy2log(old, "old"), _phy2log(new, "new")
    if old_p.shape != new_p.shape:
        raise ValueError(
            f"old and new layouts differ in shape: {tuple(old_p.shape)} vs {tuple(new_p.shape)}"
        )
    if old_p.shape[1] != topology.num_replicas:
        raise ValueError(
            f"layouts have {old_p.shape[1]} slots but topology.num_replicas={topology.num_replicas}"
        )
    if isinstance(bytes_per_slot, bool) or not isinstance(bytes_per_slot, int):
        raise ValueError(f"bytes_per_slot must be a positive integer, got {bytes_per_slot!r}")
    if bytes_per_slot <= 0:
        raise ValueError(f"bytes_per_slot must be a positive integer, got {bytes_per_slot!r}")
    G, S = topology.num_gpus, topology.slots_per_gpu
    changed = old_p != new_p
    layers = changed.any(1).nonzero().flatten().tolist()

    sent = [0] * G  # slot counts; bytes at the end
    received = [0] * G
    local = [0] * G
    slots_changed = changed.view(old_p.shape[0], G, S).sum((0, 2))
    transfers: list[Transfer] = []
    by_layer: dict[int, list[Transfer]] = {}
    actions: dict[int, list[LayerActions]] = {}
    for layer in layers:
        layer_transfers, layer_actions = _plan_layer(
            layer, old_p[layer].tolist(), new_p[layer].tolist(), topology, sent, received, local
        )
        by_layer[layer] = layer_transfers
        transfers.extend(layer_transfers)
        actions[layer] = layer_actions
    return TransferPlan(
        old_phy2log=old_p,
        new_phy2log=new_p,
        topology=topology,
        bytes_per_slot=bytes_per_slot,
        transfers=transfers,
        layers=layers,
        actions=actions,
        bytes_sent=torch.tensor(sent, dtype=torch.int64) * bytes_per_slot,
        bytes_received=torch.tensor(received, dtype=torch.int64) * bytes_per_slot,
        bytes_local=torch.tensor(local, dtype=torch.int64) * bytes_per_slot,
        slots_changed=slots_changed,
        _by_layer=by_layer,
    )


def _plan_layer(
    layer: int,
    old: list[int],
    new: list[int],
    topology: Topology,
    sent: list[int],
    received: list[int],
    local: list[int],
) -> tuple[list[Transfer], list[LayerActions]]:
    """One layer: fills per-rank counters (slot units) and returns (transfers, actions)."""
    G, S = topology.num_gpus, topology.slots_per_gpu
    # first old slot of each expert on each rank, and the ranks holding each expert
    held: list[dict[int, int]] = [{} for _ in range(G)]
    holders: dict[int, list[int]] = {}
    for slot, expert in enumerate(old):
        rank = slot // S
        if expert not in held[rank]:
            held[rank][expert] = slot
            holders.setdefault(expert, []).append(rank)
    missing = sorted({e for e in new if e not in holders})
    if missing:
        raise ValueError(
            f"layer {layer}: new layout places experts {missing[:8]} that no slot holds "
            "in the old layout (the weights would have no source)"
        )

    sent_here = [0] * G  # slots sent in this layer, per rank: spreads each layer's senders
    new_to_old = [list(range(S)) for _ in range(G)]
    fanout = [[-1] * S for _ in range(G)]
    primaries: list[dict[int, int]] = [{} for _ in range(G)]  # rank -> expert -> dst slot
    transfers: list[Transfer] = []
    changed = [0] * G
    copies = [0] * G
    for slot in range(len(new)):
        expert = new[slot]
        if expert == old[slot]:
            continue
        rank, lslot = divmod(slot, S)
        changed[rank] += 1
        if expert in held[rank]:
            new_to_old[rank][lslot] = held[rank][expert] - rank * S
            copies[rank] += 1
            continue
        new_to_old[rank][lslot] = -1
        primary = primaries[rank].get(expert)
        if primary is not None:
            fanout[rank][lslot] = primary - rank * S
            copies[rank] += 1
            continue
        primaries[rank][expert] = slot
        src = _pick_sender(holders[expert], rank, topology, sent_here, sent)
        sent_here[src] += 1
        sent[src] += 1
        received[rank] += 1
        transfers.append(Transfer(layer, expert, src, held[src][expert], rank, slot))

    transfers.sort(key=lambda t: (t.src_rank, t.dst_rank, t.dst_slot))
    recvs: list[list[Transfer]] = [[] for _ in range(G)]
    sends: list[list[Transfer]] = [[] for _ in range(G)]
    for t in transfers:  # already in (src, dst, dst_slot) order
        sends[t.src_rank].append(t)
        recvs[t.dst_rank].append(t)
    # one tensor per field for the whole layer, viewed per rank: few allocations
    maps = torch.tensor([new_to_old, fanout], dtype=torch.int64)  # [2, G, S]
    actions = []
    for rank in range(G):
        recvs[rank].sort(key=lambda t: t.dst_slot)
        local[rank] += copies[rank]
        actions.append(
            LayerActions(
                layer=layer,
                rank=rank,
                new_to_old=maps[0, rank],
                fanout=maps[1, rank],
                recv_slots=torch.tensor(
                    [t.dst_slot - rank * S for t in recvs[rank]], dtype=torch.int64
                ),  # fmt: skip
                recvs=recvs[rank],
                sends=sends[rank],
                changed=changed[rank],
                local_copies=copies[rank],
            )
        )
    return transfers, actions


def _pick_sender(
    candidates: list[int],
    dst: int,
    topology: Topology,
    sent_here: list[int],
    sent_total: list[int],
) -> int:
    """Same node first, then fewest slots sent in this layer, then overall, then nearest."""
    if len(candidates) == 1:
        return candidates[0]
    per_node = topology.gpus_per_node
    node = dst // per_node
    G = topology.num_gpus
    return min(
        candidates,
        key=lambda c: (c // per_node != node, sent_here[c], sent_total[c], (c - dst) % G),
    )


def align_slots(old: ExpertLayout, new: ExpertLayout) -> ExpertLayout:
    """``new`` with each GPU's slots reordered so that experts staying on a GPU keep their slot.

    Which of a GPU's slots holds which of its experts does not matter to serving (the maps
    say where each expert is), so this changes no GPU's set of experts, no load and no
    balancedness, only how many slots must be rewritten. Replica shares move with their slot.

    Args:
        old: the layout in force.
        new: the planned layout (same topology and shape).
    Returns:
        A validated ExpertLayout.
    """
    if old.phy2log.shape != new.phy2log.shape or old.topology != new.topology:
        raise ValueError(
            f"cannot align layouts of shapes {tuple(old.phy2log.shape)} and "
            f"{tuple(new.phy2log.shape)} (topologies {old.topology} / {new.topology})"
        )
    S = new.topology.slots_per_gpu
    old_rows, new_rows = old.phy2log.tolist(), new.phy2log.tolist()
    order = []
    for old_row, new_row in zip(old_rows, new_rows):
        row_order = []
        for start in range(0, len(new_row), S):
            waiting: dict[int, list[int]] = {}
            for j in range(start, start + S):
                waiting.setdefault(new_row[j], []).append(j)
            picked = [
                waiting[e].pop(0) if waiting.get(e) else -1 for e in old_row[start : start + S]
            ]
            rest = iter(sorted(j for js in waiting.values() for j in js))
            row_order.extend(p if p >= 0 else next(rest) for p in picked)
        order.append(row_order)
    index = torch.tensor(order, dtype=torch.int64)
    return ExpertLayout.from_phy2log(
        new.phy2log.gather(1, index), new.topology, new.num_experts,
        replica_share=new.replica_share.gather(1, index),
    )  # fmt: skip


# ---------------------------------------------------------------------- chunks and rounds
def min_staging_bytes(topology: Topology, bytes_per_slot: int) -> int:
    """Smallest staging budget that can move any layer: a full rank of received slots + 1."""
    return (topology.slots_per_gpu + 1) * bytes_per_slot


def chunk_layers(plan: TransferPlan, layers_per_step: int, staging_bytes: int) -> list[list[int]]:
    """Cut the changed layers into chunks, one chunk per engine step.

    A chunk holds at most ``layers_per_step`` layers (0 = no limit), consecutive in
    ``plan.layers``, and on every rank its received bytes plus one slot fit in
    ``staging_bytes`` (received bytes are held until the chunk commits; the slot leaves room
    to send). A single layer always forms a chunk of its own.

    Returns:
        list of chunks, each a list of layer indices.
    """
    if layers_per_step < 0:
        raise ValueError(f"layers_per_step must be >= 0, got {layers_per_step}")
    G, bps = plan.topology.num_gpus, plan.bytes_per_slot
    chunks: list[list[int]] = []
    current: list[int] = []
    held = [0] * G
    for layer in plan.layers:
        recv = [0] * G
        for t in plan.layer_transfers(layer):
            recv[t.dst_rank] += bps
        full = layers_per_step and len(current) >= layers_per_step
        over = any(held[r] + recv[r] + bps > staging_bytes for r in range(G))
        if current and (full or over):
            chunks.append(current)
            current, held = [], [0] * G
        current.append(layer)
        held = [h + x for h, x in zip(held, recv)]
    if current:
        chunks.append(current)
    return chunks


def plan_rounds(plan: TransferPlan, layers: list[int], staging_bytes: int) -> list[list[Transfer]]:
    """Split a chunk's transfers into rounds (one collective each) within the staging budget.

    Each rank holds all its received bytes of the chunk until commit; the rest of its budget
    is what it may send in one round. Transfers are placed first-fit, in plan order, so the
    result is the same on every rank. Within a round, transfers are sorted by
    (src_rank, dst_rank, layer, dst_slot): the order of bytes on the wire.

    Returns:
        list of rounds, each a list of Transfer.
    """
    G, bps = plan.topology.num_gpus, plan.bytes_per_slot
    transfers = [t for layer in layers for t in plan.layer_transfers(layer)]
    recv = [0] * G
    for t in transfers:
        recv[t.dst_rank] += bps
    cap = [staging_bytes - r for r in recv]
    for rank in range(G):
        if any(t.src_rank == rank for t in transfers) and cap[rank] < bps:
            raise ValueError(
                f"staging_bytes={staging_bytes} leaves rank {rank} no room to send one slot "
                f"({bps} bytes) next to the {recv[rank]} bytes it receives in layers {layers}"
            )
    rounds: list[list[Transfer]] = []
    used: list[list[int]] = []
    for t in transfers:
        fits = [i for i, load in enumerate(used) if load[t.src_rank] + bps <= cap[t.src_rank]]
        if fits:
            index = fits[0]
        else:
            index = len(rounds)
            rounds.append([])
            used.append([0] * G)
        rounds[index].append(t)
        used[index][t.src_rank] += bps
    for r in rounds:
        r.sort(key=lambda t: (t.src_rank, t.dst_rank, t.layer, t.dst_slot))
    return rounds


__all__ = [
    "LayerActions",
    "align_slots",
    "Transfer",
    "TransferPlan",
    "chunk_layers",
    "min_staging_bytes",
    "plan_rounds",
    "plan_transfer",
]
