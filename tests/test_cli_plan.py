"""`eplb plan` end to end: reads each load format, prints a summary, writes a layout."""

import json

import numpy as np
import pytest
import torch

from eplb_plugin import ExpertLayout
from eplb_plugin.cli.main import main
from eplb_plugin.traces import read_load, write_load

ARGS = ["--replicas", "16", "--groups", "4", "--nodes", "2", "--gpus", "8"]


@pytest.mark.parametrize("suffix", [".pt", ".npy", ".npz", ".safetensors"])
def test_plan_reads_every_format(tmp_path, suffix, capsys):
    load = torch.randint(0, 100, (5, 3, 12)).float()
    path = tmp_path / f"load{suffix}"
    write_load(path, load)
    assert torch.equal(read_load(path), load)
    out = tmp_path / "layout.safetensors"
    assert (
        main(["plan", "--load", str(path), *ARGS, "--out", str(out), "--policy", "deepseek"]) == 0
    )
    text = capsys.readouterr().out
    assert "balancedness" in text and "->" in text
    layout = ExpertLayout.load(out)
    assert layout.phy2log.shape == (3, 16)


def test_plan_json_summary(tmp_path, capsys):
    path = tmp_path / "load.npy"
    rng = np.random.default_rng(0)
    np.save(path, rng.zipf(1.5, size=(4, 32)).astype(np.int64))
    assert main(["plan", "--load", str(path), "--replicas", "40", "--gpus", "8", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["balancedness_after"] > summary["balancedness_before"]
    assert len(summary["layers"]) == 4 and len(summary["gpu_after"]) == 8


@pytest.mark.parametrize(
    "content, extra, match",
    [
        (np.full((2, 12), np.nan), [], "contains NaN"),
        (np.ones((2, 12)), ["--policy", "bogus"], "unknown policy 'bogus'"),
        (np.ones((2, 12)), ["--out", "x.json"], "must end with .safetensors"),
    ],
)
def test_plan_bad_input_writes_nothing(tmp_path, capsys, content, extra, match):
    path = tmp_path / "load.npy"
    np.save(path, content)
    args = ["plan", "--load", str(path), *ARGS, "--out", str(tmp_path / "o.safetensors")]
    assert main(args + extra) == 2
    assert match in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["load.npy"]


def test_plan_missing_and_unknown_files(tmp_path, capsys):
    assert main(["plan", "--load", str(tmp_path / "none.npy"), *ARGS]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "load.csv").write_text("1,2")
    assert main(["plan", "--load", str(tmp_path / "load.csv"), *ARGS]) == 2
    assert "unknown suffix '.csv'" in capsys.readouterr().err
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    assert main(["plan", "--load", str(tmp_path / "bad.npz"), *ARGS]) == 2
    assert "cannot read load file" in capsys.readouterr().err


def test_plan_summary_says_1_node_not_1_nodes(tmp_path, capsys):
    path = tmp_path / "load.npy"
    np.save(path, np.arange(24).reshape(2, 12))
    assert (
        main(["plan", "--load", str(path), "--replicas", "16", "--gpus", "8", "--layers", "1"]) == 0
    )
    text = capsys.readouterr().out
    assert "2 layers x 12 experts -> 16 slots on 8 GPUs / 1 node (1 group)" in text
    assert "... 1 more layer (--layers N" in text
