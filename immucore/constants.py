"""Every limit immucore enforces, with its reason, in one place.

Names end with their unit or ``_max``; the relationships between them are checked at import so a
bad edit fails loudly instead of producing a database that cannot replicate.
"""

# --- immudb format (docs/immudb-format.md §2) ------------------------------------------------------
DIGEST_SIZE = 32
HEADER_VERSION_MAX = 1            # tx header versions 0 and 1 exist; 1 is written by default
HEADER_VERSION_DEFAULT = 1
KV_METADATA_SIZE_MAX = 11         # deleted (1) + expiresAt (1+8) + nonIndexable (1)
TX_METADATA_SIZE_MAX = 268        # truncation attr (1+8) + extra attr (1+2+256)
HEADER_V0_SIZE = 124
HEADER_V1_SIZE_MIN = 128          # plus the tx metadata length
EXPORT_TRAILER_SIZE = 3           # u16 trailer length (=1) + u8 truncated flag

# --- per-transaction limits (immudb defaults for server databases) --------------------------------
TX_ENTRIES_MAX = 1024             # immudb MaxTxEntries
KEY_SIZE_BYTES_MAX = 1024         # immudb MaxKeyLen, counted on the stored (prefixed) key
VALUE_SIZE_BYTES_MAX = 32 << 20   # immudb server MaxValueLen (32 MiB), counted on the stored value
# The values of one tx together: every committed tx must fit one frame when a replica exports it
# (there is no chunked transfer), so a bigger one is refused when written, not found stuck later.
TX_VALUES_BYTES_MAX = 60 << 20

# --- storage -----------------------------------------------------------------------------------
# LMDB keys are limited to 511 bytes (MDB_MAXKEYSIZE in py-lmdb's bundled build). The key index
# keeps stored keys of up to INDEX_KEY_UNFOLDED_BYTES_MAX bytes as they are and folds longer ones
# to their first INDEX_KEY_UNFOLDED_BYTES_MAX bytes + SHA-256, so a folded key is always longer
# than any unfolded one and the two can never collide (docs/storage.md).
INDEX_KEY_SIZE_BYTES_MAX = 480
INDEX_KEY_UNFOLDED_BYTES_MAX = INDEX_KEY_SIZE_BYTES_MAX - DIGEST_SIZE
# An index row holds where its entry starts in the tx record (u32), so a get reads one entry
# instead of walking them all; this value means "walk": the record's values are truncated (a
# replica of a truncating primary) or the entry starts past 4 GiB.
INDEX_ENTRY_OFFSET_UNKNOWN = 0xFFFFFFFF
MAP_SIZE_BYTES_INITIAL = 64 << 20     # LMDB map; grows by doubling on MapFullError
MAP_SIZE_BYTES_MAX = 1 << 40          # 1 TiB of address space: a bound on growth, not a reservation
STORAGE_FREE_BYTES_LOW = 1 << 30        # a failed commit with less free space than this is
                                         # reported as "storage full", not as an I/O error
# Group commit: how much the writer thread takes from its queue for one LMDB transaction/fsync.
COMMIT_BATCH_TXS_MAX = 4096
COMMIT_BATCH_BYTES_MAX = 64 << 20
WRITE_QUEUE_TXS_MAX = 65536           # queued write requests; beyond it callers wait (embedded) or get a busy error (node)
COMMIT_PIPELINE_BATCHES = 4           # sealed batches waiting for their fsync (writer pipeline)
# The asynchronous key indexer: entries per LMDB transaction of the index environment. Larger
# batches amortise random B-tree inserts (docs/storage.md), but LMDB keeps every page a write
# transaction dirties in memory until its commit: up to one 4 KiB page per entry. Measured on a
# replica catching up 200,000 txs: 50,000 -> 168 MB own memory, index 272,000 entries/s;
# 100,000 -> 221 MB, 461,000/s; 200,000 -> 270 MB, 508,000/s.
INDEX_BATCH_ENTRIES_MAX = 50_000         # bounds the dirty pages LMDB holds in memory per commit
# With no read waiting for it, the indexer lets commits gather this long (or up to this many txs)
# before a step: each step costs two LMDB transactions and its Python, so one-tx steps under a
# stream of small commits cost more CPU (and GIL) than the writes they index.
INDEX_GATHER_SECONDS = 0.01
INDEX_GATHER_TXS_MAX = 2_000
INDEX_THREAD_NICE = 10               # the indexer thread's nice value (Linux: per thread)
INDEX_WAIT_SECONDS_DEFAULT = 30.0     # a read waiting for the index gives up after this long
# An index worker process that exits more than INDEX_WORKER_RESTARTS_MAX times within
# INDEX_WORKER_RESTART_WINDOW_SECONDS is not started again: its database's index is put in an
# error state (reads fail at once naming the cause; `database list`, /metrics and the log show
# the worker's last stderr line) until the database is loaded again. Restarting for ever burns
# CPU and leaves every read waiting INDEX_WAIT_SECONDS_DEFAULT for an index that never comes;
# five restarts (about 3 s of backoff) ride out a passing failure such as a worker killed once.
INDEX_WORKER_RESTARTS_MAX = 5
INDEX_WORKER_RESTART_WINDOW_SECONDS = 60.0
# Of a worker's last stderr line, kept for that error state (database list, the log).
INDEX_WORKER_STDERR_LINE_CHARS_MAX = 1000
# Of that line in /metrics' error label: a label value is a time series' identity, so it stays
# short (one failed series per database at a time; the whole line is in database list).
METRICS_ERROR_LABEL_CHARS_MAX = 200
# Replication apply: txs and bytes per replicate_txs call (one LMDB transaction).
REPLICATE_BATCH_TXS_MAX = 10_000
REPLICATE_BATCH_BYTES_MAX = 256 << 20
# One process per data folder (and per database folder): a node that finds its folder's lock
# held waits this long for the holder to end (a restart overlapping the old process's graceful
# stop: it closes every database and index worker first, seconds at most), then refuses to
# start, naming the folder and the holder's pid. Two processes on one set of LMDB files would
# each run their own writer and index: a stale state, every write failing.
FOLDER_LOCK_WAIT_SECONDS = 10.0
FOLDER_LOCK_POLL_SECONDS = 0.1       # how often the waiting start tries the lock again



def _check(ok: bool, why: str) -> None:
    # A real exception rather than assert: these must hold under ``python -O`` too.
    if not ok:
        raise RuntimeError(f"immucore.constants: {why}")


_check(HEADER_V1_SIZE_MIN == HEADER_V0_SIZE + 4, "v1 header = v0 + mdLen u16 + u32 count")
_check(INDEX_KEY_SIZE_BYTES_MAX <= 511, "an index key, folded or not, must fit LMDB's 511 bytes")
_check(KEY_SIZE_BYTES_MAX < 1 << 16 and VALUE_SIZE_BYTES_MAX < 1 << 32, "u16/u32 length fields")
_check(TX_ENTRIES_MAX < 1 << 16, "entry count must fit a v0 header's u16")
_check(COMMIT_BATCH_TXS_MAX <= WRITE_QUEUE_TXS_MAX, "a commit batch comes from the write queue")
SCAN_RESULTS_MAX = 1000              # immudb MaxResultSize: entries returned by one scan/history

# --- wire protocol (docs/wire-protocol.md) ------------------------------------------------------
FRAME_MAGIC = b"IMC1"
PROTOCOL_VERSION = 1
FRAME_HEADER_SIZE = 40
FRAME_BODY_BYTES_MAX = 64 << 20          # any frame after login; a replicate batch sent over
                                         # the wire is therefore smaller than this
PREAUTH_FRAME_BODY_BYTES_MAX = 16 << 10  # before login: health, server info and login only
CONNECTION_INFLIGHT_REQUESTS_MAX = 128   # pipelined requests being served per connection
CONNECTION_SEND_BUFFER_BYTES_MAX = 64 << 20   # unread responses before a connection is paused
CONNECTION_FLUSH_ANSWERS = 32   # answers gathered in one loop turn before they are sent at once
CONNECTION_IDLE_SECONDS = 600            # a connection with no frame for this long is closed
PREAUTH_IDLE_SECONDS = 10                # ... and before login, much sooner
# A peer that stopped reading: its unread answers passed CONNECTION_SEND_BUFFER_BYTES_MAX (the
# connection stopped reading its requests) and did not drain for this long. It is aborted,
# dropping what was buffered; close() would wait for the peer to read it, which may be never.
CONNECTION_WRITE_STALL_SECONDS = 60
SESSIONS_MAX_DEFAULT = 100               # immudb --max-sessions
# Databases loaded at once, systemdb aside (--max-active-databases, immudb's flag name): each costs
# an index worker process (~20-24 MB of RSS, measured with tests/test_many_databases.py), ~3 node
# threads and ~9 open files, so without a bound a tool creating replicas of many databases could
# exhaust the machine's memory. 100 is ~2.4 GB of workers, what a small VM holds beside the data's
# page cache. Past it a create or load is refused, naming the flag; nothing is closed to make room.
DATABASES_ACTIVE_MAX_DEFAULT = 100
# Open connections (--max-connections); a new one past it gets `too_many_connections` and is
# closed, like Redis' maxclients. Of them, a quarter (at most PREAUTH_CONNECTIONS_MAX) may be
# waiting to log in: a flood of idle connections cannot take logged-in users' connections (new
# logins are refused while it lasts; each idle one is closed after PREAUTH_IDLE_SECONDS).
CONNECTIONS_MAX_DEFAULT = 4096
PREAUTH_CONNECTIONS_MAX = 1024
SESSION_INACTIVITY_SECONDS = 180         # immudb max-session-inactivity-time (3 min)
TOKEN_SESSION_INACTIVITY_SECONDS = 24 * 3600   # CLI logins (immudb token-expiry-time 1440 min)
# A user's CLI tokens: one login more ends its oldest. --max-sessions counts tokens with the
# connections' sessions, and a token lasts a day: without this one user could hold them all.
TOKEN_SESSIONS_PER_USER_MAX = 8
CLIENT_TIMEOUT_SECONDS_DEFAULT = 30.0
# A long poll (EXPORT_TXS with wait_ms) is answered up to wait_ms later by design: its deadline
# is the client's timeout or the wait plus this, whichever is later (a 30 s timeout and a 30 s
# poll must not always time out; a replicator's 15 s timeout on its 10 s poll stays 15 s).
CLIENT_LONG_POLL_GRACE_SECONDS = 5.0
# A stopping node lets its in-flight requests answer (a sync write waiting for acks and a long
# poll: database_closed) before it closes their connections, waiting at most this long for
# them: a long stream is cut, not waited for.
NODE_STOP_ANSWERS_SECONDS_MAX = 5.0
EXPORT_TXS_COUNT_MAX = 10_000            # blobs in one EXPORT_TXS answer (also cut at half a frame)
# EXPORT_TXS_STREAM: a bulk export as a server stream, one frame per chunk of txs (each also cut
# at half a frame), every chunk read and its permission checked as the one before leaves.
EXPORT_STREAM_CHUNK_TXS = 1_000
# A client stops reading its connection while a stream it is given has this many items its
# caller has not taken yet: the node's send buffer then fills and it waits (flow control end
# to end), instead of the client holding a whole export in memory.
CLIENT_STREAM_ITEMS_BUFFERED_MAX = 4
EXPORT_WAIT_MS_MAX = 30_000              # longest long poll of a caught-up replica

# --- replication (docs/replication.md) -----------------------------------------------------------
REPLICATION_BATCH_TXS = 1000             # txs a replica asks for per EXPORT_TXS
REPLICATION_GRACE_SECONDS = 5.0          # a replica's request unanswered for the long poll plus
                                         # this is given up (a silent network): reconnect
REPLICATION_WAIT_MS = 10_000             # a caught-up replica's long poll
REPLICATION_BACKOFF_SECONDS_MIN = 0.5    # after a failure: capped exponential backoff with jitter
REPLICATION_BACKOFF_SECONDS_MAX = 30.0
REPLICATION_QUEUE_BATCHES = 2            # received batches waiting for the apply (one more is
REPLICATION_QUEUE_BYTES_MAX = 64 << 20   # being applied and one fetched): bounds replica memory
REPLICA_ID_CHARS_MAX = 256              # a replica's name in its acknowledgements
# The database ids an EXPORT_TXS answer names (the database, then the primaries it follows,
# nearest first): enough for any real chain of replicas, and a bound on an answer a loop or a
# hostile primary could otherwise grow; a loop is found within this many hops.
REPLICATION_CHAIN_IDS_MAX = 32
REPLICAS_TRACKED_MAX = 64                # replicas whose acks a sync primary remembers per db
REPLICATION_SYNC_TIMEOUT_SECONDS = 10.0  # a sync commit not held by enough replicas by then fails

_check(REPLICATION_BATCH_TXS <= EXPORT_TXS_COUNT_MAX, "a replica never asks for more than is sent")
_check(FRAME_BODY_BYTES_MAX >= 1 << 20 and PREAUTH_FRAME_BODY_BYTES_MAX < FRAME_BODY_BYTES_MAX,
       "pre-auth frames must be smaller than authenticated ones")
# The largest tx's export blob: its values, every key and metadata at their maximum, each entry's
# lengths (8 bytes; 16 counted), the header with its metadata. A replica refuses a longer blob (it
# could not pass it on); the answer's map around one must still fit a frame.
TX_EXPORT_BLOB_BYTES_MAX = (TX_VALUES_BYTES_MAX
                            + TX_ENTRIES_MAX * (KEY_SIZE_BYTES_MAX + KV_METADATA_SIZE_MAX + 16)
                            + HEADER_V1_SIZE_MIN + TX_METADATA_SIZE_MAX + 64)
_check(TX_EXPORT_BLOB_BYTES_MAX + 4096 <= FRAME_BODY_BYTES_MAX,
       "every tx a database accepts must fit one export answer")

# --- immudb's gRPC API (docs/grpc.md) ------------------------------------------------------------
# What ServerInfo and Health report: the immudb release whose API (schema.proto) this serves;
# immudb's clients compare versions, and immucore's own 0.x would read as an ancient immudb.
IMMUDB_COMPATIBLE_VERSION = "1.11.1"
GRPC_REQUEST_BYTES_MAX = 32 << 20        # immudb's default max receive message size (32 MiB);
                                         # a bigger request is refused by gRPC before decoding
GRPC_RESPONSE_BYTES_MAX = FRAME_BODY_BYTES_MAX   # as a native answer: a 32 MiB value and its proof
# RPCs being served at once, all connections together; one more is refused with
# RESOURCE_EXHAUSTED instead of queueing without bound
GRPC_CONCURRENT_RPCS_MAX = 4096
# gRPC login tokens (Login/UseDatabase, immudb's token-expiry-time: a day): a token per SDK
# client, so many more than a user's CLI tokens; one login more than the per-user cap ends that
# user's oldest token, so a script logging in on every run can not crowd others out.
GRPC_TOKENS_MAX = 4096
GRPC_TOKENS_PER_USER_MAX = 256
_check(GRPC_REQUEST_BYTES_MAX <= FRAME_BODY_BYTES_MAX, "a gRPC request fits what a frame may hold")

# --- immuclient audit-mode (docs/audit.md) ------------------------------------------------------
AUDIT_INTERVAL_SECONDS_MIN = 0.1        # a shorter --audit-interval would spin on the node;
                                        # tests use 0.2 s, operators immudb's 60 s
AUDIT_ROUNDS_MAX = 1 << 31              # --audit-rounds above this is a typo, not a plan
AUDIT_CALL_TIMEOUT_SECONDS = 10.0       # one unanswered call fails the round (an error, -2),
                                        # instead of stalling every later round behind it
AUDIT_HEALTH_TIMEOUT_SECONDS = 2.0      # /livez, /readyz: a probe must answer quickly
AUDIT_DATABASES_MAX = 10_000            # databases audited a round; more is refused by name,
                                        # before any state is fetched
# --- gRPC on the native port (server/shared_port.py, docs/grpc.md "One port") --------------------
# A splice's bytes buffered toward one side before it stops reading the other: HTTP/2's own
# windows (64 KiB by default per stream) keep it far below this, the cap is for a peer that
# ignores them. A spliced connection counts against --max-connections; before its first bytes
# arrive it is a connection waiting to log in (PREAUTH_CONNECTIONS_MAX, PREAUTH_IDLE_SECONDS).
SPLICE_BUFFER_BYTES_MAX = 1 << 20
# A gRPC connection with no call for this long is closed (GOAWAY; immudb's SDKs reconnect), as a
# native one is after CONNECTION_IDLE_SECONDS: idle channels must not hold connection slots.
GRPC_CONNECTION_IDLE_SECONDS = CONNECTION_IDLE_SECONDS
# --- immudb's chunked streams over gRPC (streamGet/Set/Scan/History/VerifiableGet/Set) --------
# A streamed key or value travels as a "message": a u64 big-endian length, then its bytes, cut
# into Chunk messages. The node sends chunks of immudb's default stream chunk size (64 KiB,
# pkg/stream DefaultChunkSize); immudb's SDKs read a key or a proof from one chunk, so a chunk
# must hold at least a whole key message.
GRPC_STREAM_CHUNK_BYTES = 64 << 10
_check(GRPC_STREAM_CHUNK_BYTES >= 8 + KEY_SIZE_BYTES_MAX, "a key message fits one streamed chunk")
# values of one streamed set together (immudb's MaxTxValueLen, 32 MiB); one more byte is
# immudb's "max transaction values length exceeded", checked on each value's declared length
# before its bytes are gathered
GRPC_STREAM_VALUES_BYTES_MAX = 32 << 20
# a key message's declared length, checked before it is gathered (the database then checks
# the stored key against its own maxKeyLen)
GRPC_STREAM_KEY_BYTES_MAX = KEY_SIZE_BYTES_MAX
# key/value pairs in one streamed set: one tx's entries at most
GRPC_STREAM_ENTRIES_MAX = TX_ENTRIES_MAX
# chunks in one streamed request: a 32 MiB value cut into 128-byte chunks still fits; bounds
# the work a stream of empty or tiny chunks can make the node do
GRPC_STREAM_CHUNKS_MAX = 1 << 18
# keys in one GetAll: as many as one scan answers (immudb's MaxResultSize); the values read are
# bounded again by GRPC_RESPONSE_BYTES_MAX before the answer is sent
GRPC_GET_ALL_KEYS_MAX = SCAN_RESULTS_MAX
# bytes all streamed sets being gathered at once may declare, node-wide: without it every
# call of GRPC_CONCURRENT_RPCS_MAX could gather 32 MiB; one more is refused with
# RESOURCE_EXHAUSTED, before its bytes are gathered
GRPC_STREAMS_GATHERED_BYTES_MAX = 256 << 20
_check(GRPC_STREAMS_GATHERED_BYTES_MAX >= GRPC_STREAM_VALUES_BYTES_MAX,
       "one streamed set of the largest values fits what all may gather")
# --- replication over gRPC (exportTx, replicateTx, streamExportTx; docs/replication.md) ---------
# A replicated tx's export is sent as chunks of GRPC_STREAM_CHUNK_BYTES (the streams part's,
# immudb's DefaultChunkSize); the first chunk of a message holds its u64 length too.
# A chunked message received (a replicateTx upload, an exported tx on a gRPC replica) is at most
# one tx's export: its announced length is checked against this before anything is allocated.
GRPC_CHUNKED_MESSAGE_BYTES_MAX = TX_EXPORT_BLOB_BYTES_MAX
# An ExportTxRequest carrying a ReplicaState (a replica that acknowledges) for a tx not yet
# committed waits this long for it, then is answered with no tx and the primary's state
# (immudb waits 4 sync periods): a caught-up replica hears of a commit as it happens.
GRPC_EXPORT_WAIT_MS = 2_000
# ExportTxRequests a gRPC replica keeps in flight on its streamExportTx stream while catching up
# (one tx per request in immudb's protocol): enough to hide the round trip, and a bound on what
# it holds in memory before handing the batch to the machine.
GRPC_REPLICATION_PIPELINE_TXS = 256
# A gRPC replica without a ReplicaState (an immudb primary without sync replication answers
# "no new transactions" at once) asks again after this while caught up.
GRPC_REPLICATION_POLL_SECONDS = 0.1
_check(4096 <= GRPC_STREAM_CHUNK_BYTES <= GRPC_REQUEST_BYTES_MAX,
       "a chunk is at least immudb's MinChunkSize and fits one gRPC message")
_check(GRPC_REPLICATION_PIPELINE_TXS <= REPLICATION_BATCH_TXS,
       "a gRPC replica's pipeline is one machine batch at most")
# --- hot backup and hot restore (docs/backup.md) --------------------------------------------------
# A record's checksum is the tx's Alh: a SHA-256 digest, never any other length. A record whose
# checksum length differs is refused before anything is read into memory.
BACKUP_CHECKSUM_BYTES = 32
# A record's content is the tx's export blob behind its u64 length (what immudb's ExportTx stream
# carries): never longer than the longest blob a database accepts, so a forged length can not make
# the reader allocate more than one real tx would need.
BACKUP_CONTENT_BYTES_MAX = 8 + TX_EXPORT_BLOB_BYTES_MAX
# hot-restore applies the file in batches of up to this many txs (one REPLICATE_TX, one LMDB
# transaction, all or nothing): a kill -9 leaves the target at the end of a verified batch.
BACKUP_RESTORE_BATCH_TXS = 1000
# ...and of at most this many bytes, so a batch's request stays well inside one frame (a batch
# holds at least one tx: a bigger one goes alone, and still fits a frame, TX_EXPORT_BLOB_BYTES_MAX).
BACKUP_RESTORE_BATCH_BYTES_MAX = FRAME_BODY_BYTES_MAX // 2
# Batches sent before the first is answered: the node verifies the next while it fsyncs one
# (its writer's pipeline), in the order sent; each is still verified whole before it is applied.
BACKUP_RESTORE_BATCHES_IN_FLIGHT = 2
# The file is read and written through buffers of this size (fewer system calls per tx).
BACKUP_FILE_BUFFER_BYTES = 1 << 20
_check(BACKUP_RESTORE_BATCH_TXS <= REPLICATE_BATCH_TXS_MAX
       and BACKUP_RESTORE_BATCH_BYTES_MAX <= REPLICATE_BATCH_BYTES_MAX,
       "a restore batch is one the replicate path takes")
