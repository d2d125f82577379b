"""Fault injection for tests (issue 5): ``proxy.FaultProxy`` breaks the network between nodes."""
