"""Topology of an expert-parallel deployment and the expert layout placed on it.

Vocabulary (the same words everywhere in the project):

- logical expert ``e`` in ``[0, E)``: an expert of the model;
- physical slot ``p`` in ``[0, P)``: one place on a GPU that holds one copy of one expert;
  slot ``p`` lives on GPU ``p // slots_per_gpu`` and a node's GPUs are contiguous;
- ``phy2log`` [L, P]: logical expert held by each slot;
- ``log2phy`` [L, E, X]: slots holding each expert, padded with -1;
- ``logcnt`` [L, E]: number of replicas of each expert;
- ``replica_share`` [L, P]: fraction of its expert's tokens each slot should receive.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import torch

from .fileio import atomic_write

LAYOUT_FORMAT = "eplb-layout"
LAYOUT_VERSION = 1


def _check_positive_int(name: str, value: object) -> int:
    """``value`` as a plain int (numpy and torch integer scalars accepted); ValueError else."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        if not (isinstance(value, torch.Tensor) and value.dim() == 0 and not (
            value.dtype.is_floating_point or value.dtype == torch.bool or value.is_complex()
        )):  # fmt: skip
            raise ValueError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return value


@dataclass(frozen=True)
class Topology:
    """Where physical slots live.

    ``num_replicas`` physical slots (P) spread evenly over ``num_gpus`` GPUs, which are
    spread over ``num_nodes`` nodes; ``num_groups`` expert groups (DeepSeek's group-limited
    routing) decide whether placement may be hierarchical.

    As in deepseek-ai/EPLB, groups and nodes are constrained only where placement is
    hierarchical (``num_groups % num_nodes == 0``): then the GPUs must divide over the nodes
    (and the experts over the groups, :meth:`check_experts`). Otherwise placement is global
    and nodes only say which transfers stay within a node: a node then holds
    ``ceil(num_gpus / num_nodes)`` consecutive GPUs.
    """

    num_replicas: int
    num_groups: int = 1
    num_nodes: int = 1
    num_gpus: int = 1

    def __post_init__(self) -> None:
        for name in ("num_replicas", "num_groups", "num_nodes", "num_gpus"):
            # frozen: plain ints in place of numpy/torch integers
            object.__setattr__(self, name, _check_positive_int(name, getattr(self, name)))
        if self.num_replicas % self.num_gpus != 0:
            raise ValueError(
                f"num_replicas={self.num_replicas} must be divisible by num_gpus={self.num_gpus}"
            )
        if self.hierarchical and self.num_gpus % self.num_nodes != 0:
            raise ValueError(
                f"num_gpus={self.num_gpus} must be divisible by num_nodes={self.num_nodes} "
                f"(hierarchical placement: num_groups={self.num_groups} divides over the nodes)"
            )

    @property
    def slots_per_gpu(self) -> int:
        return self.num_replicas // self.num_gpus

    @property
    def gpus_per_node(self) -> int:
        return -(-self.num_gpus // self.num_nodes)

    @property
    def slots_per_node(self) -> int:
        return self.slots_per_gpu * self.gpus_per_node

    @property
    def hierarchical(self) -> bool:
        """DeepSeek's rule: hierarchical placement when groups divide evenly over nodes."""
        return self.num_groups % self.num_nodes == 0

    def gpu_of_slot(self, slot: int | torch.Tensor) -> int | torch.Tensor:
        """GPU (EP rank) that holds ``slot``; works on ints and int tensors alike."""
        return slot // self.slots_per_gpu

    def node_of_gpu(self, gpu: int | torch.Tensor) -> int | torch.Tensor:
        return gpu // self.gpus_per_node

    def node_of_slot(self, slot: int | torch.Tensor) -> int | torch.Tensor:
        return slot // self.slots_per_node

    def check_experts(self, num_experts: int) -> None:
        """Raise ValueError unless ``num_experts`` logical experts fit this topology."""
        _check_positive_int("num_experts", num_experts)
        if self.num_replicas < num_experts:
            raise ValueError(
                f"num_replicas={self.num_replicas} must be >= num_experts={num_experts}"
            )
        if self.hierarchical and num_experts % self.num_groups != 0:
            raise ValueError(
                f"num_experts={num_experts} must be divisible by num_groups={self.num_groups} "
                f"(hierarchical placement: the groups divide over num_nodes={self.num_nodes})"
            )

    def to_dict(self) -> dict[str, int]:
        return {
            "num_replicas": self.num_replicas,
            "num_groups": self.num_groups,
            "num_nodes": self.num_nodes,
            "num_gpus": self.num_gpus,
        }


def build_log2phy(phy2log: torch.Tensor, num_experts: int, rank: torch.Tensor | None = None):
    """Invert a slot map.

    Args:
        phy2log: [L, P] int64 logical expert per slot.
        num_experts: E.
        rank: optional [L, P] int64 replica index of each slot within its expert; by
            default replicas are numbered in slot order.

    Returns:
        (log2phy [L, E, X] int64 padded with -1, logcnt [L, E] int64).
    """
    num_layers, num_slots = phy2log.shape
    logcnt = torch.zeros(num_layers, num_experts, dtype=torch.int64)
    logcnt.scatter_add_(1, phy2log, torch.ones_like(phy2log))
    if rank is None:
        # slot order: the k-th slot of expert e (scanning p upwards) gets rank k
        order = torch.argsort(phy2log * num_slots + torch.arange(num_slots), dim=1)
        sorted_log = phy2log.gather(1, order)
        first = torch.searchsorted(sorted_log, sorted_log, right=False)
        rank = torch.empty_like(phy2log)
        rank.scatter_(1, order, torch.arange(num_slots).expand(num_layers, -1) - first)
    width = max(int(logcnt.max()) if logcnt.numel() else 1, 1)
    log2phy = torch.full((num_layers, num_experts, width), -1, dtype=torch.int64)
    log2phy.view(num_layers, -1).scatter_(
        1, phy2log * width + rank, torch.arange(num_slots).expand(num_layers, -1).contiguous()
    )
    return log2phy, logcnt


def uniform_share(phy2log: torch.Tensor, logcnt: torch.Tensor) -> torch.Tensor:
    """[L, P] float32: 1 / logcnt of each slot's expert (DeepSeek's equal split)."""
    return 1.0 / logcnt.gather(1, phy2log).to(torch.float32)


@dataclass
class ExpertLayout:
    """Placement of logical experts onto physical slots, per MoE layer.

    Attributes:
        phy2log: [L, P] int64.
        log2phy: [L, E, X] int64, -1 padded.
        logcnt: [L, E] int64.
        replica_share: [L, P] float32; per expert the shares of its slots sum to 1.
        topology: the Topology the slots live on.
    """

    phy2log: torch.Tensor
    log2phy: torch.Tensor
    logcnt: torch.Tensor
    replica_share: torch.Tensor
    topology: Topology

    # ------------------------------------------------------------------ builders
    @classmethod
    def from_phy2log(
        cls,
        phy2log: torch.Tensor,
        topology: Topology,
        num_experts: int | None = None,
        replica_share: torch.Tensor | None = None,
        rank: torch.Tensor | None = None,
    ) -> ExpertLayout:
        """Build a layout from ``phy2log`` [L, P] int (and optional shares [L, P] float)."""
        phy2log = torch.as_tensor(phy2log)
        if phy2log.dim() != 2:
            raise ValueError(f"phy2log must be [layers, slots], got shape {tuple(phy2log.shape)}")
        if phy2log.dtype.is_floating_point or phy2log.dtype == torch.bool:
            raise ValueError(f"phy2log must be an integer tensor, got dtype {phy2log.dtype}")
        phy2log = phy2log.to(torch.int64).cpu().contiguous()
        if phy2log.shape[1] != topology.num_replicas:
            raise ValueError(
                f"phy2log has {phy2log.shape[1]} slots but topology.num_replicas="
                f"{topology.num_replicas}"
            )
        if phy2log.numel() and int(phy2log.min()) < 0:
            raise ValueError(f"phy2log holds a negative expert id {int(phy2log.min())}")
        if num_experts is None:
            num_experts = int(phy2log.max()) + 1 if phy2log.numel() else 0
        elif phy2log.numel() and int(phy2log.max()) >= num_experts:
            raise ValueError(
                f"phy2log holds expert id {int(phy2log.max())} >= num_experts={num_experts}"
            )
        log2phy, logcnt = build_log2phy(phy2log, num_experts, rank)
        if replica_share is None:
            replica_share = uniform_share(phy2log, logcnt.clamp(min=1))
        layout = cls(phy2log, log2phy, logcnt, replica_share.to(torch.float32).cpu(), topology)
        layout.validate()
        return layout

    @classmethod
    def from_plan(
        cls, phy2log: np.ndarray, rank: np.ndarray, topology: Topology, num_experts: int
    ) -> ExpertLayout:
        """The layout a policy planned, built in numpy with uniform shares.

        Gives what ``from_phy2log(phy2log, topology, num_experts, rank=rank)`` gives, at a
        fraction of the cost (a plan's largest item at scale was building and validating
        its layout with torch's small ops). Policies build ``phy2log`` and ``rank``
        consistent by construction, so instead of :meth:`validate`'s cross-checks it
        checks only what would make the tensors inconsistent: ids in range, every expert
        placed, every replica index used exactly once. Layouts from users and files go
        through :meth:`from_phy2log` / :meth:`load`, which validate fully.

        Args:
            phy2log: [L, P] int64 logical expert per slot.
            rank: [L, P] int64 replica index of each slot within its expert.
            topology: with ``num_replicas == P``; ``num_experts`` (E) must fit it.
        Raises:
            ValueError when the arrays are not a consistent layout.
        """
        phy2log = np.ascontiguousarray(phy2log, dtype=np.int64)
        rank = np.ascontiguousarray(rank, dtype=np.int64)
        num_layers, num_slots = phy2log.shape
        if num_slots != topology.num_replicas or rank.shape != phy2log.shape:
            raise ValueError(
                f"planned phy2log {phy2log.shape} / rank {rank.shape} do not fit "
                f"{topology.num_replicas} slots"
            )
        topology.check_experts(num_experts)
        if phy2log.size and (phy2log.min() < 0 or phy2log.max() >= num_experts):
            raise ValueError(f"planned phy2log ids must lie in [0, {num_experts})")
        flat = phy2log + (np.arange(num_layers) * num_experts)[:, None]  # [L, P]
        logcnt = np.bincount(flat.ravel(), minlength=num_layers * num_experts)
        if num_layers and logcnt.min() < 1:
            missing = int(np.argmin(logcnt))
            raise ValueError(
                f"logical expert {missing % num_experts} of layer {missing // num_experts} "
                "has no slot"
            )
        count = logcnt[flat]  # [L, P] replicas of each slot's expert
        if rank.size and (rank.min() < 0 or (rank >= count).any()):
            raise ValueError("planned replica indices must lie in [0, replicas of the expert)")
        width = max(int(logcnt.max()) if logcnt.size else 1, 1)
        log2phy = np.full(num_layers * num_experts * width, -1, dtype=np.int64)
        place = flat * width + rank
        slot = np.broadcast_to(np.arange(num_slots), flat.shape)
        log2phy[place] = slot
        # every slot finds its own number where it wrote it exactly when no two replicas
        # of an expert share an index
        if not np.array_equal(log2phy[place], slot):
            raise ValueError("planned replica indices repeat within an expert")
        log2phy = log2phy.reshape(num_layers, num_experts, width)
        share = np.float32(1.0) / count.astype(np.float32)
        return cls(
            torch.from_numpy(phy2log), torch.from_numpy(log2phy),
            torch.from_numpy(logcnt.reshape(num_layers, num_experts)), torch.from_numpy(share),
            topology,
        )  # fmt: skip

    @classmethod
    def identity(cls, num_layers: int, num_experts: int, topology: Topology) -> ExpertLayout:
        """Expert e on slot e, redundant slots filled round-robin (e.g. a fresh engine)."""
        topology.check_experts(num_experts)
        row = torch.arange(topology.num_replicas) % num_experts
        return cls.from_phy2log(row.expand(num_layers, -1), topology, num_experts)

    # ------------------------------------------------------------------ shape
    @property
    def num_layers(self) -> int:
        return self.phy2log.shape[0]

    @property
    def num_slots(self) -> int:
        return self.phy2log.shape[1]

    @property
    def num_experts(self) -> int:
        return self.logcnt.shape[1]

    def validate(self) -> None:
        """Raise ValueError if the tensors disagree with each other or the topology."""
        t = self.topology
        L, P = self.phy2log.shape if self.phy2log.dim() == 2 else (None, None)
        if L is None:
            raise ValueError(f"phy2log must be 2-D, got shape {tuple(self.phy2log.shape)}")
        for name, tensor, dtype in (
            ("phy2log", self.phy2log, torch.int64),
            ("log2phy", self.log2phy, torch.int64),
            ("logcnt", self.logcnt, torch.int64),
            ("replica_share", self.replica_share, torch.float32),
        ):
            if tensor.dtype != dtype:
                raise ValueError(f"{name} must be {dtype}, got {tensor.dtype}")
        E = self.logcnt.shape[1] if self.logcnt.dim() == 2 else -1
        if self.logcnt.shape != (L, E):
            raise ValueError(f"logcnt shape {tuple(self.logcnt.shape)} != [layers={L}, experts]")
        if self.log2phy.dim() != 3 or self.log2phy.shape[:2] != (L, E):
            raise ValueError(f"log2phy shape {tuple(self.log2phy.shape)} != [{L}, {E}, X]")
        if self.replica_share.shape != (L, P):
            raise ValueError(f"replica_share shape {tuple(self.replica_share.shape)} != [{L}, {P}]")
        if P != t.num_replicas:
            raise ValueError(f"layout has {P} slots but topology.num_replicas={t.num_replicas}")
        if E > 0:
            t.check_experts(E)
        if int(self.phy2log.min()) < 0 or int(self.phy2log.max()) >= E:
            raise ValueError(f"phy2log ids must lie in [0, {E})")
        counted = torch.zeros_like(self.logcnt).scatter_add_(
            1, self.phy2log, torch.ones_like(self.phy2log)
        )
        if not torch.equal(counted, self.logcnt):
            raise ValueError("logcnt does not match the number of slots per expert in phy2log")
        if int(self.logcnt.min()) < 1:
            missing = (self.logcnt < 1).nonzero()[0].tolist()
            raise ValueError(f"logical expert {missing[1]} of layer {missing[0]} has no slot")
        valid = self.log2phy >= 0
        if not torch.equal(valid.sum(-1), self.logcnt):
            raise ValueError("log2phy's valid entries do not match logcnt")
        slots = self.log2phy.clamp(min=0)
        owner = self.phy2log.gather(1, slots.view(L, -1)).view_as(slots)
        experts = torch.arange(E).view(1, E, 1).expand_as(owner)
        if not torch.equal(owner[valid], experts[valid]):
            raise ValueError("log2phy points at slots that phy2log assigns to another expert")
        share = self.replica_share
        if not torch.isfinite(share).all() or (share < 0).any():
            raise ValueError("replica_share must be finite and non-negative")
        total = torch.zeros(L, E, dtype=torch.float64).scatter_add_(1, self.phy2log, share.double())
        if not torch.allclose(total, torch.ones_like(total), atol=1e-4):
            bad = (total - 1).abs().argmax().item()
            raise ValueError(
                f"replica_share of expert {bad % E} in layer {bad // E} sums to "
                f"{total.flatten()[bad].item():.6f}, not 1"
            )

    # ------------------------------------------------------------------ loads
    def slot_weights(self, weight: torch.Tensor) -> torch.Tensor:
        """Load each slot receives under the static split.

        Args:
            weight: [L, E] load per logical expert (any real dtype).
        Returns:
            [L, P] float64.
        """
        weight = self._check_weight(weight)
        return weight.gather(1, self.phy2log) * self.replica_share.double()

    def gpu_loads(self, weight: torch.Tensor) -> torch.Tensor:
        """[L, E] logical load -> [L, num_gpus] float64 load per GPU (static split)."""
        return self.slot_weights(weight).view(self.num_layers, self.topology.num_gpus, -1).sum(-1)

    def balancedness(self, weight: torch.Tensor) -> float:
        """Mean over layers of mean GPU load / max GPU load (1.0 = perfect)."""
        return balancedness_of(self.gpu_loads(weight))

    def _check_weight(self, weight: torch.Tensor) -> torch.Tensor:
        weight = torch.as_tensor(weight)
        if weight.shape != (self.num_layers, self.num_experts):
            raise ValueError(
                f"weight must have shape [{self.num_layers}, {self.num_experts}], "
                f"got {tuple(weight.shape)}"
            )
        weight = weight.to(torch.float64).cpu()
        if not torch.isfinite(weight).all():
            bad = "NaN" if torch.isnan(weight).any() else "inf"
            raise ValueError(f"weight contains {bad}")
        return weight

    # ------------------------------------------------------------------ compare
    def diff(self, other: ExpertLayout) -> torch.Tensor:
        """[L, P] bool: slots whose logical expert differs between self and ``other``."""
        if other.phy2log.shape != self.phy2log.shape:
            raise ValueError(
                f"cannot diff layouts of shapes {tuple(self.phy2log.shape)} and "
                f"{tuple(other.phy2log.shape)}"
            )
        return self.phy2log != other.phy2log

    def layer(self, index: int) -> ExpertLayout:
        """A one-layer layout (views) for layer ``index``."""
        sl = slice(index, index + 1)
        return ExpertLayout(
            self.phy2log[sl], self.log2phy[sl], self.logcnt[sl], self.replica_share[sl],
            self.topology,
        )  # fmt: skip

    def with_share(self, replica_share: torch.Tensor) -> ExpertLayout:
        """A copy with other replica shares ([L, P] float), validated."""
        layout = ExpertLayout(
            self.phy2log, self.log2phy, self.logcnt,
            torch.as_tensor(replica_share, dtype=torch.float32).cpu().contiguous(), self.topology,
        )  # fmt: skip
        layout.validate()
        return layout

    def equals(self, other: ExpertLayout) -> bool:
        return (
            self.topology == other.topology
            and torch.equal(self.phy2log, other.phy2log)
            and torch.equal(self.log2phy, other.log2phy)
            and torch.equal(self.logcnt, other.logcnt)
            and torch.equal(self.replica_share, other.replica_share)
        )

    # ------------------------------------------------------------------ io
    def save(self, path: str | os.PathLike, extra_metadata: dict[str, str] | None = None) -> None:
        """Write a safetensors file (tensors + versioned JSON metadata), atomically."""
        from safetensors.torch import save_file

        self.validate()
        meta = {
            "format": LAYOUT_FORMAT,
            "version": str(LAYOUT_VERSION),
            "topology": json.dumps(self.topology.to_dict()),
        }
        meta.update(extra_metadata or {})
        tensors = {
            "phy2log": self.phy2log.contiguous(),
            "log2phy": self.log2phy.contiguous(),
            "logcnt": self.logcnt.contiguous(),
            "replica_share": self.replica_share.contiguous(),
        }
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))

    @classmethod
    def load(cls, path: str | os.PathLike) -> ExpertLayout:
        """Read a file written by :meth:`save`; raises ValueError on a foreign or newer file."""
        from safetensors import SafetensorError, safe_open

        path = os.fspath(path)
        if os.path.isdir(path):
            raise ValueError(f"layout file {path!r} is a directory")
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError) as exc:
            raise ValueError(f"cannot read layout file {path!r}: {exc}") from exc
        if meta.get("format") != LAYOUT_FORMAT:
            raise ValueError(f"{path!r} is not an eplb layout file (format={meta.get('format')!r})")
        try:
            version = int(meta.get("version", "0"))
        except ValueError:
            raise ValueError(
                f"{path!r} has layout format version {meta.get('version')!r}, not an integer"
            ) from None
        if version > LAYOUT_VERSION:
            raise ValueError(
                f"{path!r} has layout format version {version}; this eplb-plugin reads "
                f"up to {LAYOUT_VERSION}"
            )
        missing = {"phy2log", "log2phy", "logcnt", "replica_share"} - tensors.keys()
        if missing:
            raise ValueError(f"{path!r} lacks tensors {sorted(missing)}")
        topology = _topology_from_metadata(meta, path)
        layout = cls(
            tensors["phy2log"], tensors["log2phy"], tensors["logcnt"], tensors["replica_share"],
            topology,
        )  # fmt: skip
        try:
            layout.validate()
        except ValueError as exc:
            raise ValueError(f"layout file {path!r}: {exc}") from None
        return layout


def _topology_from_metadata(meta: dict[str, str], path: str) -> Topology:
    """The Topology a layout file's ``topology`` metadata holds; ValueError naming ``path``."""
    if "topology" not in meta:
        raise ValueError(f"layout file {path!r} has no topology metadata")
    try:
        fields = json.loads(meta["topology"])
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"layout file {path!r}: topology metadata is not JSON: {exc}") from None
    if not isinstance(fields, dict):
        raise ValueError(f"layout file {path!r}: topology metadata must be a JSON object")
    known = ("num_replicas", "num_groups", "num_nodes", "num_gpus")
    unknown = sorted(set(fields) - set(known))
    if unknown or "num_replicas" not in fields:
        raise ValueError(
            f"layout file {path!r}: topology metadata holds {sorted(fields)}; expected "
            f"num_replicas and optionally {', '.join(known[1:])}"
        )
    try:
        return Topology(**fields)
    except ValueError as exc:
        raise ValueError(f"layout file {path!r}: {exc}") from None


def balancedness_of(gpu_loads: torch.Tensor) -> float:
    """Mean over leading rows of mean/max over the last dim; rows with no load count as 1.

    Args:
        gpu_loads: [..., G] float, load per GPU.
    Raises:
        ValueError for NaN or negative loads (their ratio would mean nothing).
    """
    loads = torch.as_tensor(gpu_loads).to(torch.float64)
    if torch.isnan(loads).any():
        raise ValueError("GPU loads contain NaN: balancedness is undefined")
    if (loads < 0).any():
        raise ValueError(f"GPU loads must be >= 0, got {float(loads.min())}")
    peak = loads.amax(-1)
    ratio = torch.where(peak > 0, loads.mean(-1) / peak.clamp(min=1e-300), torch.ones_like(peak))
    return float(ratio.mean())
