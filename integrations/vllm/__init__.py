"""vLLM integration of eplb-plugin, installed as ``eplb_plugin.integrations.vllm``.

Switched on by environment variables that the launcher (``eplb vllm serve MODEL ...``) sets,
so that every vLLM process (API server, engine core, workers) sees the same settings: the
**plugin balancer** (``--enable-eplb``: this project's Balancer runs inside each vLLM worker,
vLLM's own EPLB stays off) or the **policy swap** (``--eplb-policy-only``: vLLM's own EPLB
places experts with an eplb-plugin policy). ``register`` is the ``vllm.general_plugins``
entry point. What is vLLM-specific: :mod:`.patches` (the only module that patches vLLM),
:mod:`.model` (its MoE layers), :mod:`.runtime` (slots added after loading), :mod:`.policy`,
:mod:`.launcher`; the rest is :mod:`eplb_plugin.integrations.common`.
"""

from .plugin import *  # noqa: F403 - the package's API is the plugin switch
from .plugin import __all__  # noqa: F401
