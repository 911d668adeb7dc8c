"""Export throughput as a ratio to a plain copy of the same bytes on the same disk.

Writes a synthetic DeepSeek-V3-style checkpoint (fp8 experts with ``weight_scale_inv``, one
shard per layer), then times, alternating and repeated:

- ``copy``: ``shutil.copyfile`` of every source shard into a fresh folder (+ fsync), the
  plain-copy baseline (the kernel's sendfile/copy_file_range path);
- ``export[mode]``: ``export_checkpoint`` with a planned layout (with redundant slots, so
  more bytes are written than read) for each copy mode, fsync on.

Throughput = bytes written / wall time; ratio = export throughput / copy throughput. Runs
rotate their order and start after ``os.sync()`` so one method's writeback does not slow
the next.
Page cache: the source is read warm (it was just written) in both cases: the figures
compare the write paths, not cold reads.

    .venv/bin/python benchmarks/bench_export.py --layers 6 --experts 64 --hidden 2048 --inter 1024
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch
from safetensors.torch import save_file

from eplb_plugin.checkpoint import Checkpoint
from eplb_plugin.export import ExportConfig, export_checkpoint, plan_export
from eplb_plugin.layout import Topology
from eplb_plugin.policies import plan


def write_checkpoint(root: str, layers: int, experts: int, hidden: int, inter: int) -> int:
    """Synthetic fp8 DeepSeek-V3-style checkpoint; returns its tensor bytes."""
    os.makedirs(root)
    g = torch.Generator().manual_seed(0)

    def fp8(*shape):  # random bytes are valid fp8 payloads for a copy benchmark
        return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8).view(
            torch.float8_e4m3fn
        )

    weight_map = {}
    total = 0
    for layer in range(layers):
        t = {f"model.layers.{layer}.input_layernorm.weight": torch.ones(hidden)}
        t[f"model.layers.{layer}.mlp.gate.weight"] = torch.randn(experts, hidden, generator=g)
        for e in range(experts):
            for proj, shape in (("gate_proj", (inter, hidden)), ("up_proj", (inter, hidden)),
                                ("down_proj", (hidden, inter))):  # fmt: skip
                name = f"model.layers.{layer}.mlp.experts.{e}.{proj}"
                t[f"{name}.weight"] = fp8(*shape)
                t[f"{name}.weight_scale_inv"] = torch.rand(-(-shape[0] // 128), -(-shape[1] // 128))
        fname = f"model-{layer + 1:05d}-of-{layers:05d}.safetensors"
        save_file(t, os.path.join(root, fname))
        total += sum(v.numel() * v.element_size() for v in t.values())
        weight_map.update({k: fname for k in t})
        del t
    with open(os.path.join(root, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    config = {"model_type": "deepseek_v3", "num_hidden_layers": layers, "n_routed_experts": experts}
    with open(os.path.join(root, "config.json"), "w") as f:
        json.dump(config, f)
    return total


def plain_copy(src: str, dst: str) -> int:
    os.makedirs(dst)
    n = 0
    for name in sorted(os.listdir(src)):
        if name.endswith(".safetensors"):
            shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
            fd = os.open(os.path.join(dst, name), os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
            n += os.path.getsize(os.path.join(dst, name))
    return n


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--inter", type=int, default=1024)
    p.add_argument("--redundant", type=int, default=16, help="extra slots (replicas)")
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--modes", default="auto,read,safe_open")
    p.add_argument("--dir", help="work folder (default: a temp folder under /tmp)")
    args = p.parse_args()

    work = tempfile.mkdtemp(prefix="bench-export-", dir=args.dir)
    try:
        src = os.path.join(work, "src")
        t0 = time.perf_counter()
        size = write_checkpoint(src, args.layers, args.experts, args.hidden, args.inter)
        print(f"checkpoint: {size / 2**30:.2f} GiB in {args.layers} shards, written in "
              f"{time.perf_counter() - t0:.1f} s", flush=True)  # fmt: skip
        g = torch.Generator().manual_seed(1)
        load = torch.rand(args.layers, args.experts, generator=g) ** 3 * 1000
        layout = plan(load, Topology(args.experts + args.redundant, 1, 1, args.gpus))
        export_bytes = plan_export(Checkpoint.open(src), layout).nbytes
        print(
            f"export writes {export_bytes / 2**30:.2f} GiB ({args.experts}+{args.redundant} "
            f"slots over {args.gpus} ranks); copy writes the source bytes",
            flush=True,
        )
        modes = [m for m in args.modes.split(",") if m]
        results: dict[str, list[float]] = {"copy": [], **{m: [] for m in modes}}
        labels = ["copy", *modes]
        for rep in range(args.repeats):
            # rotate the order so no method always follows the same one, and start each run
            # with no writeback of an earlier run's files still going on
            for label in labels[rep % len(labels) :] + labels[: rep % len(labels)]:
                out = os.path.join(work, f"out-{label}-{rep}")
                os.sync()
                start = time.perf_counter()
                if label == "copy":
                    nbytes = plain_copy(src, out)
                else:
                    cfg = ExportConfig(ep_size=args.gpus, copy_mode=label, progress=False)
                    nbytes = export_checkpoint(src, layout, out, cfg).nbytes
                seconds = time.perf_counter() - start
                results[label].append(nbytes / seconds)
                shutil.rmtree(out)
                print(f"  rep {rep} {label:>9}: {nbytes / seconds / 2**20:8.1f} MiB/s "
                      f"({seconds:.2f} s)", flush=True)  # fmt: skip
        # the median is the figure; the best run shows what a quiet disk gives (shared hosts)
        base, base_best = statistics.median(results["copy"]), max(results["copy"])
        print("\nthroughput (MiB/s) and ratio to plain copy, median and best of", args.repeats)
        print(f"{'method':>16} {'median':>9} {'ratio':>7} {'best':>9} {'ratio':>7}")
        print(f"{'copy':>16} {base / 2**20:9.1f} {1.0:7.2f} {base_best / 2**20:9.1f} {1.0:7.2f}")
        for m in modes:
            med, best = statistics.median(results[m]), max(results[m])
            print(
                f"{'export ' + m:>16} {med / 2**20:9.1f} {med / base:7.2f} "
                f"{best / 2**20:9.1f} {best / base_best:7.2f}"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
