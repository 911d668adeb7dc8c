"""Device kernels of eplb-plugin, installed as ``eplb_plugin.kernels``.

Each op has a Triton kernel and a plain torch reference (``reference.py``); the torch path
is used wherever Triton cannot run. Kernels depend on nothing in the core but tensors.
"""
