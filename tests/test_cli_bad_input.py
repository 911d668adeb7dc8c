"""Bad input to the ``eplb`` CLI found by a robustness audit: each case gets one
``eplb <cmd>: error: ...`` line naming what is wrong, exit status 2, no traceback, and
nothing written. The commands run in-process through ``main``; stderr is captured."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from test_export import CFG, layout_for, write_fp8_deepseek

from eplb_plugin.cli.main import main
from eplb_plugin.export import EXPORT_INDEX, export_checkpoint


def refused(capsys, argv: list[str], *fragments: str) -> str:
    """Run ``eplb ARGV``; assert exit 2 and one error line holding every fragment."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    assert err.startswith(f"eplb {argv[0]}: error: "), err
    for fragment in fragments:
        assert fragment in err, err
    return err


def deep_json(path) -> str:
    """A JSON file nested deeper than Python's recursion limit (json.load recurses per level)."""
    path.write_text("[" * 100_000 + "]" * 100_000)
    return str(path)


# ---------------------------------------------------------------------- nested JSON
def test_deeply_nested_json_load_and_layout_files(tmp_path, capsys):
    deep = deep_json(tmp_path / "deep.json")
    out = tmp_path / "out.pt"
    refused(capsys, ["plan", "--load", deep, "--replicas", "12", "--gpus", "4"], deep, "nested")
    refused(capsys, ["convert", "load", deep, str(out)], deep, "nested")
    refused(capsys, ["convert", "layout", deep, str(out), "--ep-size", "4"], deep, "nested")
    assert not out.exists()


# ---------------------------------------------------------------------- export index
@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("exp")
    src = write_fp8_deepseek(root / "ckpt", layers=2, experts=4)
    out = root / "export"
    export_checkpoint(src, layout_for(src, extra=4, gpus=2), out, CFG)
    return src, out


def _damaged(exported, tmp_path, edit) -> str:
    """A copy of the export whose index ``edit(index)`` changed (or replaced, if it returns)."""

    _, out = exported
    copy = tmp_path / "damaged"
    shutil.copytree(out, copy)
    index = json.loads((copy / EXPORT_INDEX).read_text())
    replaced = edit(index)
    text = replaced if isinstance(replaced, str) else json.dumps(index)
    (copy / EXPORT_INDEX).write_text(text)
    return str(copy)


@pytest.mark.parametrize(
    "edit, fragments",
    [
        (lambda i: "[]", ["is not an eplb export index"]),
        (lambda i: "[" * 100_000 + "]" * 100_000, ["cannot read", "recursion"]),
        (lambda i: i.update(version=None), ["export version None"]),
        (lambda i: i.pop("ep_size"), ["lacks 'ep_size'"]),
        (lambda i: i.pop("layout_rows"), ["lacks 'layout_rows'"]),
        (lambda i: i.pop("tensors"), ["lacks 'tensors'"]),
        (lambda i: i.update(ep_size=None), ["'ep_size' must be an integer >= 1"]),
        (lambda i: i.update(files=["a"]), ["'files' must be"]),
        (lambda i: i.update(files={k: {} for k in i["files"]}), ["'files' must be"]),
        (lambda i: i.update(layout_rows=[0, 1]), ["'layout_rows' must be"]),
        (lambda i: i.update(expert_heads=[]), ["'expert_heads' must be"]),
        (lambda i: i.update(tensors=["x"]), ["'tensors' must be"]),
        (lambda i: i.update(ranks=i["ranks"][:1]), ["files of 1 ranks for ep_size=2"]),
        (lambda i: i.update(moe_layers=[*i["moe_layers"], 99]), ["MoE layers [99] have no row"]),
    ],
)
def test_verify_refuses_a_damaged_export_index(exported, tmp_path, capsys, edit, fragments):
    """Each used to end in a KeyError/TypeError/AttributeError traceback, or (a missing
    'tensors', 'ranks', 'expert_heads') in `verify` saying OK for an index engines cannot load."""
    src, _ = exported
    damaged = _damaged(exported, tmp_path, edit)
    refused(capsys, ["verify", "--checkpoint", src, "--export", damaged, "--no-progress"],
            EXPORT_INDEX, *fragments)  # fmt: skip


def test_export_refuses_a_checkpoint_config_that_is_not_an_object(exported, tmp_path, capsys):

    src, _ = exported
    copy = tmp_path / "ckpt"
    shutil.copytree(src, copy)
    (copy / "config.json").write_text("[]")
    out = tmp_path / "out"
    layout = tmp_path / "layout.safetensors"
    layout_for(src, extra=4, gpus=2).save(layout)
    refused(capsys, ["export", "--checkpoint", str(copy), "--layout", str(layout), "--out",
                     str(out), "--no-progress"], "config.json", "holds a list")  # fmt: skip
    assert not out.exists()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no partial folder


# ---------------------------------------------------------------------- export options
@pytest.mark.parametrize("size", ["inf", "1e400", "nan", "-1MB"])
def test_export_refuses_sizes_that_are_not_finite_and_positive(exported, tmp_path, capsys, size):
    """inf and 1e400 used to end in an OverflowError traceback, nan in numpy's words."""
    src, _ = exported
    layout = tmp_path / "layout.safetensors"
    layout_for(src, extra=4, gpus=2).save(layout)
    out = tmp_path / "out"
    for option in ("--max-shard-size", "--max-rate"):
        argv = ["export", "--checkpoint", src, "--layout", str(layout), "--out", str(out),
                "--no-progress", f"{option}={size}"]  # fmt: skip
        refused(capsys, argv, f"cannot read size {size!r}")
    assert not out.exists()


# ---------------------------------------------------------------------- demo
@pytest.fixture
def no_engine(monkeypatch):
    """Fail the test, instead of running a demo for minutes, if validation lets a case by."""
    pytest.importorskip("transformers")
    import eplb_plugin.integrations.transformers.engine as engine

    def started(*args, **kwargs):
        raise AssertionError("the demo started its engines despite the bad option")

    monkeypatch.setattr(engine, "run_engine", started)


@pytest.mark.parametrize("timeout", ["nan", "inf"])
def test_demo_refuses_a_timeout_that_is_not_finite(no_engine, capsys, timeout):
    refused(capsys, ["demo", "--timeout", timeout], f"--timeout={timeout}", "positive")


def test_demo_checks_the_report_folder_before_running(no_engine, tmp_path, capsys):
    """The folder of --report used to be found missing only when the report was written,
    after the whole demo had run."""
    report = tmp_path / "no-such-folder" / "report.png"
    refused(capsys, ["demo", "--report", str(report)], "--report", "does not exist")
    folder = tmp_path / "taken.png"
    folder.mkdir()
    refused(capsys, ["demo", "--report", str(folder)], "is a directory")
