"""Engine integrations of eplb-plugin, installed as ``eplb_plugin.integrations``.

One sub-package per engine; each imports its engine lazily, inside functions, so that
importing eplb_plugin never imports an engine.
"""
