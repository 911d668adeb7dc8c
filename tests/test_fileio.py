"""Files the package writes follow the umask (tempfile.mkstemp alone would make them 0600);
files it reads are named missing or not a regular file."""

import os
import stat

import pytest
import torch

from eplb_plugin import Topology, plan
from eplb_plugin.fileio import atomic_write, current_umask
from eplb_plugin.formats import write_sglang_dump
from eplb_plugin.traces import write_load


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_current_umask_reads_without_changing(umask_022):
    assert current_umask() == 0o022
    assert current_umask() == 0o022


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_atomic_write_gives_the_umask_mode(tmp_path, mask):
    old = os.umask(mask)
    try:
        atomic_write(tmp_path / "f.bin", lambda tmp: open(tmp, "wb").close())
    finally:
        os.umask(old)
    assert _mode(tmp_path / "f.bin") == 0o666 & ~mask


def test_atomic_write_failure_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")

    def boom(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, boom)
    assert target.read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["f.txt"]


def test_layouts_loads_and_dumps_are_world_readable_under_umask_022(tmp_path, umask_022):
    load = torch.rand(2, 8) * 100
    layout = plan(load, Topology(num_replicas=10, num_groups=1, num_nodes=1, num_gpus=2))
    layout.save(tmp_path / "layout.safetensors")
    write_load(tmp_path / "load.npy", load)
    write_sglang_dump(tmp_path / "dump.pt", load[None].round())
    for name in ("layout.safetensors", "load.npy", "dump.pt"):
        assert _mode(tmp_path / name) == 0o644, name


def test_require_file_tells_missing_from_not_a_file(tmp_path) -> None:
    from eplb_plugin.fileio import require_file

    path = tmp_path / "load.safetensors"
    path.write_bytes(b"x")
    require_file(str(path), "load file")
    with pytest.raises(ValueError, match=r"load file '.*nope' does not exist"):
        require_file(str(tmp_path / "nope"), "load file")
    with pytest.raises(ValueError, match="is a folder"):
        require_file(str(tmp_path), "layout file")
    with pytest.raises(ValueError, match=r"'/dev/null' is not a regular file"):
        require_file("/dev/null", "routing trace file")


def test_cli_names_a_device_as_not_a_file(capsys) -> None:
    from eplb_plugin.cli.main import main

    assert main(["plan", "--load", "/dev/null", "--replicas", "80", "--gpus", "16"]) == 2
    assert "load file '/dev/null' is not a regular file" in capsys.readouterr().err
