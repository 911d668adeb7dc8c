"""Start-up cost: ``eplb --help``, every subcommand's ``--help`` and ``import eplb_plugin``
must not import torch (seconds); the names the parsers list must match the registries."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from eplb_plugin import names
from eplb_plugin.cli.main import SUBCOMMANDS


def _python(code: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_help_of_eplb_and_every_subcommand_does_not_import_torch():
    commands = [[], *([name] for name in SUBCOMMANDS), ["convert", "load"], ["convert", "layout"]]
    out = _python(
        f"""
        import contextlib, io, json, sys
        from eplb_plugin.cli.main import main
        seen = []
        for command in {commands!r}:
            text = io.StringIO()
            with contextlib.redirect_stdout(text):
                try:
                    main([*command, "--help"])
                except SystemExit as exc:
                    assert exc.code == 0, (command, exc.code)
            seen.append([command, "torch" in sys.modules, text.getvalue()])
        print(json.dumps(seen))
        """
    )
    seen = json.loads(out)
    assert [command for command, _, _ in seen] == commands
    for command, torch_loaded, text in seen:
        assert text.startswith("usage: eplb"), (command, text)
        assert not torch_loaded, f"eplb {' '.join(command)} --help imported torch"
    # the lists come from eplb_plugin.names, not from the registries
    plan_help = dict((" ".join(c), t) for c, _, t in seen)["plan"]
    assert "one of deepseek, default" in plan_help


def test_module_main_help_does_not_import_torch():
    out = _python(
        """
        import runpy, sys
        sys.argv = ["eplb", "--help"]
        try:
            runpy.run_module("eplb_plugin.cli.main", run_name="__main__")
        except SystemExit as exc:
            assert exc.code == 0
        print("torch" in sys.modules)
        """
    )
    assert out.strip().endswith("False"), out


def test_import_eplb_plugin_is_lazy():
    out = _python(
        """
        import json, sys
        import eplb_plugin
        before = "torch" in sys.modules
        config = eplb_plugin.EplbConfig  # torch-free module
        after_config = "torch" in sys.modules
        layout = eplb_plugin.Topology
        from eplb_plugin.layout import Topology
        from eplb_plugin.policies import available_policies
        resolved = all(getattr(eplb_plugin, name) is not None for name in eplb_plugin.__all__)
        print(json.dumps({
            "before": before, "after_config": after_config, "after": "torch" in sys.modules,
            "same": layout is Topology, "resolved": resolved,
            "dir": sorted(set(eplb_plugin.__all__) - set(dir(eplb_plugin))),
            "policies": available_policies(),
        }))
        """
    )
    got = json.loads(out)
    assert got["before"] is False and got["after_config"] is False
    assert got["after"] is True and got["same"] and got["resolved"]
    assert got["dir"] == []
    # a fresh process holds exactly the built-in policies, which the help texts list
    assert tuple(got["policies"]) == names.BUILTIN_POLICIES


def test_unknown_public_name_is_an_attribute_error():
    import eplb_plugin

    try:
        eplb_plugin.NoSuchName  # noqa: B018
    except AttributeError as exc:
        assert "NoSuchName" in str(exc)
    else:
        raise AssertionError("eplb_plugin.NoSuchName resolved")


def test_names_match_the_tables_that_need_torch():
    from eplb_plugin.costmodel import HARDWARE, MODELS

    # a preset added to costmodel must also be added to eplb_plugin/names.py (help texts)
    assert tuple(HARDWARE) == names.HARDWARE_PRESETS
    assert tuple(MODELS) == names.MODEL_PRESETS


def test_help_lists_policies_registered_by_the_caller(monkeypatch):
    from eplb_plugin import policies

    for table in ("_POLICIES", "_OPTIONS", "_CHECKS"):  # registered for this test only
        monkeypatch.setattr(policies, table, dict(getattr(policies, table)))

    @policies.register_policy("zz-test-startup")
    def mine(weight, topology):  # pragma: no cover - never planned with
        raise AssertionError

    # other tests may have registered policies of their own in this process
    assert names.policy_names() == tuple(policies.available_policies())
    assert set(names.BUILTIN_POLICIES) | {"zz-test-startup"} <= set(names.policy_names())
