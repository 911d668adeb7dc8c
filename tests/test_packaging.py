"""kernels/ and integrations/ install as eplb_plugin.kernels / eplb_plugin.integrations only."""

import pathlib
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_subpackages_map_to_repository_folders():
    import eplb_plugin.integrations
    import eplb_plugin.kernels

    assert pathlib.Path(eplb_plugin.kernels.__file__).parent == ROOT / "kernels"
    assert pathlib.Path(eplb_plugin.integrations.__file__).parent == ROOT / "integrations"


def test_no_top_level_kernels_or_integrations_installed(tmp_path):
    # From a neutral directory, nothing of ours answers to the top-level names.
    code = (
        "import importlib.util, eplb_plugin.kernels, eplb_plugin.integrations\n"
        "for name in ('kernels', 'integrations'):\n"
        "    spec = importlib.util.find_spec(name)\n"
        "    print(name, spec.origin if spec else None)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout
    for line in out.splitlines():
        name, origin = line.split(" ", 1)
        # another distribution's package of that name (Hugging Face's `kernels`, which
        # transformers may pull in) is fine; our folders must not answer to it
        assert origin == "None" or not pathlib.Path(origin).resolve().is_relative_to(ROOT / name)


def _build_wheel(dest: pathlib.Path) -> pathlib.Path:
    """Build the project's wheel into ``dest`` (no dependencies, no isolation) and return it."""
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    subprocess.run([*cmd, "-w", str(dest), str(ROOT)], check=True, capture_output=True)
    (wheel,) = dest.glob("eplb_plugin-*.whl")
    return wheel


@pytest.mark.slow
def test_wheel_contains_only_eplb_plugin(tmp_path):
    wheel = _build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/", 1)[0] for n in names if not n.split("/", 1)[0].endswith(".dist-info")}
    assert tops == {"eplb_plugin"}, tops
    assert "eplb_plugin/kernels/__init__.py" in names
    assert "eplb_plugin/integrations/__init__.py" in names


@pytest.mark.slow
def test_wheel_installs_with_the_bundled_traces(tmp_path):
    """A plain (non-editable) install carries examples/: `eplb demo` replays the real trace."""
    import sysconfig
    import venv

    wheel = _build_wheel(tmp_path / "dist")
    env_dir = tmp_path / "env"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", purelib, wheel],
        check=True,
        capture_output=True,
    )
    # torch and the other dependencies come from this environment, appended after the fresh
    # one's own site-packages; a .pth line adds the folder without running this environment's
    # .pth files, so the editable install of the source tree stays out of sight.
    (pathlib.Path(purelib) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    code = (
        "import eplb_plugin, numpy as np\n"
        "from eplb_plugin.cli.demo import bundled_trace\n"
        "path = bundled_trace()\n"
        "print(eplb_plugin.__file__)\n"
        "print(path)\n"
        "print(np.load(path)['topk_ids'].shape)\n"
    )
    out = subprocess.run(
        [python, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out[0].startswith(purelib), out
    assert out[1].startswith(purelib) and out[1].endswith("esft_intent.npz"), out
    assert out[2] == "(8222, 26, 6)", out
    help_text = subprocess.run(
        [python, "-m", "eplb_plugin.cli.main", "demo", "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "--trace" in help_text


def _python_out(code: str) -> str:
    """What ``code`` prints when run by this interpreter in a fresh process, stripped."""
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()


def test_core_imports_no_engine():
    code = (
        "import sys, eplb_plugin, eplb_plugin.cli.main\n"
        "bad = [m for m in ('vllm', 'sglang', 'transformers', 'deep_ep') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    assert _python_out(code) == ""


@pytest.mark.parametrize(
    "group, value",
    [
        ("vllm.general_plugins", "eplb_plugin.integrations.vllm:register"),
        ("sglang.srt.plugins", "eplb_plugin.integrations.sglang:register"),
    ],
)
def test_engine_plugin_entry_points_installed_and_inert(group, value):
    # The engines call these in every process: without the launchers' environment they must
    # do nothing and import no engine.
    code = (
        "import os, sys, importlib.metadata as md\n"
        "for k in [k for k in os.environ if k.startswith('EPLB_')]: del os.environ[k]\n"
        f"(ep,) = [e for e in md.entry_points(group={group!r}) if e.value == {value!r}]\n"
        "assert ep.dist.name == 'eplb-plugin', ep.dist.name\n"
        "ep.load()()\n"
        "print(','.join(m for m in ('vllm', 'sglang', 'deep_ep') if m in sys.modules))\n"
    )
    assert _python_out(code) == ""


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("Run the tests", 1)[1]
    command = section.split("```bash\n", 1)[1].split("\n```", 1)[0].strip()
    ci_lines = (ROOT / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()
    assert ci_lines[-1] == command
