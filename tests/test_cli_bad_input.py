"""Bad input to the ``eplb`` CLI found by a robustness audit: each case gets one
``eplb <cmd>: error: ...`` line naming what is wrong, exit status 2, no traceback, and
nothing written. The commands run in-process through ``main``; stderr is captured."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
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


# ---------------------------------------------------------------------- load files
T = ["--replicas", "12", "--gpus", "4"]


def test_a_layout_or_routing_trace_given_as_load_is_named(tmp_path, capsys):
    """An SGLang layout .pt holds one array: it used to be planned as a load of slot ids."""
    import numpy as np

    from eplb_plugin import Topology, plan

    layout = plan(torch.rand(4, 8) * 100, Topology(12, 1, 1, 4))
    sglang = tmp_path / "sglang.pt"
    torch.save({"physical_to_logical_map": layout.phy2log}, sglang)
    ours = tmp_path / "layout.safetensors"
    layout.save(ours)
    trace = tmp_path / "trace.npz"
    np.savez(trace, topk_ids=np.zeros((8, 4, 2), dtype=np.int64))
    out = tmp_path / "out.safetensors"
    for path, kind in ((sglang, "an SGLang layout"), (ours, "an eplb layout"),
                       (trace, "a routing trace")):  # fmt: skip
        refused(capsys, ["plan", "--load", str(path), *T, "--out", str(out)], str(path), kind)
        refused(capsys, ["convert", "load", str(path), str(out)], kind)
    assert not out.exists()


def test_routing_trace_without_any_expert_id(tmp_path, capsys):
    import numpy as np

    trace = tmp_path / "trace.npz"
    np.savez(trace, topk_ids=np.full((64, 2, 2), -1))
    argv = ["simulate", "--trace", str(trace), *T, "--batch-tokens", "8", "--no-progress"]
    refused(capsys, argv, str(trace), "names no expert")


def test_sglang_dump_of_counts_beyond_int64(tmp_path, capsys):
    """3e38 tokens used to wrap round to int64's minimum and be called a negative count."""
    load = tmp_path / "load.pt"
    torch.save(torch.full((2, 8), 3e38), load)
    out = tmp_path / "dump.pt"
    refused(capsys, ["convert", "load", str(load), str(out), "--sglang"], "beyond int64")
    assert not out.exists()


# ---------------------------------------------------------------------- output paths
def test_output_that_is_the_input_is_refused_before_it_is_replaced(tmp_path, capsys):
    load = tmp_path / "load.safetensors"
    from eplb_plugin.traces import write_load

    write_load(load, torch.rand(4, 8) * 100)
    before = load.read_bytes()
    refused(capsys, ["plan", "--load", str(load), *T, "--out", str(load)], "is the input")
    refused(capsys, ["convert", "load", str(load), str(load)], "is the input")
    # the same file under another name
    refused(capsys, ["convert", "load", str(load), str(tmp_path / "." / "load.safetensors")],
            "is the input")  # fmt: skip
    assert load.read_bytes() == before
    layout = tmp_path / "layout.json"
    main(["plan", "--load", str(load), *T, "--out", str(tmp_path / "l.safetensors")])
    main(["convert", "layout", str(tmp_path / "l.safetensors"), str(layout)])
    capsys.readouterr()
    before = layout.read_bytes()
    argv = ["convert", "layout", str(layout), str(layout), "--ep-size", "4"]
    refused(capsys, argv, "is the input")
    assert layout.read_bytes() == before


def test_empty_output_names_are_refused(tmp_path, capsys):
    """--out '' used to be ignored silently (the plan ran, nothing was written)."""
    load = tmp_path / "load.pt"
    torch.save(torch.rand(4, 8) * 100, load)
    refused(capsys, ["plan", "--load", str(load), *T, "--out", ""], "--out is empty")
    refused(capsys, ["convert", "load", str(load), ""], "output is empty")


def test_atomic_write_errors_name_the_target_not_the_temporary_file(tmp_path):
    from eplb_plugin.fileio import atomic_write

    target = tmp_path / "missing-folder" / "x.json"
    with pytest.raises(FileNotFoundError, match="missing-folder/x.json'"):
        atomic_write(target, lambda tmp: None)
    folder = tmp_path / "a-folder"
    folder.mkdir()
    with pytest.raises(OSError, match=f"{folder}'") as caught:
        atomic_write(folder, lambda tmp: open(tmp, "w").close())
    assert ".eplb-" not in str(caught.value)
    assert os.listdir(tmp_path) == ["a-folder"]  # the temporary file is gone


# ---------------------------------------------------------------------- convert layout
@pytest.mark.parametrize(
    "extra, message",
    [
        (["--num-layers", "100000000"], "--num-layers 100000000 must lie in [1, 4096]"),
        (["--num-layers", "0"], "--num-layers 0 must lie in [1, 4096]"),
        (["--layer-ids", "0-99999999999"], "layer id 99999999999 is not below 4096"),
        (["--layer-ids", ""], "'' is not a layer id"),
    ],
)
def test_convert_layout_layer_bounds(tmp_path, capsys, extra, message):
    """A huge --num-layers or layer id used to build a map of gigabytes (a MemoryError
    traceback, or minutes of work); --layer-ids '' used to be ignored."""
    from eplb_plugin import Topology, plan

    src = tmp_path / "layout.safetensors"
    plan(torch.rand(4, 8) * 100, Topology(12, 1, 1, 4)).save(src)
    out = tmp_path / "out.json"
    refused(capsys, ["convert", "layout", str(src), str(out), *extra], message)
    assert not out.exists()


# ---------------------------------------------------------------------- simulate
@pytest.fixture
def routing_trace(tmp_path):
    import numpy as np

    path = tmp_path / "trace.npz"
    ids = np.random.default_rng(0).integers(0, 8, size=(256, 2, 2))
    np.savez(path, topk_ids=ids)
    return str(path)


@pytest.mark.parametrize(
    "extra, message",
    [
        # 10**8 sweeps per layer and step used to run for hours
        (["--waterfill-iters", "100000000"], "--waterfill-iters 100000000 must be <= 128"),
        # inf used to pass, and 0 slots moved x inf printed a numpy RuntimeWarning
        (["--migrate", "--migration-cost", "inf"], "--migration-cost inf must be a finite"),
        (["--experts", "0"], "--experts 0 must be >= 1"),
        (["--plot", ""], "--plot is empty"),
    ],
)
def test_simulate_option_bounds(routing_trace, capsys, extra, message):
    argv = ["simulate", "--trace", routing_trace, *T, "--batch-tokens", "16", "--no-progress"]
    refused(capsys, [*argv, *extra], message)


def test_simulate_plot_that_is_a_folder_is_refused_before_the_replay(
    routing_trace, tmp_path, capsys, monkeypatch
):
    """Used to replay the whole trace, then fail on the rename naming a hidden temp file."""
    import eplb_plugin.simulate as simulate

    def replayed(*args, **kwargs):
        raise AssertionError("the replay ran despite the bad --plot")

    monkeypatch.setattr(simulate, "replay", replayed)
    folder = tmp_path / "plot.png"
    folder.mkdir()
    argv = ["simulate", "--trace", routing_trace, *T, "--batch-tokens", "16", "--no-progress"]
    refused(capsys, [*argv, "--plot", str(folder)], "is a directory")
    assert os.listdir(folder) == []


@pytest.mark.parametrize(
    "extra, message",
    [
        # an OverflowError traceback
        (["--tokens-per-gpu", "99999999999999999999999"], "must list integers in [1, 16777216]"),
        # tried to allocate 78 GB: a RuntimeError traceback
        (["--layers", "100000"], "100000 layers x 256 experts"),
    ],
)
def test_simulate_recommend_bounds(capsys, extra, message):
    argv = ["simulate", "--recommend", "--replicas", "288", "--gpus", "32", "--no-progress"]
    refused(capsys, [*argv, *extra], message)


# ---------------------------------------------------------------------- --eplb-config
def test_record_dir_that_is_a_file_is_refused_by_every_launcher(tmp_path, capsys):
    """Used to pass the launchers; the balancer found it only after the model loaded."""
    taken = tmp_path / "taken"
    taken.write_text("")
    for value in (taken, taken / "below"):
        cfg = json.dumps({"record_dir": str(value)})
        for argv in (
            ["vllm", "serve", "m", "--eplb-dry-run", "--enable-eplb", "--eplb-config", cfg],
            ["sglang", "launch_server", "--dry-run", "--enable-eplb", "--eplb-config", cfg],
        ):
            refused(capsys, argv, "record_dir", str(taken))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--eplb-config", '{"initial_layout": "layout.safetensors"}'], "the demo does not read"),
        (["--eplb-num-redundant-experts", "100000000"], "at most 8192 slots per layer"),
        (["--eplb-config", '{"record_dir": "taken"}'], "is a file, not a folder"),
    ],
)
def test_demo_refuses_settings_its_engine_cannot_honour(
    no_engine, tmp_path, monkeypatch, capsys, extra, message
):
    """Each used to start the engines: initial_layout was ignored without a word, 10**8
    redundant slots were allocated by every rank, record_dir failed after the model loaded."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "taken").write_text("")
    refused(capsys, ["demo", "--no-report", *extra], message)


# ---------------------------------------------------------------------- Ctrl-C
def test_ctrl_c_while_the_parser_is_built_is_one_line(monkeypatch, capsys):
    """Building the parser imports every subcommand module; Ctrl-C there (the first tenth
    of a second of any command) used to print a KeyboardInterrupt traceback."""
    import eplb_plugin.cli.main as cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert cli.main(["plan", "--help"]) == 130
    assert capsys.readouterr().err == "eplb: interrupted\n"


# ---------------------------------------------------------------------- engine statistics
def test_slot_map_naming_an_expert_beyond_its_slots(tmp_path, capsys):
    """The map's largest id sized the [..., L, E] count array: 10**12 asked for 96 TB
    (a RuntimeError traceback)."""
    phy2log = torch.arange(12).remainder(8).repeat(4, 1)
    phy2log[0, 0] = 10**12
    window = tmp_path / "window.pt"
    count = torch.randint(0, 50, (3, 4, 12))
    torch.save({"expert_load_window": count, "physical_to_logical_map": phy2log}, window)
    out = tmp_path / "out.npz"
    refused(capsys, ["convert", "load", str(window), str(out)], "names expert 1000000000000")
    assert not out.exists()


@pytest.mark.parametrize("pass_id", [None, [1], 1.5, "x"])
def test_per_pass_dump_with_a_pass_id_that_is_not_an_integer(tmp_path, capsys, pass_id):
    """None and [1] used to end in a TypeError traceback; 1.5 was truncated to pass 1."""
    record = {"forward_pass_id": pass_id, "rank": 0,
              "global_physical_count": torch.randint(0, 9, (4, 12))}  # fmt: skip
    dump = tmp_path / "dump.pt"
    phy2log = torch.arange(12).remainder(8).repeat(4, 1)
    torch.save({"records": [record], "last_physical_to_logical_map": phy2log}, dump)
    out = tmp_path / "out.npz"
    refused(capsys, ["convert", "load", str(dump), str(out)], "forward_pass_id", "not an integer")
    assert not out.exists()


# ---------------------------------------------------------------------- checkpoint config
@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": ["deepseek_v3"]}, "model_type must be a string"),  # unhashable
        ({"text_config": [1]}, "text_config must be an object"),  # AttributeError
        ({"num_hidden_layers": "3"}, "num_hidden_layers must be an integer >= 1, got '3'"),
        ({"num_hidden_layers": -1}, "num_hidden_layers must be an integer >= 1"),
        # only the dense layer 0 lies below it: used to end in a StopIteration traceback
        ({"num_hidden_layers": 1}, "holds no routed-expert tensors in layers below"),
    ],
)
def test_export_refuses_config_fields_of_the_wrong_type(
    exported, tmp_path, capsys, change, message
):
    src, _ = exported
    copy = tmp_path / "ckpt"
    shutil.copytree(src, copy)
    config = json.loads((copy / "config.json").read_text())
    config.update(change)
    (copy / "config.json").write_text(json.dumps(config))
    layout = tmp_path / "layout.safetensors"
    layout_for(src, extra=4, gpus=2).save(layout)
    out = tmp_path / "out"
    refused(capsys, ["export", "--checkpoint", str(copy), "--layout", str(layout), "--out",
                     str(out), "--no-progress"], message)  # fmt: skip
    assert not out.exists()


def test_layout_with_deeply_nested_topology_metadata(tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from eplb_plugin import Topology, plan

    good = tmp_path / "good.safetensors"
    plan(torch.rand(4, 8) * 100, Topology(12, 1, 1, 4)).save(good)
    with safe_open(str(good), "pt") as f:
        meta = f.metadata()
    bad = tmp_path / "bad.safetensors"
    save_file(load_file(good), bad, metadata={**meta, "topology": "[" * 50_000 + "]" * 50_000})
    out = tmp_path / "out.json"
    refused(capsys, ["convert", "layout", str(bad), str(out)], "topology metadata is not JSON")
    assert not out.exists()


def test_big_endian_npy_and_npz_loads_are_read(tmp_path, capsys):
    """A valid .npy may be big-endian; torch refused it ('byte order different from the
    native byte order'), so the load was rejected."""
    import numpy as np

    load = np.random.default_rng(0).random((4, 8)) * 100
    for name, save in (("be.npy", lambda p: np.save(p, load.astype(">f4"))),
                       ("be.npz", lambda p: np.savez(p, load=load.astype(">f8")))):  # fmt: skip
        path = tmp_path / name
        save(path)
        assert main(["plan", "--load", str(path), *T, "--json"]) == 0
        summary = json.loads(capsys.readouterr().out)
        assert summary["balancedness_after"] > summary["balancedness_before"]
