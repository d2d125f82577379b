"""The node: databases, users and permissions, sessions, and the network server."""
