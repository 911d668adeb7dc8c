"""eplb-plugin: expert-parallel load balancing for MoE serving engines.

`kernels/` and `integrations/` sit at the repository root but are installed as
`eplb_plugin.kernels` and `eplb_plugin.integrations`: top-level packages of those
names exist on PyPI (Hugging Face's `kernels` among them) and must never be clobbered.
"""

from setuptools import setup

_SUBPACKAGES = {
    "eplb_plugin.kernels": "kernels",
    "eplb_plugin.integrations": "integrations",
}
# examples/ (real routing traces, a load trace) ships inside the wheel as data, so that
# `eplb demo` from a plain `pip install .` replays the same real trace as from a clone.
_DATA_PACKAGES = {"eplb_plugin.examples": "examples"}


def _find(root: str, prefix: str) -> dict[str, str]:
    """Map every package below `root` (a folder with __init__.py) to its folder."""
    import os

    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        if "__init__.py" in filenames:
            rel = os.path.relpath(dirpath, root)
            name = prefix if rel == "." else prefix + "." + rel.replace(os.sep, ".")
            found[name] = dirpath
    return found


package_dir = {"eplb_plugin": "eplb_plugin"}
package_dir.update(_find("eplb_plugin", "eplb_plugin"))
for pkg, folder in _SUBPACKAGES.items():
    package_dir.update(_find(folder, pkg))
package_dir.update(_DATA_PACKAGES)

setup(
    name="eplb-plugin",
    version="0.1.0",
    description="Expert-parallel load balancer for MoE serving (vLLM, SGLang, transformers)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=sorted(package_dir),
    package_dir=package_dir,
    package_data={"eplb_plugin.examples": ["*.md", "*.npy", "traces/*.npz", "traces/*.md"]},
    install_requires=[
        "torch>=2.4",
        "numpy",
        "safetensors>=0.4",
        "tqdm",
        "triton>=3.0; platform_system == 'Linux'",
        "transformers>=5,<6",
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-timeout", "ruff"],
        "plot": ["matplotlib"],
    },
    # The engine plugins do nothing unless the launchers' environment variables ask for it
    # (eplb vllm ... / eplb sglang ...), so installing them beside an engine changes nothing.
    entry_points={
        "console_scripts": ["eplb = eplb_plugin.cli.main:main"],
        "vllm.general_plugins": ["eplb_plugin = eplb_plugin.integrations.vllm:register"],
        "sglang.srt.plugins": ["eplb_plugin = eplb_plugin.integrations.sglang:register"],
    },
)
