"""The ways in: REST (``rest.py``), JSON-RPC over stdio (``rpc.py``), sharing ``common.py``."""
