"""What every engine integration shares, installed as ``eplb_plugin.integrations.common``.

An engine adapter (``integrations/vllm``, ``integrations/sglang``) supplies only what is
specific to its engine: which classes to patch, how to find the MoE layers, their expert
tensors and the EP group, and how to launch. The rest lives here:

- :mod:`.runtime`: :class:`~.runtime.EngineRuntime`, the Balancer of one engine process
  wired to its MoE layers (slot-count rule, topology, device scalars, step, summary, close);
- :mod:`.ops`: the routing custom op ``torch.ops.eplb_plugin.map_and_count`` around
  :class:`eplb_plugin.routing.Router`;
- :mod:`.plugin`: environment/JSON configuration by prefix and the process-wide switch
  (balancer on, policy swap, off);
- :mod:`.hooks`: post-import patching, patch marks, supported-version checks.

Nothing here imports an engine.
"""
