"""Issue 15 findings 3, 4, 6-10: every bad input gets one clear error, extreme loads still plan.

CLI cases run as real processes: :func:`run_cli` forks one child per command line from a
parent that has imported the package once (a fresh interpreter per case would spend ~3 s
importing torch), the child's stdout/stderr go to files, and its exit status is the
process's own. `eplb plan --json | head` runs as a shell pipe.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch

from eplb_plugin import EplbConfig, ExpertLayout, Topology, plan, rebalance_experts
from eplb_plugin.layout import balancedness_of
from eplb_plugin.policies import LoadWarning, register_policy

# deepseek-ai/EPLB's eplb.py, loaded by path (tests/ is not a package)
_spec = importlib.util.spec_from_file_location(
    "eplb_reference", pathlib.Path(__file__).resolve().parent / "eplb_reference.py"
)
reference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reference)

TOPO = Topology(num_replicas=16, num_groups=4, num_nodes=2, num_gpus=8)

_DRIVER = textwrap.dedent(
    """
    import json, os, sys, traceback
    from eplb_plugin.cli import main as m
    m.build_parser()  # import every subcommand before forking
    cases, folder = json.loads(sys.argv[1]), sys.argv[2]
    codes = []
    for i, argv in enumerate(cases):
        pid = os.fork()
        if pid == 0:
            for fd, name in ((1, "out"), (2, "err")):
                f = os.open(os.path.join(folder, f"{i}.{name}"), os.O_WRONLY | os.O_CREAT, 0o600)
                os.dup2(f, fd)
            try:
                code = m.main(argv)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:  # what the interpreter would print for an escaped error
                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
    print(json.dumps(codes))
    """
)


def run_cli(tmp_path, *cases: list[str]) -> list[tuple[int, str, str]]:
    """(exit code, stdout, stderr) of ``eplb ARGV`` for each case, each in its own process."""
    folder = tmp_path / "cli-out"
    folder.mkdir(exist_ok=True)
    proc = subprocess.run(
        [sys.executable, "-c", _DRIVER, json.dumps([list(c) for c in cases]), str(folder)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    codes = json.loads(proc.stdout.strip().splitlines()[-1])
    return [
        (code, (folder / f"{i}.out").read_text(), (folder / f"{i}.err").read_text())
        for i, code in enumerate(codes)
    ]


def assert_one_error_line(result: tuple[int, str, str], command: str, *needles: str) -> str:
    code, _out, err = result
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith(f"eplb {command}: error: "), err
    for needle in needles:
        assert needle in lines[0], err
    return lines[0]


def _layout(layers: int = 4) -> ExpertLayout:
    return plan(torch.rand(layers, 12, generator=torch.Generator().manual_seed(0)), TOPO)


# ------------------------------------------------------------------ 3: policy options
def test_finding3_plan_refuses_an_unknown_option_naming_the_valid_ones():
    with pytest.raises(
        ValueError, match=r"unknown option 'max_move' for policy 'default'.*max_moved"
    ):
        plan(torch.rand(2, 12), TOPO, max_move=0.1)
    with pytest.raises(ValueError, match=r"unknown option 'foo' for policy 'deepseek'"):
        plan(torch.rand(2, 12), TOPO, policy="deepseek", foo=1)


def test_finding3_custom_policy_options_come_from_its_signature():
    seen = []

    def scaled(weight, topology, previous=None, *, alpha: float = 1.0):
        seen.append(alpha)
        return plan(weight * alpha, topology, policy="deepseek")

    register_policy("test-scaled", scaled, replace=True)
    plan(torch.rand(3, 5, 12), TOPO, policy="test-scaled", alpha=2.0)  # steps not forced on it
    assert seen == [2.0]
    with pytest.raises(ValueError, match=r"unknown option 'beta' for policy 'test-scaled'.*alpha"):
        plan(torch.rand(2, 12), TOPO, policy="test-scaled", beta=1)


@pytest.mark.parametrize(
    "options, match",
    [
        ({"max_move": 0.1}, r"unknown option 'max_move' for policy 'default'.*max_moved"),
        ({"max_moved": 2}, "max_moved must lie in"),
        ({"dispatch": "global"}, "EplbConfig.dispatch"),
    ],
)
def test_finding3_config_validates_policy_options(options, match):
    with pytest.raises(ValueError, match=match):
        EplbConfig(policy_options=options)
    with pytest.raises(ValueError, match="unknown option 'max_moved' for policy 'deepseek'"):
        EplbConfig(policy="deepseek", policy_options={"max_moved": 0.5})
    assert EplbConfig(policy_options={"max_moved": 0.5}).policy_options == {"max_moved": 0.5}


# ------------------------------------------------------------------ 4: --layer-ids
def test_finding4_layer_ids_duplicates_refused_ranges_accepted(tmp_path):
    src = tmp_path / "l.safetensors"
    _layout(4).save(src)
    dup, ranged, bad = run_cli(
        tmp_path,
        ["convert", "layout", str(src), str(tmp_path / "a.pt"), "--layer-ids", "1,1,1,1"],
        ["convert", "layout", str(src), str(tmp_path / "b.pt"), "--layer-ids", "0-1,3-4"],
        ["convert", "layout", str(src), str(tmp_path / "c.pt"), "--layer-ids", "0-2"],
    )
    assert_one_error_line(dup, "convert", "--layer-ids", "1 more than once")
    assert not (tmp_path / "a.pt").exists()
    assert ranged[0] == 0, ranged[2]
    assert "5 rows" in ranged[1]  # rows written: hidden layers 0..4, row 2 is dense
    written = torch.load(tmp_path / "b.pt")["physical_to_logical_map"]
    assert written.shape[0] == 5
    assert_one_error_line(bad, "convert", "3 layer ids", "4 rows")


def test_finding4_sglang_map_refuses_duplicate_layer_ids():
    from eplb_plugin.formats import sglang_phy2log

    with pytest.raises(ValueError, match="more than once"):
        sglang_phy2log(_layout(4), [1, 1, 1, 1])


# ------------------------------------------------------------------ 6: extreme loads
@pytest.mark.parametrize("topology", [TOPO, Topology(16, 3, 2, 8)], ids=["hier", "global"])
def test_finding6_loads_near_float32_max_plan_as_their_scaled_copy(topology):
    gen = torch.Generator().manual_seed(1)
    base = torch.rand(6, 12, generator=gen)
    huge = base * 3e38
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow RuntimeWarning either
        layout = plan(huge, topology, policy="deepseek")
        # a power-of-two rescale is exact in float32: DeepSeek's plan must be the same
        assert layout.equals(plan(huge * 2.0**-100, topology, policy="deepseek"))
        plan(huge, topology, policy="default").validate()
        big64 = base.double() * 1e300  # beyond float32: normalised before the cast
        assert plan(big64, topology, "deepseek").equals(
            plan(big64 * 2.0**-900, topology, "deepseek")
        )
        steps = torch.rand(4, 6, 12, generator=gen, dtype=torch.float64) * 1.7e308
        for policy in ("deepseek", "default"):  # their sum overflows float64 unscaled
            plan(steps, topology, policy=policy).validate()


def test_finding6_balanced_packing_never_overfills_a_pack_with_infinite_weights():
    from eplb_plugin.policies.deepseek import balanced_packing

    weight = torch.tensor([[float("inf"), float("inf"), 1.0, 2.0, float("inf"), 3.0]])
    pack, rank = balanced_packing(weight, 2)
    assert torch.bincount(pack[0], minlength=2).tolist() == [3, 3]
    assert sorted(zip(pack[0].tolist(), rank[0].tolist())) == [
        (p, r) for p in (0, 1) for r in (0, 1, 2)
    ]


# ------------------------------------------------------------------ 7: bounded work
def test_finding7_plan_refuses_work_beyond_the_documented_limits():
    with pytest.raises(ValueError, match="slots per layer"):
        plan(torch.rand(1, 16), Topology(20_000, 1, 1, 20))
    with pytest.raises(ValueError, match="replicas per expert"):
        plan(torch.rand(1, 16), Topology(2_000, 1, 1, 8))
    with pytest.raises(ValueError, match="slots per GPU"):
        plan(torch.rand(1, 256), Topology(4096, 1, 1, 2))


def test_finding7_routing_trace_ids_are_bounded(tmp_path):
    from eplb_plugin.traces import read_routing_trace, steps_from_routing_trace

    ids = np.zeros((8, 1, 2), dtype=np.int64)
    ids[3, 0, 1] = 2**40
    path = tmp_path / "t.npz"
    np.savez(path, topk_ids=ids)
    with pytest.raises(ValueError, match="expert id 1099511627776"):
        steps_from_routing_trace(read_routing_trace(path).topk_ids, 4, 2)
    with pytest.raises(ValueError, match=">= num_experts=16"):
        steps_from_routing_trace(read_routing_trace(path).topk_ids, 4, 2, num_experts=16)


# ------------------------------------------------------------------ 8: tracebacks -> one line
def _save_raw_layout(path, layout: ExpertLayout, meta: dict) -> None:
    from safetensors.torch import save_file

    tensors = {
        k: getattr(layout, k).contiguous()
        for k in ("phy2log", "log2phy", "logcnt", "replica_share")
    }
    save_file(tensors, str(path), metadata=meta)


@pytest.mark.parametrize(
    "meta, needle",
    [
        ({"format": "eplb-layout", "version": "1"}, "no topology"),
        (
            {"format": "eplb-layout", "version": "1",
             "topology": json.dumps({**TOPO.to_dict(), "num_cpus": 3})},
            "num_cpus",
        ),
        ({"format": "eplb-layout", "version": "1", "topology": "{oops"}, "topology"),
        ({"format": "eplb-layout", "version": "x", "topology": "{}"}, "version 'x'"),
        ({"format": "eplb-layout", "version": "1", "topology": "[1, 2]"}, "topology"),
    ],
)  # fmt: skip
def test_finding8_9_broken_layout_metadata_names_the_file(tmp_path, meta, needle):
    path = tmp_path / "bad.safetensors"
    _save_raw_layout(path, _layout(2), meta)
    with pytest.raises(ValueError) as info:
        ExpertLayout.load(path)
    assert str(path) in str(info.value) and needle in str(info.value)


def test_finding8_cli_errors_are_one_line(tmp_path):
    np.save(tmp_path / "ok.npy", np.random.default_rng(0).integers(0, 9, (2, 12)))
    np.save(tmp_path / "str.npy", np.array([["a"] * 12] * 2))
    np.save(tmp_path / "u64.npy", np.full((2, 12), 2**63 + 5, dtype=np.uint64))
    (tmp_path / "fake.npy").write_bytes(b"not numpy at all")
    np.save(tmp_path / "zero.npy", np.zeros((2, 12)))
    bad = tmp_path / "bad.safetensors"
    _save_raw_layout(bad, _layout(2), {"format": "eplb-layout", "version": "1"})
    topo = ["--replicas", "16", "--groups", "4", "--nodes", "2", "--gpus", "8"]
    missing = str(tmp_path / "no" / "such" / "folder")
    results = run_cli(
        tmp_path,
        ["plan", "--load", str(tmp_path / "str.npy"), *topo],
        ["plan", "--load", str(tmp_path / "ok.npy"), *topo, "--out", missing + "/l.safetensors"],
        ["convert", "load", str(tmp_path / "ok.npy"), missing + "/l.npy"],
        ["convert", "layout", str(bad), str(tmp_path / "x.pt")],
        ["plan", "--load", str(tmp_path / "fake.npy"), *topo],
        ["convert", "layout", str(tmp_path), str(tmp_path / "y.pt")],
        ["plan", "--load", str(tmp_path / "ok.npy"), *topo, "--layers", "-1"],
        ["demo", "--eplb-config", '{"policy_options": {"max_move": 0.1}}', "--no-report"],
        ["plan", "--load", str(tmp_path / "zero.npy"), *topo],
    )
    assert_one_error_line(results[0], "plan", "str.npy", "dtype")
    assert_one_error_line(results[1], "plan", "does not exist")
    assert_one_error_line(results[2], "convert", "does not exist")
    assert_one_error_line(results[3], "convert", "no topology")
    line = assert_one_error_line(results[4], "plan", "fake.npy")
    assert "allow_pickle" not in line
    assert_one_error_line(results[5], "convert", "is a directory")
    assert_one_error_line(results[6], "plan", "--layers")
    assert_one_error_line(results[7], "demo", "max_move", "max_moved")
    assert list(tmp_path.glob("*.pt")) == []
    code, out, err = results[8]  # an all-zero load plans, with one warning line
    assert code == 0 and "Traceback" not in err, err
    assert err.strip() == (
        "eplb plan: warning: layers [0, 1] have no load: planned as if every expert were "
        "equally loaded"
    )


def test_finding8_uint64_load_is_read_or_refused_in_one_line(tmp_path):
    from eplb_plugin.traces import read_load

    np.save(tmp_path / "u64.npy", np.arange(24, dtype=np.uint64).reshape(2, 12))
    assert read_load(tmp_path / "u64.npy").tolist() == np.arange(24.0).reshape(2, 12).tolist()
    np.save(tmp_path / "str.npy", np.array([["a"] * 12] * 2))
    with pytest.raises(ValueError, match="must hold real numbers"):
        read_load(tmp_path / "str.npy")


def test_finding8_meta_tensor_is_refused():
    with pytest.raises(ValueError, match="meta"):
        rebalance_experts(torch.empty(2, 12, device="meta"), 16, 4, 2, 8)


def test_finding8_broken_pipe_is_quiet(tmp_path):
    np.save(tmp_path / "ok.npy", np.random.default_rng(0).integers(0, 9, (1000, 12)))
    cmd = (
        f"{sys.executable} -m eplb_plugin.cli.main plan --load {tmp_path / 'ok.npy'} "
        "--replicas 16 --gpus 8 --json | head -c 10 >/dev/null"
    )
    proc = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=300)
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr


def test_finding8_keyboard_interrupt_exits_130_in_one_line(monkeypatch, capsys):
    from eplb_plugin.cli import main as m
    from eplb_plugin.cli import plan as plan_cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(plan_cli, "run", interrupted)
    assert m.main(["plan", "--load", "x.npy", "--replicas", "16", "--gpus", "8"]) == 130
    assert capsys.readouterr().err.strip() == "eplb plan: interrupted"


# ------------------------------------------------------------------ 9: silent or vague
def test_finding9_float_seq_offsets_refused(tmp_path):
    from eplb_plugin.traces import read_routing_trace

    path = tmp_path / "t.npz"
    np.savez(
        path, topk_ids=np.zeros((4, 1, 2), dtype=np.int64), seq_offsets=np.array([0.0, 2.5, 4.0])
    )
    with pytest.raises(ValueError, match="seq_offsets .* integers"):
        read_routing_trace(path)


def test_finding9_balancedness_of_nan_is_an_error():
    with pytest.raises(ValueError, match="NaN"):
        _layout(2).balancedness(torch.full((2, 12), float("nan")))
    with pytest.raises(ValueError, match="NaN"):
        balancedness_of(torch.full((2, 8), float("nan")))


@pytest.mark.parametrize("policy", ["deepseek", "default"])
def test_finding9_all_zero_load_warns_and_spreads_redundant_slots(policy):
    weight = torch.rand(3, 12)
    weight[1] = 0
    with pytest.warns(LoadWarning, match=r"layer 1 has no load"):
        layout = plan(weight, TOPO, policy=policy)
    assert int(layout.logcnt[1].max()) == 2  # 4 redundant slots on 4 experts, not 5 on one


def test_finding9_topology_takes_numpy_integers_and_layout_dir_is_named(tmp_path):
    t = Topology(np.int64(16), np.int32(4), np.int64(2), np.int64(8))
    assert t == TOPO and type(t.num_replicas) is int
    from eplb_plugin.formats import read_layout

    with pytest.raises(ValueError, match="is a directory"):
        read_layout(tmp_path, ep_size=8)


def test_issue14_routing_trace_without_seq_offsets_replays(tmp_path):
    from eplb_plugin.integrations.transformers.routing import TraceRouting

    path = tmp_path / "t.npz"
    np.savez(path, topk_ids=np.arange(8 * 2 * 2).reshape(8, 2, 2) % 6)
    routing = TraceRouting.from_file(str(path), num_experts=6, top_k=2)
    assert routing.seq_offsets.tolist() == [0, 8]
    np.savez(path, topk_ids=np.zeros((4, 1, 2), dtype=np.int64), seq_offsets=[0.0, 2.5, 4.0])
    with pytest.raises(ValueError, match="seq_offsets .* integers"):  # not truncated to 2
        TraceRouting.from_file(str(path), num_experts=6, top_k=2)


# ------------------------------------------------------------------ 10: drop-in topologies
@pytest.mark.parametrize("args", [(8, 3, 2, 4), (12, 5, 4, 6), (6, 1, 4, 6)])
def test_finding10_global_fallback_accepts_what_deepseek_accepts(args):
    weight = torch.rand(3, 4 if args[0] == 8 else 6, generator=torch.Generator().manual_seed(3))
    phy2log, _log2phy, logcnt = rebalance_experts(weight, *args, policy="deepseek")
    ref_phy2log, _ref_log2phy, ref_logcnt = reference.rebalance_experts(weight, *args)
    assert torch.equal(phy2log, ref_phy2log) and torch.equal(logcnt, ref_logcnt)
    layout = plan(weight, Topology(*args))  # the default policy plans it too
    assert int(layout.logcnt.min()) >= 1
