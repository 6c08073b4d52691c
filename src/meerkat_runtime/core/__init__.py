"""The agent core: lifecycle contracts, conversations and the built-in agent.

Core knows nothing of inputs, policy, queues or peers: it sees run primitives and control
commands only (ARCHITECTURE.md).
"""
