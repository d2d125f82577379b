"""immucore's exceptions. Messages keep immudb's texts so people and tools recognise them."""


class ImmucoreError(Exception):
    """Base class of every error immucore raises on purpose."""


class IllegalArgumentsError(ImmucoreError, ValueError):
    """Bad input: malformed export blob, a limit exceeded, a missing parameter."""

    def __init__(self, detail: str):
        super().__init__(f"illegal arguments: {detail}")


class CorruptedDataError(ImmucoreError):
    """Stored data does not hash to what the chain says it should."""


class ProtocolError(ImmucoreError):
    """A frame or request that breaks the wire protocol; ``code`` is machine-readable.

    Defined here, not in immucore/protocol/frames.py, so the pure and the native frame codec
    raise the very same class."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class KeyNotFoundError(ImmucoreError, KeyError):
    def __init__(self, message: str = "key not found"):
        super().__init__(message)

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class InvalidRevisionError(ImmucoreError, LookupError):
    """A read at a revision the key does not have (past its newest, or before its first)."""

    def __init__(self, message: str = "invalid key revision number"):
        super().__init__(message)


class TxNotFoundError(ImmucoreError, LookupError):
    def __init__(self, message: str = "tx not found"):
        super().__init__(message)


class ReadOnlyReplicaError(ImmucoreError):
    def __init__(self, message: str = "database is read-only because it's a replica"):
        super().__init__(message)


class NotReplicaError(ImmucoreError):
    def __init__(self, message: str = "database is NOT a replica"):
        super().__init__(message)


class TxAlreadyCommittedError(ImmucoreError):
    """Raised only where a caller asked to be told; replicate_tx treats it as a no-op."""

    def __init__(self, message: str = "tx already committed"):
        super().__init__(message)


class ReplicaDivergedError(ImmucoreError):
    """The replica already holds a transaction with this id but a different Alh."""


class ReplicationLoopError(ImmucoreError):
    """A replica would follow itself, directly or through other replicas."""


class VerificationError(ImmucoreError):
    """A proof or a hash did not verify."""


class IndexTimeoutError(ImmucoreError, TimeoutError):
    """A read waited longer than allowed for the key index to cover the tx it needs."""


class IndexFailedError(ImmucoreError):
    """The database's key index stopped for good (its index worker kept dying): reads that
    need it fail at once with the cause, until the database is loaded again."""


class DatabaseClosedError(ImmucoreError):
    def __init__(self, message: str = "database is closed"):
        super().__init__(message)


class FolderInUseError(ImmucoreError):
    """A data or database folder another process (or another opening) holds: never shared."""
