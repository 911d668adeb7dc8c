"""SGLang integration of eplb-plugin, installed as ``eplb_plugin.integrations.sglang``.

Switched on by environment variables that the launcher (``eplb sglang launch_server
--model-path M ...``) sets, so that every SGLang process sees the same settings
(docs/sglang.md): the **plugin balancer** (this project's Balancer in each SGLang model
runner, counts from SGLang's recorder hooks, SGLang's own EPLB off) or the **policy swap**
(SGLang's own EPLB places experts with an eplb-plugin policy). :func:`register` is the
``sglang.srt.plugins`` entry point. What is SGLang-specific: :mod:`.patches` (the only module
that patches SGLang), :mod:`.runtime` (dispatch info, recorder shim), :mod:`.policy`,
:mod:`.launch`; the rest is :mod:`eplb_plugin.integrations.common`. SGLang's layout and
statistics files are read and written by :mod:`eplb_plugin.formats`.
"""

from .plugin import *  # noqa: F403 - the package's API is the plugin switch
from .plugin import __all__  # noqa: F401
