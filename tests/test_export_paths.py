"""Path containment: every file an export index or a checkpoint index names must resolve
inside its folder (no ``..``, no absolute path, no symlink out); the readers refuse the
entry by name and ``eplb verify`` fails."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from test_export import CFG, layout_for, write_fp8_deepseek

from eplb_plugin.checkpoint import INDEX_FILE, Checkpoint
from eplb_plugin.cli.main import main
from eplb_plugin.export import EXPORT_INDEX, export_checkpoint, open_export, verify_export

VICTIM = "experts-rank00000-00001-of-00001.safetensors"


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return write_fp8_deepseek(tmp_path_factory.mktemp("src") / "ckpt", layers=2, experts=4)


@pytest.fixture
def export(source, tmp_path):
    out = tmp_path / "box" / "out"
    out.parent.mkdir()
    export_checkpoint(source, layout_for(source, extra=4, gpus=2), out, CFG)
    assert verify_export(source, out, progress=False).ok
    return out


def _rename_everywhere(value, old: str, new: str):
    """The index with every key and string equal to ``old`` replaced by ``new``."""
    if isinstance(value, dict):
        return {(new if k == old else k): _rename_everywhere(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [_rename_everywhere(v, old, new) for v in value]
    return new if value == old else value


def _point_index_at(out, new_name: str) -> None:
    path = out / EXPORT_INDEX
    index = json.loads(path.read_text())
    path.write_text(json.dumps(_rename_everywhere(index, VICTIM, new_name)))


def _refused(source, out, capsys, needle: str) -> None:
    with pytest.raises(ValueError, match="outside") as err:
        open_export(out)
    assert needle in str(err.value)
    capsys.readouterr()
    rc = main(["verify", "--checkpoint", source, "--export", str(out), "--no-progress"])
    captured = capsys.readouterr()
    assert rc != 0 and "OK" not in captured.out
    assert needle in captured.err and "outside" in captured.err


def test_export_index_entry_with_dotdot_is_refused(source, export, capsys):
    shutil.move(export / VICTIM, export.parent / "secret.safetensors")
    _point_index_at(export, "../secret.safetensors")
    _refused(source, export, capsys, "'../secret.safetensors'")


def test_export_index_entry_with_absolute_path_is_refused(source, export, capsys):
    outside = export.parent / "secret.safetensors"
    shutil.move(export / VICTIM, outside)
    _point_index_at(export, str(outside))
    _refused(source, export, capsys, repr(str(outside)))


def test_export_file_that_is_a_symlink_out_is_refused(source, export, capsys):
    outside = export.parent / "secret.safetensors"
    shutil.move(export / VICTIM, outside)
    os.symlink(outside, export / VICTIM)
    _refused(source, export, capsys, repr(VICTIM))


def test_export_symlink_inside_the_folder_is_fine(source, export):
    os.mkdir(export / "sub")
    shutil.move(export / VICTIM, export / "sub" / VICTIM)
    os.symlink(os.path.join("sub", VICTIM), export / VICTIM)
    assert verify_export(source, export, progress=False).ok


# ------------------------------------------------------------------ checkpoint index
@pytest.fixture
def ckpt(source, tmp_path):
    root = tmp_path / "box" / "ckpt"
    shutil.copytree(source, root)
    return root


def _first_shard(root) -> str:
    weight_map = json.loads((root / INDEX_FILE).read_text())["weight_map"]
    return sorted(set(weight_map.values()))[0]


def _point_weight_map_at(root, old: str, new: str) -> None:
    index = json.loads((root / INDEX_FILE).read_text())
    index["weight_map"] = {k: (new if v == old else v) for k, v in index["weight_map"].items()}
    (root / INDEX_FILE).write_text(json.dumps(index))


def test_weight_map_entry_with_dotdot_is_refused(ckpt):
    shard = _first_shard(ckpt)
    shutil.move(ckpt / shard, ckpt.parent / "secret.safetensors")
    _point_weight_map_at(ckpt, shard, "../secret.safetensors")
    with pytest.raises(ValueError, match=r"'\.\./secret\.safetensors'.*outside"):
        Checkpoint.open(ckpt)


def test_weight_map_entry_with_absolute_path_is_refused(ckpt):
    shard = _first_shard(ckpt)
    outside = str(ckpt.parent / "secret.safetensors")
    shutil.move(ckpt / shard, outside)
    _point_weight_map_at(ckpt, shard, outside)
    with pytest.raises(ValueError, match="absolute path.*outside"):
        Checkpoint.open(ckpt)


def test_checkpoint_shard_that_is_a_symlink_out_is_refused(source, ckpt, tmp_path):
    shard = _first_shard(ckpt)
    outside = ckpt.parent / "secret.safetensors"
    shutil.move(ckpt / shard, outside)
    os.symlink(outside, ckpt / shard)
    with pytest.raises(ValueError, match=f"'{shard}'.*symlink.*outside"):
        Checkpoint.open(ckpt)
    # the same checkpoint exported: refused before anything is written
    with pytest.raises(ValueError, match="outside"):
        export_checkpoint(ckpt, layout_for(source, extra=4, gpus=2), tmp_path / "x", CFG)
    assert not (tmp_path / "x").exists()


def test_side_file_that_is_a_symlink_out_is_refused(ckpt, tmp_path):
    (ckpt.parent / "id_rsa").write_text("private")
    os.symlink(ckpt.parent / "id_rsa", ckpt / "tokenizer_config.json")
    layout = layout_for(str(ckpt), extra=4, gpus=2)
    with pytest.raises(ValueError, match="'tokenizer_config.json'.*outside"):
        export_checkpoint(ckpt, layout, tmp_path / "x", CFG)
    assert not (tmp_path / "x").exists()


def test_hugging_face_cache_snapshot_with_blob_symlinks_opens(source, tmp_path):
    """huggingface_hub's cache keeps files in ``blobs/`` and links them from
    ``snapshots/<revision>/``: those links point out of the folder and stay accepted."""
    repo = tmp_path / "models--org--tiny"
    snapshot = repo / "snapshots" / "0123abc"
    os.makedirs(repo / "blobs")
    os.makedirs(snapshot)
    for i, name in enumerate(sorted(os.listdir(source))):
        blob = repo / "blobs" / f"blob{i}"
        shutil.copyfile(os.path.join(source, name), blob)
        os.symlink(os.path.join("..", "..", "blobs", f"blob{i}"), snapshot / name)
    ckpt = Checkpoint.open(snapshot)
    assert ckpt.tensors.keys() == Checkpoint.open(source).tensors.keys()
    out = tmp_path / "out"
    export_checkpoint(snapshot, layout_for(str(snapshot), extra=4, gpus=2), out, CFG)
    assert verify_export(snapshot, out, progress=False).ok
