"""Executor: applies one chunk of a transfer plan to this rank's expert tensors, in place.

A chunk is transactional across ranks:

1. **stage**: in rounds (one bounded ``all_to_all`` each), every rank packs the old contents
   of the slots it sends and receives the slots it needs into a staging arena. No expert
   tensor is written. Before each round, and once after the last, the ranks vote (one
   all-reduce of "all fine so far" on the control group) and all stop at the first vote that
   fails. A rank that fails locally (the arena cannot be allocated, packing raises, an
   exchange raises before its bytes went out) votes no at its next vote, so its peers learn
   of it at once instead of waiting on a collective it will not join. A rank whose exchange
   raised locally joins that exchange once more from throwaway buffers first, since its
   peers are already inside it;
2. **vote**: the vote after the last round; the chunk commits only if every rank staged;
3. **commit** (local, no communication): the local shuffle (``shuffle_experts``: kept slots,
   local copies), then received slots (``unpack_slots``), then fan-out copies of received
   slots; a second vote confirms that every rank committed. The caller then switches the
   mapping tensors.

On a failed vote every rank discards its staging and keeps its old weights (they were never
written). On a communication error or timeout the communicator is broken; the rank keeps its
old weights and the caller must stop rebalancing (the other ranks fail their vote or time out
too, and keep theirs).

Extra memory: one arena per chunk holding the chunk's received bytes plus the largest round
of sent bytes (or one staging row of every tensor for the shuffle, whichever is larger); the
chunking keeps it within ``staging_bytes``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .comm.base import CommError, Communicator
from .layout import Topology
from .transfer import Transfer, TransferPlan, chunk_layers, min_staging_bytes, plan_rounds

log = logging.getLogger("eplb_plugin.runtime")

# Staging rows of the kernels' shuffle start on 16-byte boundaries; see shuffle_reserve_bytes.
_ALIGN = 16


def kernel_ops():
    """(shuffle_experts, pack_slots, unpack_slots, bytes_per_slot) from ``eplb_plugin.kernels``.

    Imported on first use so that importing the runtime never imports Triton.
    """
    from eplb_plugin.kernels import bytes_per_slot, pack_slots, shuffle_experts, unpack_slots

    return shuffle_experts, pack_slots, unpack_slots, bytes_per_slot


def shuffle_reserve_bytes(tensors: list[torch.Tensor], bytes_per_slot: int) -> int:
    """Arena bytes to keep free for the shuffle: one slot row per tensor, each 16-aligned."""
    return max(bytes_per_slot, bytes_per_slot + _ALIGN * len(tensors))


@dataclass
class ChunkResult:
    """Outcome of one chunk on this rank.

    Attributes:
        layers: the chunk's layers.
        ok: True iff every rank staged the chunk and this rank committed it.
        error: why not, when not ok (this rank's error, or that another rank failed).
        comm_broken: the communicator failed or timed out; stop using it.
        inconsistent: a rank failed while committing, after every rank had voted to commit:
            peers may have committed, this rank's weights may match neither layout. Serving
            must stop (the Balancer raises :class:`InconsistentWeightsError`).
        bytes_sent, bytes_received: bytes this rank put on / took off the wire.
        slots_changed: local slots whose expert changed (0 unless committed).
        arena_bytes: size of the staging arena this chunk used.
        seconds: wall time of the chunk on this rank.
    """

    layers: list[int]
    ok: bool
    error: str | None = None
    comm_broken: bool = False
    inconsistent: bool = False
    bytes_sent: int = 0
    bytes_received: int = 0
    slots_changed: int = 0
    arena_bytes: int = 0
    seconds: float = 0.0


FaultHook = Callable[[str, int], None]

_INCONSISTENT = (
    "; weights were overwritten in place and may match neither layout: serving must stop"
)


class InconsistentWeightsError(RuntimeError):
    """A commit failed after every rank voted to commit: weights and maps may disagree.

    The one failure a rebalance cannot undo (the commit overwrites slots in place). Raised
    out of ``Balancer.step()`` on every rank, because serving on would give wrong tokens.
    """


class _LayerError(Exception):
    def __init__(self, layer: int, cause: BaseException):
        super().__init__(str(cause))
        self.layer, self.cause = layer, cause


class Executor:
    """Moves expert weights of this rank, chunk by chunk.

    Args:
        expert_tensors: ``expert_tensors[layer]`` = this rank's tensors of that layer, dim 0
            = its ``slots_per_gpu`` local slots (any dtypes: bf16, fp8, scales, biases).
        topology: slot placement (``num_gpus`` = communicator world size).
        comm: the Communicator.
        staging_bytes: per-rank budget of the staging arena.
        bytes_per_slot: bytes of one slot over a layer's tensors (default: measured; every
            layer must have the same).
        fault: test hook ``fault(point, index)`` called at ``("stage", first layer)`` before
            the chunk's arena is set up, ``("pack", layer)`` before packing a layer's sends,
            ``("exchange", round)`` inside each exchange, before the bytes go out, and
            ``("commit", layer)`` before committing a layer; it may raise, sleep or exit.
    """

    def __init__(
        self,
        expert_tensors: list[list[torch.Tensor]],
        topology: Topology,
        comm: Communicator,
        *,
        staging_bytes: int,
        bytes_per_slot: int | None = None,
        fault: FaultHook | None = None,
    ) -> None:
        shuffle, pack, unpack, measure = kernel_ops()
        self._shuffle, self._pack, self._unpack = shuffle, pack, unpack
        if comm.world_size != topology.num_gpus:
            raise ValueError(
                f"communicator has {comm.world_size} ranks but topology.num_gpus="
                f"{topology.num_gpus}"
            )
        if not expert_tensors:
            raise ValueError("expert_tensors must list each layer's tensors, got none")
        sizes = set()
        for layer, tensors in enumerate(expert_tensors):
            if not tensors:
                raise ValueError(f"expert_tensors[{layer}] is empty")
            for i, t in enumerate(tensors):
                if t.dim() < 1 or t.shape[0] != topology.slots_per_gpu:
                    raise ValueError(
                        f"expert_tensors[{layer}][{i}] has shape {tuple(t.shape)}; dim 0 must "
                        f"be this rank's {topology.slots_per_gpu} slots"
                    )
            sizes.add(measure(tensors))
        if len(sizes) != 1:
            raise ValueError(f"layers differ in bytes per slot: {sorted(sizes)}")
        measured = sizes.pop()
        if bytes_per_slot is not None and bytes_per_slot != measured:
            raise ValueError(
                f"bytes_per_slot={bytes_per_slot} but the tensors hold {measured} bytes per slot"
            )
        self.expert_tensors = expert_tensors
        self.topology = topology
        self.comm = comm
        self.rank = comm.rank
        self.bytes_per_slot = measured
        self.reserve_bytes = max(shuffle_reserve_bytes(t, measured) for t in expert_tensors)
        need = min_staging_bytes(topology, measured) - measured + self.reserve_bytes
        if staging_bytes < need:
            raise ValueError(
                f"staging_bytes={staging_bytes} is too small: one layer may need {need} bytes "
                f"({topology.slots_per_gpu} received slots of {measured} bytes plus room to "
                "send or shuffle one slot)"
            )
        self.staging_bytes = staging_bytes
        self.fault = fault
        self.device = expert_tensors[0][0].device
        self._arena: torch.Tensor | None = None

    # ------------------------------------------------------------------ planning
    def chunks(self, plan: TransferPlan, layers_per_step: int) -> list[list[int]]:
        """The plan's changed layers cut into chunks (same on every rank)."""
        return chunk_layers(
            plan, layers_per_step, self.staging_bytes - self.reserve_bytes + plan.bytes_per_slot
        )

    def _sizes(self, plan: TransferPlan, layers: list[int]):
        """(rounds, bytes received per round, bytes sent per round, arena bytes) on this rank."""
        r, bps = self.rank, plan.bytes_per_slot
        rounds = plan_rounds(plan, layers, self.staging_bytes - self.reserve_bytes + bps)
        recv_sizes = [bps * sum(1 for t in rnd if t.dst_rank == r) for rnd in rounds]
        send_sizes = [bps * sum(1 for t in rnd if t.src_rank == r) for rnd in rounds]
        arena = sum(recv_sizes) + max(max(send_sizes, default=0), self.reserve_bytes)
        return rounds, recv_sizes, send_sizes, arena

    def new_arena(
        self, plan: TransferPlan, chunks: list[list[int]], touch: bool = False
    ) -> torch.Tensor:
        """A uint8 arena large enough for every chunk of ``plan`` (safe from any thread).

        ``touch`` writes it once so that, on the CPU, its pages fault in now (e.g. in a
        background thread) rather than while a chunk runs.
        """
        size = max((self._sizes(plan, chunk)[3] for chunk in chunks), default=0)
        arena = torch.empty(size, dtype=torch.uint8, device=self.device)
        if touch and arena.device.type == "cpu":
            arena.zero_()
        return arena

    def adopt(self, arena: torch.Tensor | None) -> None:
        """Use ``arena`` (from :meth:`new_arena`) for the following chunks."""
        self._arena = arena

    def reserve(self, plan: TransferPlan, chunks: list[list[int]]) -> int:
        """Allocate one arena for all ``chunks`` of ``plan`` (the largest any chunk needs).

        Optional: without it each chunk allocates its own. Reusing one arena over the chunks
        of a rebalance saves an allocation per chunk (on the CPU, fresh pages fault on first
        touch). Returns its size in bytes; :meth:`release` frees it.
        """
        self._arena = self.new_arena(plan, chunks)
        return self._arena.numel()

    def release(self) -> None:
        """Free the arena of :meth:`reserve` (idempotent)."""
        self._arena = None

    # ------------------------------------------------------------------ one chunk
    def run_chunk(self, plan: TransferPlan, layers: list[int]) -> ChunkResult:
        """Stage, vote and commit ``layers`` of ``plan`` on this rank (collective).

        Every round's exchange is preceded by a vote on the control group, and one more
        vote follows the last round: all ranks stop at the first vote that fails. A rank
        whose staging fails locally (the arena, packing, an exchange that raised before its
        bytes went out) votes no at its next vote, so its peers abandon the chunk at that
        vote instead of waiting for bytes that never come.
        """
        start = time.perf_counter()
        r = self.rank
        result = ChunkResult(layers=list(layers), ok=False)
        error: str | None = None
        rounds: list[list[Transfer]] = []
        try:
            if self.fault is not None:
                self.fault("stage", layers[0] if layers else -1)
            rounds, recv_sizes, send_sizes, arena_bytes = self._sizes(plan, layers)
            result.arena_bytes = arena_bytes
            if self._arena is not None and self._arena.numel() >= arena_bytes:
                arena = self._arena[:arena_bytes]
            else:
                arena = torch.empty(arena_bytes, dtype=torch.uint8, device=self.device)
        except Exception as exc:  # noqa: BLE001 - told to the peers by the first vote
            error = self._describe(exc, "staging", None, layers)
            log.error(error)
            rounds = []
        segments: list[tuple[int, list[Transfer]]] = []  # (arena offset, transfers) per source
        if error is None:
            received = sum(recv_sizes)
            scratch = arena[received:]
        offset = 0
        for k, rnd in enumerate(rounds):
            mine = [t for t in rnd if t.src_rank == r]
            send = scratch[: send_sizes[k]]
            if error is None:
                try:
                    self._pack_round(mine, send)
                except _LayerError as exc:
                    error = self._describe(exc.cause, "packing", exc.layer, layers)
                    log.error(error)
            if not self._vote(error is None, result, layers):
                break
            ranks = range(self.comm.world_size)
            send_splits = [self.bytes_per_slot * sum(1 for t in mine if t.dst_rank == d)
                           for d in ranks]  # fmt: skip
            recv_splits = [
                self.bytes_per_slot * sum(1 for t in rnd if t.dst_rank == r and t.src_rank == s)
                for s in ranks
            ]
            recv = arena[offset : offset + recv_sizes[k]]
            for s in ranks:
                from_s = [t for t in rnd if t.dst_rank == r and t.src_rank == s]
                if from_s:
                    segments.append((offset, from_s))
                    offset += self.bytes_per_slot * len(from_s)
            error = self._exchange(k, send, send_splits, recv, recv_splits, result, layers)
            if result.comm_broken:
                return self._finish(result, start)
        else:
            # after the last round (or at once, when staging failed before any round)
            if self._vote(error is None, result, layers):
                return self._commit_voted(plan, layers, arena, segments, scratch, result, start)
        if not result.comm_broken:
            result.error = error or (
                f"rank {r}: another rank failed to stage layers {layers}; keeping the old layout"
            )
            if error is None:
                log.warning(result.error)
        return self._finish(result, start)

    def _vote(self, ok: bool, result: ChunkResult, layers: list[int]) -> bool:
        """One staging vote on the control group; a failed collective breaks the chunk."""
        try:
            return self.comm.agree(ok)
        except CommError as exc:
            result.comm_broken = True
            result.error = self._describe(exc, "voting", None, layers)
            log.error(result.error)
            return False

    def _exchange(
        self,
        k: int,
        send: torch.Tensor,
        send_splits: list[int],
        recv: torch.Tensor,
        recv_splits: list[int],
        result: ChunkResult,
        layers: list[int],
    ) -> str | None:
        """Round ``k``'s all_to_all; returns this rank's local error (None if fine).

        A local error (the communicator is not broken: nothing went out) is followed by the
        same exchange from throwaway buffers, because the peers are already inside the
        collective; the next vote then tells them. A communication error sets
        ``result.comm_broken``.
        """
        try:
            if self.fault is not None:
                self.fault("exchange", k)
            self.comm.all_to_all(send, send_splits, recv, recv_splits)
        except Exception as exc:  # noqa: BLE001 - local or communication failure, see below
            doing = f"exchanging round {k} of"
            if isinstance(exc, CommError) or self.comm.broken:
                result.comm_broken = True
                result.error = self._describe(exc, doing, None, layers)
                log.error(result.error)
                return result.error
            error = self._describe(exc, doing, None, layers)
            log.error(error)
            try:
                self.comm.all_to_all(
                    torch.zeros(sum(send_splits), dtype=torch.uint8, device=self.device),
                    send_splits,
                    torch.empty(sum(recv_splits), dtype=torch.uint8, device=self.device),
                    recv_splits,
                )
            except Exception as again:  # noqa: BLE001 - the peers cannot be released: broken
                result.comm_broken = True
                result.error = self._describe(again, doing, None, layers)
                log.error(result.error)
            return error
        result.bytes_sent += sum(send_splits)
        result.bytes_received += sum(recv_splits)
        return None

    def _commit_voted(
        self,
        plan: TransferPlan,
        layers: list[int],
        arena: torch.Tensor,
        segments: list[tuple[int, list[Transfer]]],
        scratch: torch.Tensor,
        result: ChunkResult,
        start: float,
    ) -> ChunkResult:
        """Commit after a unanimous staging vote, then confirm with a second vote."""
        r = self.rank
        commit_error: str | None = None
        try:
            result.slots_changed = self._commit(plan, layers, arena, segments, scratch)
        except _LayerError as exc:
            commit_error = self._describe(exc.cause, "committing", exc.layer, layers, _INCONSISTENT)
        # The commit overwrites weights in place, so it cannot be undone; a second vote lets
        # every rank learn whether all committed, so that none serves maps its peers dropped.
        try:
            committed = self.comm.agree(commit_error is None)
        except CommError as exc:
            committed, result.comm_broken = False, True
            commit_error = commit_error or self._describe(
                exc, "confirming the commit of", None, layers, _INCONSISTENT
            )
        if not committed:
            result.inconsistent = True
            result.error = commit_error or (
                f"rank {r}: another rank failed while committing layers {layers}{_INCONSISTENT}"
            )
            log.critical(result.error)
            return self._finish(result, start)
        result.ok = True
        return self._finish(result, start)

    # ------------------------------------------------------------------ pieces
    def _pack_round(self, mine: list[Transfer], send: torch.Tensor) -> None:
        """Pack the old contents of this rank's sends, in wire order, into ``send``."""
        S, bps = self.topology.slots_per_gpu, self.bytes_per_slot
        i = 0
        while i < len(mine):
            j = i
            while j < len(mine) and (mine[j].layer, mine[j].dst_rank) == (
                mine[i].layer,
                mine[i].dst_rank,
            ):
                j += 1
            layer = mine[i].layer
            try:
                if self.fault is not None:
                    self.fault("pack", layer)
                slots = torch.tensor([t.src_slot - self.rank * S for t in mine[i:j]])
                self._pack(self.expert_tensors[layer], slots, out=send[i * bps : j * bps])
            except Exception as exc:  # noqa: BLE001 - any local failure aborts the chunk
                raise _LayerError(layer, exc) from exc
            i = j

    def _commit(
        self,
        plan: TransferPlan,
        layers: list[int],
        arena: torch.Tensor,
        segments: list[tuple[int, list[Transfer]]],
        scratch: torch.Tensor,
    ) -> int:
        S, bps = self.topology.slots_per_gpu, self.bytes_per_slot
        identity = torch.arange(S)
        changed = 0
        for layer in layers:
            try:
                if self.fault is not None:
                    self.fault("commit", layer)
                actions = plan.actions[layer][self.rank]
                tensors = self.expert_tensors[layer]
                moves = actions.new_to_old
                if bool(((moves != identity) & (moves >= 0)).any()):
                    self._shuffle(tensors, moves, staging=scratch)
                for offset, run in segments:
                    # a segment is one source's slots of one round in (layer, dst_slot) order
                    rows = [i for i, t in enumerate(run) if t.layer == layer]
                    if rows:
                        first, last = rows[0], rows[-1] + 1
                        slots = torch.tensor([t.dst_slot - self.rank * S for t in run[first:last]])
                        view = arena[offset + first * bps : offset + last * bps]
                        self._unpack(tensors, slots, view)
                if bool((actions.fanout >= 0).any()):
                    self._shuffle(tensors, actions.fanout, staging=scratch)
            except Exception as exc:  # noqa: BLE001 - reported to every rank by the second vote
                raise _LayerError(layer, exc) from exc
            changed += actions.changed
        return changed

    def _describe(
        self,
        exc: BaseException,
        doing: str,
        layer: int | None,
        layers: list[int],
        outcome: str = "; keeping the old layout and weights",
    ) -> str:
        where = f"layer {layer}" if layer is not None else f"layers {layers}"
        return (
            f"rank {self.rank}: rebalance failed while {doing} {where}: "
            f"{type(exc).__name__}: {exc}{outcome}"
        )

    @staticmethod
    def _finish(result: ChunkResult, start: float) -> ChunkResult:
        result.seconds = time.perf_counter() - start
        return result


__all__ = [
    "ChunkResult",
    "Executor",
    "InconsistentWeightsError",
    "kernel_ops",
    "shuffle_reserve_bytes",
]
