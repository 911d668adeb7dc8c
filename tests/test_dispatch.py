"""slot_loads: the dispatch model, and its agreement with the device op map_and_count."""

from __future__ import annotations

import pytest
import torch

from eplb_plugin import ExpertLayout, Topology, plan, slot_loads
from eplb_plugin.dispatch import dispatch_shares, gpu_loads_of, token_loads
from eplb_plugin.kernels.waterfill import waterfill_shares
from eplb_plugin.traces import steps_from_routing_trace, synthetic_routing_trace


def _case(
    seed: int = 0, ranks: int = 4, nodes: int = 1
) -> tuple[ExpertLayout, torch.Tensor, torch.Tensor]:
    """A layout planned on one step (6 GPUs on ``nodes`` nodes), and (topk_ids [T, L, K],
    rank_counts [R, L, E]) of the next."""
    trace = synthetic_routing_trace(512, 3, 16, 2, seq_tokens=128, seed=seed)
    steps = steps_from_routing_trace(trace.topk_ids, 256, ranks, 16)
    layout = plan(steps[0].sum(0), Topology(24, 1, nodes, 6), policy="deepseek")
    return layout, trace.topk_ids[256:512], steps[1]


def test_static_is_replica_share_split() -> None:
    layout, _, counts = _case()
    loads = slot_loads(layout, counts, "static")
    expected = counts.sum(0).double().gather(1, layout.phy2log) * layout.replica_share.double()
    assert loads.dtype == torch.float64 and loads.shape == layout.phy2log.shape
    assert torch.allclose(loads, expected)


@pytest.mark.parametrize("dispatch", ["static", "local", "node", "global"])
def test_conserves_tokens_and_keeps_singles(dispatch: str) -> None:
    layout, _, counts = _case(1, nodes=3)
    loads = slot_loads(layout, counts, dispatch)
    per_expert = torch.zeros(layout.num_layers, layout.num_experts, dtype=torch.float64)
    per_expert.scatter_add_(1, layout.phy2log, loads)
    assert torch.allclose(per_expert, counts.sum(0).double(), atol=1e-3)
    single = layout.logcnt.gather(1, layout.phy2log) == 1
    full = counts.sum(0).double().gather(1, layout.phy2log)
    assert torch.allclose(loads[single], full[single], atol=1e-4)


def test_global_balances_at_least_as_well_as_local_and_static() -> None:
    peaks = {}
    for dispatch in ("static", "local", "global"):
        total = 0.0
        for seed in range(4):
            layout, _, counts = _case(seed)
            total += float(
                gpu_loads_of(layout, slot_loads(layout, counts, dispatch)).amax(-1).sum()
            )
        peaks[dispatch] = total
    assert peaks["global"] <= peaks["local"] <= peaks["static"]
    assert peaks["global"] < peaks["static"]


def test_local_water_fills_each_rank_on_its_own_counts() -> None:
    layout, _, counts = _case(2)
    loads = slot_loads(layout, counts, "local")
    expected = torch.zeros_like(loads)
    for rank in range(counts.shape[0]):
        share = waterfill_shares(
            counts[rank], layout.phy2log, layout.log2phy, layout.logcnt,
            layout.topology.slots_per_gpu, layout.replica_share, 8,
        )  # fmt: skip
        expected += counts[rank].double().gather(1, layout.phy2log) * share.double()
    assert torch.allclose(loads, expected)
    # one rank: local == global
    one = counts.sum(0, keepdim=True)
    assert torch.allclose(slot_loads(layout, one, "local"), slot_loads(layout, one, "global"))


def test_node_water_fills_each_node_on_its_ranks_summed_counts() -> None:
    layout, _, counts = _case(2, ranks=4, nodes=3)  # 2 GPUs per node: ranks {0, 1}, {2, 3}
    loads = slot_loads(layout, counts, "node")
    expected = torch.zeros_like(loads)
    for ranks in ([0, 1], [2, 3]):
        share = dispatch_shares(layout, counts[ranks].sum(0)).double()
        for rank in ranks:
            expected += counts[rank].double().gather(1, layout.phy2log) * share
    assert torch.allclose(loads, expected)
    assert not torch.allclose(loads, slot_loads(layout, counts, "global"))
    assert not torch.allclose(loads, slot_loads(layout, counts, "local"))
    # one node holding every rank is global; a node per rank is local
    one_node, _, _ = _case(2, ranks=4, nodes=1)
    torch.testing.assert_close(
        slot_loads(one_node, counts, "node"), slot_loads(one_node, counts, "global")
    )
    per_gpu, _, _ = _case(2, ranks=4, nodes=6)
    torch.testing.assert_close(
        slot_loads(per_gpu, counts, "node"), slot_loads(per_gpu, counts, "local")
    )


def test_dispatch_shares_batches_ranks() -> None:
    layout, _, counts = _case(3)
    batched = dispatch_shares(layout, counts)
    assert batched.shape == (counts.shape[0], layout.num_layers, layout.num_slots)
    for rank in range(counts.shape[0]):
        assert torch.equal(batched[rank], dispatch_shares(layout, counts[rank]))


@pytest.mark.parametrize("dispatch", ["static", "local", "node", "global"])
def test_matches_device_op_within_one_token(dispatch: str) -> None:
    from eplb_plugin.kernels.map_and_count import map_and_count

    ranks = 4
    layout, topk_ids, counts = _case(4, ranks, nodes=3)  # node: ranks {0, 1} and {2, 3}
    model = slot_loads(layout, counts, dispatch)
    device = torch.zeros(layout.num_layers, layout.num_slots, dtype=torch.int32)
    shares = [layout.replica_share] * ranks
    if dispatch == "global":
        shares = [dispatch_shares(layout, counts.sum(0))] * ranks
    elif dispatch == "node":
        shares = [dispatch_shares(layout, counts[r // 2 * 2 : r // 2 * 2 + 2].sum(0))
                  for r in range(ranks)]  # fmt: skip
    for layer in range(layout.num_layers):
        for rank in range(ranks):
            ids = topk_ids[rank::ranks, layer].contiguous()  # round-robin dealing
            map_and_count(
                ids, layout.log2phy, layout.logcnt, shares[rank], device, layer, ids.shape[0],
                dispatch="local" if dispatch == "local" else "static",
                phy2log=layout.phy2log, slots_per_gpu=layout.topology.slots_per_gpu,
                seed=rank,
            )  # fmt: skip
    assert (device.double() - model).abs().max() <= ranks + 1e-6
    assert torch.equal(device.sum(1).double(), model.sum(1).round())


def _device_counts(layout, topk_ids, counts, dispatch, seeds, backend):
    """Per-slot counts of the op, rank by rank (round-robin dealing), as the Router calls it.

    ``global``: each rank's op numbers its tokens after the lower ranks' (``offsets``) among
    all ranks' (``totals``), with rank 0's seed; the other modes use their own rank's seed.
    """
    from eplb_plugin.kernels._backend import forced_backend
    from eplb_plugin.kernels.map_and_count import map_and_count

    ranks = counts.shape[0]
    device = torch.zeros(layout.num_layers, layout.num_slots, dtype=torch.int32)
    if dispatch in ("global", "node"):
        # a node's ranks number their tokens after the node's lower ranks', with the seed
        # of its first rank; global is one node of every rank
        size = layout.topology.gpus_per_node if dispatch == "node" else ranks
        nodes = [list(range(first, min(first + size, ranks))) for first in range(0, ranks, size)]
        node_of = {rank: members for members in nodes for rank in members}

        def options(rank: int, layer: int) -> dict:
            members = node_of[rank]
            mine = counts[members].to(torch.int64)
            share = dispatch_shares(layout, counts[members].sum(0))
            return {"seed": int(seeds[members[0]]), "totals": mine.sum(0)[layer],
                    "offsets": mine[: members.index(rank)].sum(0)[layer],
                    "replica_share": share}  # fmt: skip
    else:

        def options(rank: int, layer: int) -> dict:
            return {"dispatch": "local" if dispatch == "local" else "static",
                    "phy2log": layout.phy2log, "slots_per_gpu": layout.topology.slots_per_gpu,
                    "seed": int(seeds[rank]), "replica_share": layout.replica_share}  # fmt: skip

    with forced_backend(backend):
        for layer in range(layout.num_layers):
            for rank in range(ranks):
                ids = topk_ids[rank::ranks, layer].contiguous()
                map_and_count(
                    ids, layout.log2phy, layout.logcnt, counts=device, layer=layer,
                    num_valid=ids.shape[0], **options(rank, layer),
                )  # fmt: skip
    return device


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dispatch", ["static", "local", "node", "global"])
def test_token_loads_equal_the_device_op(dispatch: str, backend: str) -> None:
    if backend == "triton":
        pytest.importorskip("triton")
    ranks = 4
    layout, topk_ids, counts = _case(5, ranks, nodes=3)  # node: ranks {0, 1} and {2, 3}
    seeds = torch.tensor([11, 12, 13, 14]) * 7919
    model = token_loads(layout, counts, dispatch, seeds)
    device = _device_counts(layout, topk_ids, counts, dispatch, seeds, backend)
    assert model.dtype == torch.float64 and torch.equal(model, device.double())
    # the fractions it rounds: within one token per slot per rank
    assert (model - slot_loads(layout, counts, dispatch)).abs().max() <= ranks
    # other seeds round differently (the model follows them)
    assert not torch.equal(token_loads(layout, counts, dispatch), model) or dispatch == "static"


def _router_body(rank: int, world_size: int, dispatch: str, iters: int = 8, nodes: int = 1) -> list:
    """One rank of a gloo group routing its round-robin share of a step through the Router."""
    from eplb_plugin.comm import make_communicator
    from eplb_plugin.maps import ExpertMaps
    from eplb_plugin.routing import Router, dither_seed

    layout, topk_ids, _ = _case(5, world_size, nodes)
    comm = make_communicator("torch")

    def control_path(*args, **kwargs):  # a gloo group beside NCCL: a host sync per layer
        raise AssertionError("routing must all-reduce on the byte-exchange group")

    comm.all_reduce = control_path
    router = Router(dispatch, comm, iters=iters, gpus_per_node=layout.topology.gpus_per_node)
    maps = ExpertMaps.of(layout)
    counts = torch.zeros(layout.num_layers, layout.num_slots, dtype=torch.int32)
    for layer in range(layout.num_layers):
        ids = topk_ids[rank::world_size, layer].contiguous()
        seed = torch.tensor(dither_seed(3, 7, rank, world_size))
        phys = router(ids, maps, counts, layer, seed=seed)
        assert torch.equal(layout.phy2log[layer][phys], ids)
    return counts.tolist()


@pytest.mark.parametrize(
    "dispatch,iters,ranks",
    [("static", 8, 2), ("local", 8, 2), ("global", 8, 2), ("local", 1, 2), ("global", 1, 2),
     ("node", 8, 4)],
)  # fmt: skip
def test_router_over_ranks_realizes_token_loads(dispatch: str, iters: int, ranks: int) -> None:
    from dist_utils import run_ranks

    from eplb_plugin.routing import dither_seed

    nodes = 3 if dispatch == "node" else 1  # 2 GPUs per node: ranks {0, 1} and {2, 3}
    layout, _, counts = _case(5, ranks, nodes)
    results = run_ranks(_router_body, ranks, dispatch, iters, nodes, timeout=120.0)
    device = torch.tensor(results).sum(0).double()
    seeds = [dither_seed(3, 7, rank, ranks) for rank in range(ranks)]
    assert torch.equal(device, token_loads(layout, counts, dispatch, seeds, iters))
    if iters != 8:  # the Router's sweeps (EplbConfig.waterfill_iters) are the ones it runs
        assert not torch.equal(device, token_loads(layout, counts, dispatch, seeds, 8))


def test_token_loads_one_rank_of_singles_is_exact() -> None:
    layout, _, counts = _case(6)
    loads = token_loads(layout, counts, "static")
    single = layout.logcnt.gather(1, layout.phy2log) == 1
    fractional = slot_loads(layout, counts, "static")
    assert torch.equal(loads[single], fractional[single])
    assert torch.equal(loads, loads.round())
    per_expert = torch.zeros(layout.num_layers, layout.num_experts, dtype=torch.float64)
    per_expert.scatter_add_(1, layout.phy2log, loads)
    assert torch.equal(per_expert, counts.sum(0).double())


def test_token_loads_bad_input() -> None:
    layout, _, counts = _case()
    with pytest.raises(ValueError, match="whole numbers"):
        token_loads(layout, counts + 0.5, "static")
    with pytest.raises(ValueError, match="seeds"):
        token_loads(layout, counts, "static", seeds=[1, 2])
    with pytest.raises(ValueError, match="seeds"):
        token_loads(layout, counts, "static", seeds=[0.5] * counts.shape[0])
    with pytest.raises(ValueError, match="dispatch"):
        token_loads(layout, counts, "random")


def test_every_mode_has_a_row_in_the_waterfill_table() -> None:
    from eplb_plugin.dispatch import DISPATCH_MODES, WATERFILL_COUNTS

    assert tuple(WATERFILL_COUNTS) == DISPATCH_MODES
    assert set(WATERFILL_COUNTS.values()) <= {None, "rank", "node", "all"}


def test_bad_input() -> None:
    layout, _, counts = _case()
    with pytest.raises(ValueError, match="dispatch"):
        slot_loads(layout, counts, "random")
    with pytest.raises(ValueError, match="rank_counts"):
        slot_loads(layout, counts[:, :, :5], "static")
    with pytest.raises(ValueError, match="non-negative"):
        slot_loads(layout, -counts, "global")


def test_node_router_needs_the_node_size_and_a_communicator_that_splits() -> None:
    from eplb_plugin.comm import LocalCommunicator
    from eplb_plugin.routing import Router

    comm = LocalCommunicator()
    assert comm.split(8) is comm and Router("node", comm).comm is comm  # one rank: no split
    comm.world_size = 4  # a stand-in for 4 ranks that cannot make groups
    assert comm.split(4) is comm and comm.split(1).world_size == 1
    with pytest.raises(NotImplementedError, match="cannot split"):
        comm.split(2)
    with pytest.raises(ValueError, match="size"):
        comm.split(0)
    with pytest.raises(ValueError, match="gpus_per_node"):
        Router("node", comm)
    assert Router("node", comm, gpus_per_node=1).comm.world_size == 1  # a node per rank
    assert Router("global", comm).comm is comm
