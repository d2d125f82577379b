# Records (export blob || hvalue of every entry || alh) and the key index.

cdef Limits _RECORD_LIMITS = load_limits((1 << 32, 1 << 16, 1 << 32))


cdef int64_t entry_count_of(const uchar* p, Py_ssize_t size) except -1:
    """The entry count in a record's header, at its fixed offsets (after the u32 hdrLen)."""
    cdef Py_ssize_t md_len
    if size < 4 + 52:
        raise CorruptedDataError("data is corrupted: record too short")
    if get_u16(p + 4 + 48) == 0:
        return get_u16(p + 4 + 50)
    md_len = get_u16(p + 4 + 50)
    if size < 4 + 56 + md_len:
        raise CorruptedDataError("data is corrupted: record too short")
    return get_u32(p + 4 + 52 + md_len)


def record_entry_count(record):
    """The entry count in a record's header, read at its fixed offsets (no parse)."""
    cdef InBuf b
    inbuf_get(record, &b)
    try:
        return entry_count_of(b.p, b.n)
    finally:
        inbuf_release(&b)


cdef Py_ssize_t record_blob_len(const uchar* p, Py_ssize_t size) except -1:
    """Where a record's export blob ends: the record is blob || 32 * nentries || 32.

    A record too short to hold its counts, or shorter than its entry count's hashes, is corrupt.
    """
    cdef uint64_t nentries = <uint64_t>entry_count_of(p, size)
    cdef Py_ssize_t blob_len
    blob_len = size - <Py_ssize_t>(DIGEST * (nentries + 1))
    if blob_len < 0:
        raise CorruptedDataError("data is corrupted: record too short")
    return blob_len


cdef int parse_record(const uchar* p, Py_ssize_t size, Header* h, EntBuf* ents,
                      bint* truncated, Py_ssize_t checked_entry=-1) except -1:
    """Parse a record's blob with the record limits (every count and length still checked).
    Duplicate keys were refused when the tx was written; reads do not sort its keys again.
    ``checked_entry`` >= 0: limits and metadata of that entry only (a read of one entry)."""
    parse_blob(p, record_blob_len(p, size), _RECORD_LIMITS, h, ents, truncated, False,
               checked_entry)
    return 0


cdef inline tuple entry_tuple(const Ent* e, bint truncated, const uchar* hvalue):
    return (slice_bytes(e.key, e.key_len), slice_bytes(e.md, e.md_len),
            None if truncated else slice_bytes(e.value, e.value_len), digest_bytes(hvalue))


def record_export_blob(record):
    cdef InBuf b
    inbuf_get(record, &b)
    try:
        return PyBytes_FromStringAndSize(<const char*>b.p, record_blob_len(b.p, b.n))
    finally:
        inbuf_release(&b)


def record_alh(record):
    cdef InBuf b
    cdef Py_ssize_t start
    inbuf_get(record, &b)
    try:
        start = b.n - DIGEST if b.n > DIGEST else 0
        return PyBytes_FromStringAndSize(<const char*>b.p + start, b.n - start)
    finally:
        inbuf_release(&b)


def decode_record(record):
    """(header, alh, [(stored_key, md, value or None if truncated, hvalue)])."""
    cdef InBuf b
    cdef Header h
    cdef EntBuf ents
    cdef bint truncated
    cdef Py_ssize_t i, n
    cdef const uchar* hvalues
    cdef list out
    ents_init(&ents)
    inbuf_get(record, &b)
    try:
        parse_record(b.p, b.n, &h, &ents, &truncated)
        n = ents.count
        hvalues = b.p + b.n - (n + 1) * DIGEST
        out = [None] * n
        for i in range(n):
            out[i] = entry_tuple(&ents.items[i], truncated, hvalues + i * DIGEST)
        return header_tuple(&h), digest_bytes(hvalues + n * DIGEST), out
    finally:
        inbuf_release(&b)
        ents_free(&ents)


def record_entry(record, index):
    """One entry of a record: (stored_key, md, value or None, hvalue). Every entry's lengths
    are checked, but limits and metadata only the wanted entry's, as the pure codec's
    ``checked_entry``: the whole tx was checked when it was written."""
    cdef InBuf b
    cdef Header h
    cdef EntBuf ents
    cdef bint truncated
    # an index out of range checks no entry, then fails below (as the pure codec's slice)
    cdef Py_ssize_t want = index if 0 <= index < 0x100000000 else 0x100000000
    ents_init(&ents)
    inbuf_get(record, &b)
    try:
        parse_record(b.p, b.n, &h, &ents, &truncated, want)
        if not 0 <= want < ents.count:
            raise CorruptedDataError("data is corrupted: entry index out of range")
        return entry_tuple(&ents.items[want], truncated,
                           b.p + b.n - (ents.count + 1 - want) * DIGEST)
    finally:
        inbuf_release(&b)
        ents_free(&ents)


def record_entry_at(record, index, offset):
    """``record_entry`` for an entry whose start the key index gave (``entry_offset``): one entry
    is read, not the whole record walked. The offset is checked to lie among the entries and the
    entry's lengths against what is left; the caller checks that the key is the one it wanted.
    ``ENTRY_OFFSET_UNKNOWN`` (truncated values, or a record past 4 GiB) walks the record."""
    cdef InBuf b
    cdef Header h
    cdef Ent e
    cdef Py_ssize_t size, hdr_len, want, at
    cdef bint deleted, has_expiry, non_indexable
    cdef uint64_t expires_at
    if offset == ENTRY_OFFSET_UNKNOWN:
        return record_entry(record, index)
    inbuf_get(record, &b)
    try:
        size = record_blob_len(b.p, b.n)
        hdr_len = get_u32(b.p) if size >= 4 else size
        if hdr_len > size - 4 or hdr_len > HEADER_V1_SIZE_MIN + TX_MD_MAX:
            raise CorruptedDataError("data is corrupted: record header length out of range")
        decode_header_into(b.p + 4, hdr_len, &h)
        if not 0 <= index < h.nentries:
            raise CorruptedDataError("data is corrupted: entry index out of range")
        if not 4 + hdr_len <= offset < size:
            raise CorruptedDataError("data is corrupted: entry offset out of range")
        want = index
        at = offset
        walk_entry(b.p, size, at, &e)
        check_entry(e.key_len, e.value_len, e.md_len, _RECORD_LIMITS)
        if h.version == 0 and e.md_len:
            raise IllegalArgumentsError("kv metadata is unsupported in tx header version 0")
        if e.md_len:
            parse_kv_md(e.md, e.md_len, &deleted, &has_expiry, &expires_at, &non_indexable)
        return entry_tuple(&e, False, b.p + size + want * DIGEST)
    finally:
        inbuf_release(&b)


cdef void digests_run(bint v0, const Ent* ents, Py_ssize_t n, const uchar* hvalues,
                      uchar* out) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        entry_digest_into(v0, ents[i].key, <size_t>ents[i].key_len, ents[i].md,
                          <size_t>ents[i].md_len, hvalues + i * DIGEST, DIGEST, out + i * DIGEST)


def record_digests(record):
    """Entry digests of a record, in tx order (for entry inclusion proofs)."""
    cdef InBuf b
    cdef Header h
    cdef EntBuf ents
    cdef bint truncated
    cdef Py_ssize_t i, n
    cdef const uchar* hvalues
    cdef uchar* digests = NULL
    cdef list out
    ents_init(&ents)
    inbuf_get(record, &b)
    try:
        parse_record(b.p, b.n, &h, &ents, &truncated)
        n = ents.count
        hvalues = b.p + b.n - (n + 1) * DIGEST
        digests = <uchar*>checked_malloc(n * DIGEST)
        if 3 * n >= NOGIL_BLOCKS_MIN:
            with nogil:
                digests_run(h.version == 0, ents.items, n, hvalues, digests)
        else:
            digests_run(h.version == 0, ents.items, n, hvalues, digests)
        out = [None] * n
        for i in range(n):
            out[i] = digest_bytes(digests + i * DIGEST)
        return out
    finally:
        PyMem_Free(digests)
        inbuf_release(&b)
        ents_free(&ents)


# --- the key index -------------------------------------------------------------------------------

cdef void fold_key(const uchar* key, Py_ssize_t n, uchar* out) noexcept nogil:
    """A long key's index key: its first 448 bytes then its SHA-256 (480 bytes), longer than any
    unfolded key, so the two kinds never collide."""
    memcpy(out, key, INDEX_KEY_UNFOLDED_MAX)
    sha256_into(key, <size_t>n, out + INDEX_KEY_UNFOLDED_MAX)


def index_key(stored_key):
    """The LMDB key under which a stored key is indexed (long keys are folded with their hash)."""
    cdef bytes k = as_bytes(stored_key)
    cdef bytes out
    if len(k) <= INDEX_KEY_UNFOLDED_MAX:
        return k
    out = new_bytes(INDEX_KEY_MAX)
    fold_key(bptr(k), len(k), wptr(out))
    return out


ctypedef struct IndexRow:
    uint64_t head               # the key's first 8 bytes, big-endian, zero-padded
    const uchar* key
    Py_ssize_t key_len
    Py_ssize_t folded_at        # offset in the folded-key buffer, or -1
    uint64_t tx_id
    unsigned int entry_index
    uint32_t entry_offset       # where the entry starts in its record, or ENTRY_OFFSET_UNKNOWN


cdef inline uint64_t key_head(const uchar* key, Py_ssize_t n) noexcept nogil:
    """Where two keys' heads differ, their order is the keys' bytes order (a zero pad sorts like
    the end of the shorter key); equal heads need the full compare."""
    cdef uint64_t head = 0
    cdef Py_ssize_t i
    for i in range(8):
        head = (head << 8) | (key[i] if i < n else 0)
    return head


cdef int index_row_cmp(const void* a, const void* b) noexcept nogil:
    """(index key, u64 tx_id || u16 entry_index) in bytes order, as Python sorts the row tuples."""
    cdef const IndexRow* x = <const IndexRow*>a
    cdef const IndexRow* y = <const IndexRow*>b
    if x.head != y.head:
        return -1 if x.head < y.head else 1
    cdef Py_ssize_t n = x.key_len if x.key_len < y.key_len else y.key_len
    cdef int c = memcmp(x.key, y.key, <size_t>n)
    if c:
        return c
    if x.key_len != y.key_len:
        return -1 if x.key_len < y.key_len else 1
    if x.tx_id != y.tx_id:
        return -1 if x.tx_id < y.tx_id else 1
    if x.entry_index != y.entry_index:
        return -1 if x.entry_index < y.entry_index else 1
    return 0


def index_items(first_tx_id, records):
    """Index rows for consecutive records, sorted:
    ``(index_key, u64 tx_id || u16 entry_index || u32 entry_offset)`` (layout.INDEX_ROW).

    Non-indexable entries are skipped; deleted ones are indexed. Rows are collected and sorted in
    C; Python objects are made only for the sorted result.
    """
    cdef list held = []
    cdef bytes b
    cdef Header h
    cdef EntBuf ents
    cdef bint truncated, deleted, has_expiry, non_indexable
    cdef uint64_t expires_at, first_c = 0, tx_id
    cdef bint first_ok = int_u64(first_tx_id, &first_c)
    cdef Py_ssize_t offset = 0, i, n_rows = 0, cap_rows = 0, fold_used = 0, fold_cap = 0
    cdef IndexRow* rows = NULL
    cdef IndexRow* row
    cdef uchar* folded = NULL
    cdef void* grown
    cdef const Ent* e
    cdef bint tx_id_checked
    cdef bytes value
    cdef uchar* v
    cdef list out
    ents_init(&ents)
    try:
        for record in records:
            b = as_bytes(record)
            held.append(b)
            ents.count = 0
            parse_record(bptr(b), len(b), &h, &ents, &truncated)
            tx_id_checked = False
            for i in range(ents.count):
                e = &ents.items[i]
                if e.md_len:
                    parse_kv_md(e.md, e.md_len, &deleted, &has_expiry, &expires_at,
                                &non_indexable)
                    if non_indexable:
                        continue
                if not tx_id_checked:   # the pure codec packs u64 tx_id per row
                    if first_ok and first_c + <uint64_t>offset >= first_c:
                        tx_id = first_c + <uint64_t>offset
                    else:
                        tx_id = to_u64(first_tx_id + offset)
                    tx_id_checked = True
                if i > 0xFFFF:
                    _U16.pack(i)
                if n_rows == cap_rows:
                    cap_rows = cap_rows * 2 if cap_rows else 256
                    grown = PyMem_Realloc(rows, cap_rows * sizeof(IndexRow))
                    if grown is NULL:
                        raise MemoryError()
                    rows = <IndexRow*>grown
                row = &rows[n_rows]
                row.tx_id = tx_id
                row.entry_index = <unsigned int>i
                row.entry_offset = ENTRY_OFFSET_UNKNOWN
                if not truncated and <size_t>(e.key - 2 - bptr(b)) < ENTRY_OFFSET_UNKNOWN:
                    row.entry_offset = <uint32_t>(e.key - 2 - bptr(b))
                if e.key_len <= INDEX_KEY_UNFOLDED_MAX:
                    row.key = e.key
                    row.key_len = e.key_len
                    row.folded_at = -1
                else:
                    if fold_used + INDEX_KEY_MAX > fold_cap:
                        fold_cap = fold_cap * 2 if fold_cap else 16 * INDEX_KEY_MAX
                        grown = PyMem_Realloc(folded, fold_cap)
                        if grown is NULL:
                            raise MemoryError()
                        folded = <uchar*>grown
                    fold_key(e.key, e.key_len, folded + fold_used)
                    row.key = NULL
                    row.key_len = INDEX_KEY_MAX
                    row.folded_at = fold_used
                    fold_used += INDEX_KEY_MAX
                n_rows += 1
            offset += 1
        for i in range(n_rows):
            if rows[i].folded_at >= 0:
                rows[i].key = folded + rows[i].folded_at
            rows[i].head = key_head(rows[i].key, rows[i].key_len)
        if n_rows > 1:
            qsort(rows, n_rows, sizeof(IndexRow), index_row_cmp)
        out = [None] * n_rows
        for i in range(n_rows):
            row = &rows[i]
            value = new_bytes(INDEX_ROW_SIZE)      # layout.INDEX_ROW
            v = wptr(value)
            put_u64(v, row.tx_id)
            put_u16(v + INDEX_ROW_ENTRY_INDEX_AT, row.entry_index)
            put_u32(v + INDEX_ROW_ENTRY_OFFSET_AT, row.entry_offset)
            out[i] = (slice_bytes(row.key, row.key_len), value)
        return out
    finally:
        PyMem_Free(rows)
        PyMem_Free(folded)
        ents_free(&ents)
