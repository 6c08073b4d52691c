"""Failover on PostgreSQL with real ``meerkat worker`` processes: a worker killed, stopped
(fenced) and cut off from the database while its sessions have runs in flight (S6, S7, S10)."""
