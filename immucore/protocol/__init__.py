"""The wire protocol: frames (``frames``), the message table (``messages``) and its errors."""
