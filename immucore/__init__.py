"""immucore: a verifiable, append-only key-value database compatible with immudb."""
from .errors import (CorruptedDataError, DatabaseClosedError, IllegalArgumentsError,  # noqa: F401
                     ImmucoreError, IndexFailedError, IndexTimeoutError, InvalidRevisionError,
                     KeyNotFoundError, NotReplicaError, ReadOnlyReplicaError,
                     ReplicaDivergedError, TxAlreadyCommittedError, TxNotFoundError,
                     VerificationError)
from .types import (DualProof, Entry, InclusionProof, KVMetadata, LinearProof, State,  # noqa: F401
                    Tx, TxEntry, TxHeader, VerifiableEntry, VerifiableTx)

from .client import AsyncClient, Client, StateStore  # noqa: F401,E402  (after the types it uses)

from .version import VERSION as __version__  # noqa: E402  (the package metadata)
