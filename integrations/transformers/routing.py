"""Trace-driven routing for the transformers engine.

``TraceRouting`` replaces the router's expert choices with those of a routing trace (the
``examples/traces/*.npz`` format: ``topk_ids`` [T, L, K] int, ``seq_offsets`` [S + 1]), so
that a tiny model sees a real load pattern while every other part runs for real. The router's
top-k weights are kept, position by position. (The logical -> physical mapping itself is
:class:`eplb_plugin.routing.Router`, called by :class:`~.moe.EPExperts`.)
"""

from __future__ import annotations

import numpy as np
import torch


# ---------------------------------------------------------------------- traces
class TraceRouting:
    """Router choices taken from a routing trace.

    Sequence ``s`` of the workload follows trace sequence ``s % num_trace_seqs``; its token at
    position ``t`` takes the trace's token ``t`` of that sequence (wrapping around). MoE layer
    ``l`` follows trace layer ``l % trace_layers``; the first ``top_k`` ids are used, mapped
    into the model's experts by ``id % num_experts``.

    Args:
        topk_ids: [T, Lt, Kt] int expert ids.
        seq_offsets: [S + 1] int64 token offsets of the trace's sequences.
        num_experts: E of the model.
        top_k: K of the model (<= Kt).
    """

    def __init__(self, topk_ids, seq_offsets, num_experts: int, top_k: int):
        topk_ids = torch.as_tensor(np.asarray(topk_ids)).to(torch.int64)
        seq_offsets = torch.as_tensor(np.asarray(seq_offsets)).to(torch.int64)
        if topk_ids.dim() != 3:
            raise ValueError(
                f"trace topk_ids must be [tokens, layers, k], got {tuple(topk_ids.shape)}"
            )
        if top_k > topk_ids.shape[2]:
            raise ValueError(
                f"model top_k={top_k} exceeds the trace's {topk_ids.shape[2]} experts per token"
            )
        if (
            seq_offsets.dim() != 1
            or seq_offsets.numel() < 2
            or int(seq_offsets[-1]) > len(topk_ids)
        ):
            raise ValueError("trace seq_offsets must be [num_seqs + 1] within the token count")
        lengths = seq_offsets[1:] - seq_offsets[:-1]
        if int(lengths.min()) <= 0:
            raise ValueError("trace holds an empty sequence")
        self.ids = topk_ids[:, :, :top_k] % num_experts
        self.seq_offsets = seq_offsets
        self.lengths = lengths
        self.num_experts = num_experts
        self.top_k = top_k
        self.current: torch.Tensor | None = None

    @classmethod
    def from_file(cls, path: str, num_experts: int, top_k: int) -> TraceRouting:
        from eplb_plugin.traces import read_routing_trace

        trace = read_routing_trace(path)  # the one reader: ValueError naming the file
        # seq_offsets is optional in the trace format: without it, one sequence
        offsets = trace.seq_offsets if trace.seq_offsets is not None else [0, trace.num_tokens]
        return cls(trace.topk_ids, offsets, num_experts, top_k)

    @property
    def num_layers(self) -> int:
        return self.ids.shape[1]

    def set_batch(self, seq_ids: torch.Tensor, start: int, length: int) -> None:
        """Choose the next forward's tokens: ``seq_ids`` [B] int64 at positions start..+length."""
        trace_seq = seq_ids.to(torch.int64) % len(self.lengths)
        pos = torch.arange(start, start + length, dtype=torch.int64)
        rows = self.seq_offsets[trace_seq].unsqueeze(1) + pos.unsqueeze(0) % self.lengths[
            trace_seq
        ].unsqueeze(1)
        self.current = self.ids[rows.reshape(-1)]  # [B * length, Lt, K]

    def choices(self, layer: int, num_tokens: int, device: torch.device) -> torch.Tensor:
        """[num_tokens, K] int64 expert ids of MoE layer ``layer`` for the current batch."""
        if self.current is None or self.current.shape[0] != num_tokens:
            got = None if self.current is None else self.current.shape[0]
            raise RuntimeError(f"trace batch holds {got} tokens, the router saw {num_tokens}")
        return self.current[:, layer % self.num_layers].to(device)

    def install(self, routers: list[torch.nn.Module], indices_pos: int) -> list:
        """Forward hooks on each router replacing output ``indices_pos``; returns the handles."""
        handles = []
        for layer, router in enumerate(routers):

            def hook(module, args, output, layer=layer):
                output = list(output)
                ids = output[indices_pos]
                output[indices_pos] = self.choices(layer, ids.shape[0], ids.device).to(ids.dtype)
                return tuple(output)

            handles.append(router.register_forward_hook(hook))
        return handles


def synthetic_trace(
    num_seqs: int,
    seq_len: int,
    num_layers: int,
    num_experts: int,
    top_k: int,
    skew: float = 1.2,
    seed: int = 0,
    phases: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """A skewed routing trace: per layer a Zipf(``skew``) popularity over a random expert order.

    With ``phases > 1`` the order is redrawn ``phases`` times along each sequence (positions
    ``[i * seq_len / phases, (i + 1) * seq_len / phases)`` share one), so the hot experts
    shift as decoding proceeds.

    Returns:
        topk_ids [num_seqs * seq_len, num_layers, top_k] int16 (distinct ids per token),
        seq_offsets [num_seqs + 1] int64.
    """
    if top_k > num_experts:
        raise ValueError(f"top_k={top_k} exceeds num_experts={num_experts}")
    if phases < 1 or phases > seq_len:
        raise ValueError(f"phases={phases} must lie in [1, seq_len={seq_len}]")
    gen = torch.Generator().manual_seed(seed)
    tokens = num_seqs * seq_len
    ranks = torch.arange(1, num_experts + 1, dtype=torch.float64)
    logp = -skew * ranks.log()
    phase = (torch.arange(seq_len) * phases // seq_len).repeat(num_seqs)  # [tokens]
    out = torch.empty(tokens, num_layers, top_k, dtype=torch.int64)
    for layer in range(num_layers):
        orders = torch.stack([torch.randperm(num_experts, generator=gen) for _ in range(phases)])
        gumbel = (
            -torch.empty(tokens, num_experts, dtype=torch.float64).exponential_(generator=gen).log()
        )
        picks = (logp.unsqueeze(0) + gumbel).topk(top_k, dim=1).indices  # without replacement
        out[:, layer] = orders[phase.unsqueeze(1), picks]
    offsets = np.arange(0, tokens + 1, seq_len, dtype=np.int64)
    return out.numpy().astype(np.int16), offsets
