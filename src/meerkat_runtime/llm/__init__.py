"""Model providers behind one small protocol (``Model.complete``).

This build ships only the deterministic, network-free ``OfflineModel``; streaming and network
providers plug in behind the same request/response types.
"""
