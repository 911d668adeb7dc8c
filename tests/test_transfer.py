"""Transfer planning (pure): who copies, sends and receives what when the layout changes."""

from __future__ import annotations

import pytest
import torch

from eplb_plugin.layout import ExpertLayout, Topology
from eplb_plugin.policies import plan
from eplb_plugin.transfer import (
    align_slots,
    chunk_layers,
    min_staging_bytes,
    plan_rounds,
    plan_transfer,
)


def random_phy2log(gen: torch.Generator, layers: int, experts: int, slots: int) -> torch.Tensor:
    """[L, P] int64: every expert at least once, the rest random, shuffled."""
    rows = []
    for _ in range(layers):
        extra = torch.randint(0, experts, (slots - experts,), generator=gen)
        row = torch.cat([torch.arange(experts), extra])
        rows.append(row[torch.randperm(slots, generator=gen)])
    return torch.stack(rows)


def apply_plan(plan, old: torch.Tensor) -> torch.Tensor:
    """Replay every rank's actions on symbolic slot contents (expert ids); returns [L, P]."""
    t = plan.topology
    S = t.slots_per_gpu
    result = old.clone()
    for layer, per_rank in plan.actions.items():
        for a in per_rank:
            local_old = old[layer, a.rank * S : (a.rank + 1) * S]
            local = local_old.clone()
            moved = a.new_to_old >= 0
            local[moved] = local_old[a.new_to_old[moved]]
            local[~moved] = -7  # must be overwritten below
            for slot, tr in zip(a.recv_slots.tolist(), a.recvs):
                assert old[layer, tr.src_slot] == tr.expert  # sender reads the old contents
                local[slot] = old[layer, tr.src_slot]
            fan = a.fanout >= 0
            local[fan] = local[a.fanout[fan]]
            result[layer, a.rank * S : (a.rank + 1) * S] = local
    return result


def test_hand_case_local_copy_receive_and_fanout():
    topo = Topology(num_replicas=4, num_gpus=2)
    old = torch.tensor([[0, 1, 2, 0]])
    new = torch.tensor([[0, 2, 1, 1]])
    plan = plan_transfer(old, new, topo, bytes_per_slot=10)
    # rank 0 needs expert 2 (held only by rank 1, slot 2); rank 1 needs expert 1 twice
    # (held only by rank 0, slot 1): received once into slot 2, fanned out to slot 3.
    got = {(t.src_rank, t.src_slot, t.dst_rank, t.dst_slot, t.expert) for t in plan.transfers}
    assert got == {(1, 2, 0, 1, 2), (0, 1, 1, 2, 1)}
    r1 = plan.actions[0][1]
    assert r1.fanout.tolist() == [-1, 0]
    assert r1.recv_slots.tolist() == [0]
    assert plan.bytes_sent.tolist() == [10, 10]
    assert plan.bytes_received.tolist() == [10, 10]
    assert plan.bytes_local.tolist() == [0, 10]
    assert plan.slots_changed.tolist() == [1, 2]
    assert torch.equal(apply_plan(plan, old), new)


def test_expert_held_locally_is_copied_not_received():
    topo = Topology(num_replicas=4, num_gpus=2)
    old = torch.tensor([[0, 1, 2, 3]])
    new = torch.tensor([[1, 0, 3, 2]])  # swaps inside each rank
    plan = plan_transfer(old, new, topo, bytes_per_slot=8)
    assert plan.transfers == []
    assert plan.total_bytes == 0
    assert plan.bytes_local.tolist() == [16, 16]
    assert plan.actions[0][0].new_to_old.tolist() == [1, 0]
    assert torch.equal(apply_plan(plan, old), new)


def test_unchanged_layout_moves_nothing():
    topo = Topology(num_replicas=8, num_gpus=4)
    old = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1]] * 3)
    plan = plan_transfer(old, old.clone(), topo, bytes_per_slot=4)
    assert plan.layers == [] and plan.transfers == [] and plan.actions == {}
    assert chunk_layers(plan, 1, 100) == []


@pytest.mark.parametrize("gpus,nodes", [(2, 1), (4, 2), (8, 2), (8, 4)])
def test_random_layouts_replay_exactly_and_bytes_add_up(gpus, nodes):
    gen = torch.Generator().manual_seed(gpus * 10 + nodes)
    slots_per_gpu, layers, bps = 4, 6, 96
    experts = gpus * slots_per_gpu - 2  # a few redundant slots
    topo = Topology(num_replicas=gpus * slots_per_gpu, num_nodes=nodes, num_gpus=gpus)
    for _ in range(10):
        old = random_phy2log(gen, layers, experts, topo.num_replicas)
        new = random_phy2log(gen, layers, experts, topo.num_replicas)
        plan = plan_transfer(old, new, topo, bps)
        assert torch.equal(apply_plan(plan, old), new)
        S = slots_per_gpu
        for t in plan.transfers:
            dst_old = old[t.layer, t.dst_rank * S : (t.dst_rank + 1) * S]
            assert t.expert not in dst_old.tolist()  # never receive what is already local
            assert old[t.layer, t.dst_slot] != new[t.layer, t.dst_slot]  # only changed slots
        # one receive per (layer, rank, expert) missing locally: fan-out, not re-sends
        keys = [(t.layer, t.dst_rank, t.expert) for t in plan.transfers]
        assert len(keys) == len(set(keys))
        recv = torch.zeros(gpus, dtype=torch.int64)
        sent = torch.zeros(gpus, dtype=torch.int64)
        for t in plan.transfers:
            recv[t.dst_rank] += bps
            sent[t.src_rank] += bps
        assert torch.equal(plan.bytes_received, recv) and torch.equal(plan.bytes_sent, sent)
        assert int(plan.slots_changed.sum()) == int((old != new).sum())
        for layer, per_rank in plan.actions.items():
            for a in per_rank:
                assert a.changed == int((old[layer] != new[layer]).view(gpus, S)[a.rank].sum())
                assert a.changed == len(a.recvs) + a.local_copies


def test_same_node_sender_preferred():
    # 4 GPUs on 2 nodes, 2 slots each; expert 5 is held on rank 1 (node 0) and rank 2
    # (node 1). Rank 3 (node 1) needs it -> from rank 2; rank 0 (node 0) -> from rank 1.
    topo = Topology(num_replicas=8, num_nodes=2, num_gpus=4)
    old = torch.tensor([[0, 1, 5, 2, 5, 3, 4, 6]])
    new = torch.tensor([[5, 1, 0, 2, 3, 6, 5, 4]])
    plan = plan_transfer(old, new, topo, bytes_per_slot=1)
    src_of = {(t.dst_rank, t.expert): t.src_rank for t in plan.transfers}
    assert src_of[(3, 5)] == 2
    assert src_of[(0, 5)] == 1
    assert plan.cross_node_bytes == sum(
        1 for t in plan.transfers if (t.src_rank >= 2) != (t.dst_rank >= 2)
    )


def test_senders_spread_over_holders():
    # expert 0 held by ranks 0, 1, 2; ranks 3, 4, 5 each need it: three distinct senders
    topo = Topology(num_replicas=12, num_gpus=6)
    old = torch.tensor([[0, 1, 0, 2, 0, 3, 4, 5, 6, 7, 8, 9]])
    new = torch.tensor([[0, 1, 0, 2, 0, 3, 0, 5, 0, 7, 0, 9]])
    new_full = new.clone()
    new_full[0, [1, 3, 5]] = torch.tensor([4, 6, 8])  # keep every expert placed somewhere
    plan = plan_transfer(old, new_full, topo, bytes_per_slot=1)
    senders = sorted(t.src_rank for t in plan.transfers if t.expert == 0)
    assert senders == [0, 1, 2]


def test_chunks_respect_layers_per_step_and_budget():
    gen = torch.Generator().manual_seed(7)
    topo = Topology(num_replicas=16, num_gpus=4)
    old = random_phy2log(gen, 9, 10, 16)
    new = random_phy2log(gen, 9, 10, 16)
    bps = 100
    plan = plan_transfer(old, new, topo, bps)
    assert plan.layers == list(range(9))
    assert chunk_layers(plan, 0, 10**9) == [plan.layers]
    chunks = chunk_layers(plan, 2, 10**9)
    assert [len(c) for c in chunks] == [2, 2, 2, 2, 1]
    budget = min_staging_bytes(topo, bps)
    chunks = chunk_layers(plan, 0, budget)
    assert sum(chunks, []) == plan.layers
    for chunk in chunks:
        recv = [0] * 4
        for layer in chunk:
            for t in plan.layer_transfers(layer):
                recv[t.dst_rank] += bps
        assert len(chunk) == 1 or max(recv) + bps <= budget
        rounds = plan_rounds(plan, chunk, budget)
        flat = sorted((t for r in rounds for t in r), key=lambda t: (t.layer, t.dst_slot))
        want = sorted(
            (t for layer in chunk for t in plan.layer_transfers(layer)),
            key=lambda t: (t.layer, t.dst_slot),
        )
        assert flat == want
        for r in rounds:
            for rank in range(4):
                sent = bps * sum(1 for t in r if t.src_rank == rank)
                assert recv[rank] + sent <= budget


def test_bad_input():
    topo = Topology(num_replicas=4, num_gpus=2)
    old = torch.tensor([[0, 1, 2, 3]])
    with pytest.raises(ValueError, match="shape"):
        plan_transfer(old, torch.tensor([[0, 1, 2, 3, 0]]), topo, 1)
    with pytest.raises(ValueError, match="no slot holds"):
        plan_transfer(old, torch.tensor([[0, 1, 2, 4]]), topo, 1)
    with pytest.raises(ValueError, match="bytes_per_slot"):
        plan_transfer(old, old, topo, 0)
    with pytest.raises(ValueError, match="num_replicas"):
        plan_transfer(old, old, Topology(num_replicas=8, num_gpus=2), 1)
    with pytest.raises(ValueError, match="phy2log"):
        plan_transfer(old.float(), old, topo, 1)


def test_align_slots_keeps_gpu_sets_and_rewrites_fewer_slots():
    gen = torch.Generator().manual_seed(11)
    topo = Topology(num_replicas=24, num_groups=4, num_nodes=2, num_gpus=4)
    load_a = torch.rand(5, 20, generator=gen) ** 3 * 100
    load_b = load_a * (0.5 + torch.rand(5, 20, generator=gen))
    old, new = plan(load_a, topo), plan(load_b, topo)
    aligned = align_slots(old, new)
    per_gpu = lambda lay: lay.phy2log.view(5, 4, 6).sort(-1).values  # noqa: E731
    assert torch.equal(per_gpu(aligned), per_gpu(new))
    assert aligned.balancedness(load_b) == pytest.approx(new.balancedness(load_b))
    changed = lambda lay: int((lay.phy2log != old.phy2log).sum())  # noqa: E731
    assert changed(aligned) < changed(new)
    # only experts that leave a GPU (or arrive on it) cost a slot write
    for layer in range(5):
        for g in range(4):
            o = old.phy2log[layer, g * 6 : (g + 1) * 6].tolist()
            a = aligned.phy2log[layer, g * 6 : (g + 1) * 6].tolist()
            kept = sum(min(o.count(e), a.count(e)) for e in set(o))
            assert sum(x == y for x, y in zip(o, a)) == kept


def test_align_slots_undoes_a_permutation_within_each_gpu():
    topo = Topology(num_replicas=8, num_gpus=2)
    old = ExpertLayout.from_phy2log(torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1]]), topo, 6)
    shuffled = ExpertLayout.from_phy2log(torch.tensor([[3, 2, 0, 1, 1, 0, 5, 4]]), topo, 6)
    assert align_slots(old, shuffled).equals(old)
