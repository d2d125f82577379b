"""Command-line tools: ``immucore`` (the node), ``immuadmin`` and ``immuclient``."""
