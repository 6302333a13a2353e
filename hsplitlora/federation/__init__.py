"""The federation, once, for the simulation, the server and every device.

- `protocol`: routes, headers, settings, the tensors of a step, an upload and an update, their checks;
- `manifest`: the contract of an exported device segment (export writes it, server and SDK read it);
- `strategies`: one module per method (HSplitLoRA and its baselines): what it adapts, how it plans
  splits and ranks, which aggregator it uses and whether the update is merged into W;
- `round`: closing a round from the clients' adapters (aggregate, merge or keep a global adapter,
  fold in the importance scores), which `hsplitlora.simulate` and the server both call.
"""
