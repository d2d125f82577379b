"""``python -m immucore``: run a node (the same as the ``immucore`` command)."""
import sys

from .cli.node import main

sys.exit(main())
