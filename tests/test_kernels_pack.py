"""pack_slots / unpack_slots: the Triton kernel (interpreted) and the torch path against the
documented byte layout written out here (an oracle sharing no code with the op), bit for bit
over dtypes and odd shapes; round trips; errors."""

from __future__ import annotations

import importlib

import pytest
import torch

from eplb_plugin.kernels.pack import bytes_per_slot, pack_slots, unpack_slots
from eplb_plugin.kernels.slot_rows import slot_rows, word_size


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8).clone()


def random_tensor(shape, dtype, gen) -> torch.Tensor:
    raw = torch.randint(
        0, 256, (*shape[:-1], shape[-1] * dtype.itemsize), dtype=torch.uint8, generator=gen
    )
    return raw.view(dtype)


def layer_tensors(num_slots: int, gen) -> list[torch.Tensor]:
    """Row sizes 3, 120, 40, 2 and 28 bytes: the odd first row leaves later tensors at
    offsets no word divides, so the kernel must fall back to narrower words there."""
    wide = random_tensor((num_slots, 10), torch.float32, gen)
    return [
        random_tensor((num_slots, 3), torch.uint8, gen),
        random_tensor((num_slots, 4, 15), torch.bfloat16, gen),
        random_tensor((num_slots, 5, 8), torch.float8_e4m3fn, gen),
        random_tensor((num_slots,), torch.float16, gen),
        wide[:, 1:8],  # slot stride 40 bytes, rows of 28
    ]


def expected_buffer(tensors, slots) -> torch.Tensor:
    """The documented layout, written out: slot-major, then tensor order, row bytes."""
    parts = [bits(t[s]).reshape(-1) for s in slots for t in tensors]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8)


def test_bytes_per_slot():
    gen = torch.Generator().manual_seed(0)
    assert bytes_per_slot(layer_tensors(4, gen)) == 3 + 120 + 40 + 2 + 28


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("slots", [[2], [5, 0, 3], [1, 1, 4, 1], []])
def test_pack_layout(slots, backend, monkeypatch):
    monkeypatch.setenv("EPLB_KERNELS", backend)
    gen = torch.Generator().manual_seed(len(slots))
    tensors = layer_tensors(6, gen)
    want = expected_buffer(tensors, slots)
    got = pack_slots(tensors, torch.tensor(slots, dtype=torch.int64))
    assert got.dtype == torch.uint8 and torch.equal(got, want)
    out = torch.empty_like(want)
    assert pack_slots(tensors, slots, out=out) is out and torch.equal(out, want)


DTYPES = [
    torch.bfloat16,
    torch.float16,
    torch.float32,
    torch.float64,
    torch.float8_e4m3fn,
    torch.int8,
    torch.int32,
    torch.int64,
    torch.bool,
]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5,), (5, 1), (5, 3, 7), (5, 0)])
def test_every_dtype_and_shape_round_trips_bit_exact(dtype, shape, backend, monkeypatch):
    monkeypatch.setenv("EPLB_KERNELS", backend)
    gen = torch.Generator().manual_seed(len(shape))
    if dtype == torch.bool:
        t = torch.randint(0, 2, shape, generator=gen).bool()
    else:
        t = random_tensor(shape, dtype, gen) if shape[-1] else torch.empty(shape, dtype=dtype)
    # an odd-sized tensor first: the dtype's rows land at unaligned buffer offsets
    odd = random_tensor((5, 3), torch.uint8, gen)
    slots = [4, 0, 4, 2]
    buffer = pack_slots([odd, t], slots)
    assert torch.equal(buffer, expected_buffer([odd, t], slots))
    fresh = [torch.zeros_like(odd), torch.zeros_like(t)]
    unpack_slots(fresh, [1, 3, 0, 2], buffer)
    for got, src in zip(fresh, (odd, t)):
        for d, s in ((1, 4), (3, 0), (0, 4), (2, 2)):
            assert torch.equal(bits(got[d]), bits(src[s]))
        assert torch.equal(bits(got[4]), bits(torch.zeros_like(src[4])))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_unpack_round_trip(backend, monkeypatch):
    monkeypatch.setenv("EPLB_KERNELS", backend)
    gen = torch.Generator().manual_seed(3)
    src = layer_tensors(7, gen)
    dst = layer_tensors(5, gen)
    untouched = [[bits(row) for row in t] for t in dst]
    buffer = pack_slots(src, [6, 0, 2])
    unpack_slots(dst, torch.tensor([4, 1, 2]), buffer)
    for s_t, d_t, before in zip(src, dst, untouched):
        for s, d in ((6, 4), (0, 1), (2, 2)):
            assert torch.equal(bits(d_t[d]), bits(s_t[s]))
        for d in (0, 3):  # slots not unpacked into keep their bytes
            assert torch.equal(bits(d_t[d]), before[d])


def test_aligned_tensors_use_wide_words():
    # every row and offset a multiple of 8 bytes: int64 words (checked through word_size)
    gen = torch.Generator().manual_seed(4)
    tensors = [random_tensor((4, 6), torch.float32, gen), random_tensor((4, 16), torch.uint8, gen)]
    table = torch.empty(2, bytes_per_slot(tensors), dtype=torch.uint8)
    rows = slot_rows(tensors[0])
    assert word_size(rows, table, extra=(0, table.shape[1])) == 8
    assert word_size(rows, table, extra=(24 + 3,)) == 1
    buffer = pack_slots(tensors, [3, 1])
    assert torch.equal(buffer, expected_buffer(tensors, [3, 1]))


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda ts: pack_slots(ts, [0, 6]), r"slots\[1\] = 6"),
        (lambda ts: pack_slots(ts, [-1]), r"slots\[0\] = -1"),
        (lambda ts: pack_slots(ts, torch.tensor([[0]])), "slots must be a 1-D"),
        (lambda ts: pack_slots(ts, [0], out=torch.empty(5, dtype=torch.uint8)), "out must hold"),
        (lambda ts: pack_slots(ts, [0], out=torch.empty(193)), "out must have dtype"),
        (lambda ts: pack_slots(ts + [torch.zeros(5, 2)], [0]), "same slot count"),
        (lambda ts: unpack_slots(ts, [1, 1], torch.zeros(386, dtype=torch.uint8)), "repeat"),
        (lambda ts: unpack_slots(ts, [1], torch.zeros(190, dtype=torch.uint8)), "buffer must"),
        (
            lambda ts: unpack_slots(ts, [1], torch.zeros(193, dtype=torch.uint8, device="meta")),
            "buffer is on meta",
        ),
        (lambda ts: unpack_slots(ts, [1], None), "buffer must be"),
    ],
)
def test_bad_input_writes_nothing(call, match):
    gen = torch.Generator().manual_seed(9)
    tensors = layer_tensors(6, gen)
    before = [bits(t) for t in tensors]
    with pytest.raises(ValueError, match=match):
        call(tensors)
    for t, b in zip(tensors, before):
        assert torch.equal(bits(t), b)


def test_long_slot_lists_are_split_across_launches(monkeypatch):
    # CUDA limits grid dim 1 to 65535 programs; shrink the limit to exercise the split
    pack_module = importlib.import_module("eplb_plugin.kernels.pack")
    monkeypatch.setattr(pack_module, "MAX_GRID_Y", 2)
    gen = torch.Generator().manual_seed(11)
    tensors = layer_tensors(6, gen)
    slots = [5, 1, 4, 0, 2]
    buffer = pack_slots(tensors, slots)
    assert torch.equal(buffer, expected_buffer(tensors, slots))
    fresh = layer_tensors(6, gen)
    unpack_slots(fresh, slots, buffer)
    assert torch.equal(pack_slots(fresh, slots), buffer)
