"""The runtime control plane: inputs, policy, the input state machine, the per-session driver
and its loop. It reaches core only through the ``CoreExecutor`` protocol."""
