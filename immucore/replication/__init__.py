"""Replication: a replica database pulls committed transactions from its primary."""
