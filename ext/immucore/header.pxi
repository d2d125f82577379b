# KV metadata (§4), the tx header (§5), inner hash and Alh (§8).

# --- KV metadata ---------------------------------------------------------------------------------

cdef int parse_kv_md(const uchar* p, Py_ssize_t n, bint* deleted, bint* has_expiry,
                     uint64_t* expires_at, bint* non_indexable) except -1:
    """Attributes in code order: 0 deleted, 1 expiresAt (u64), 2 nonIndexable."""
    cdef Py_ssize_t pos = 0
    cdef int code, last_code = -1
    if n > KV_MD_MAX:
        raise CorruptedDataError("data is corrupted: kv metadata too long")
    deleted[0] = has_expiry[0] = non_indexable[0] = False
    expires_at[0] = 0
    while pos < n:
        code = p[pos]
        if code <= last_code:
            raise CorruptedDataError("data is corrupted: kv metadata attributes out of order")
        last_code = code
        pos += 1
        if code == 0:
            deleted[0] = True
        elif code == 1:
            if pos + 8 > n:
                raise CorruptedDataError("data is corrupted: truncated kv metadata")
            has_expiry[0] = True
            expires_at[0] = get_u64(p + pos)
            pos += 8
        elif code == 2:
            non_indexable[0] = True
        else:
            raise CorruptedDataError(f"data is corrupted: unknown kv metadata attribute {code}")
    return 0


def kv_metadata_bytes(deleted, expires_at, non_indexable):
    cdef uchar buf[KV_MD_MAX]
    cdef Py_ssize_t n = 0
    if deleted:
        buf[n] = 0
        n += 1
    if expires_at is not None:
        buf[n] = 1
        put_u64(buf + n + 1, to_u64(expires_at))
        n += 9
    if non_indexable:
        buf[n] = 2
        n += 1
    return slice_bytes(buf, n)


def parse_kv_metadata(raw):
    """(deleted, expires_at or None, non_indexable); attributes must come in code order."""
    cdef InBuf b
    cdef bint deleted, has_expiry, non_indexable
    cdef uint64_t expires_at
    inbuf_get(raw, &b)
    try:
        parse_kv_md(b.p, b.n, &deleted, &has_expiry, &expires_at, &non_indexable)
    finally:
        inbuf_release(&b)
    return (deleted, PyLong_FromUnsignedLongLong(expires_at) if has_expiry else None,
            non_indexable)


# --- the header ----------------------------------------------------------------------------------

cdef inline Py_ssize_t counts_size(const Header* h) noexcept nogil:
    return 2 if h.version == 0 else 2 + h.md_len + 4


cdef inline Py_ssize_t header_size(const Header* h) noexcept nogil:
    return 8 + h.prev_alh_len + 8 + 2 + counts_size(h) + h.eh_len + 8 + h.bl_root_len


cdef uchar* put_header(const Header* h, uchar* p) noexcept nogil:
    """Write TxHeader.Bytes; returns the end. ID | PrevAlh | Ts | Version | counts | Eh |
    BlTxID | BlRoot, counts being v0 u16 NEntries, v1 u16 mdLen | md | u32 NEntries."""
    put_u64(p, h.id)
    p += 8
    memcpy(p, h.prev_alh, h.prev_alh_len)
    p += h.prev_alh_len
    put_u64(p, h.ts)
    put_u16(p + 8, h.version)
    p += 10
    if h.version == 0:
        put_u16(p, <unsigned int>h.nentries)
        p += 2
    else:
        put_u16(p, <unsigned int>h.md_len)
        memcpy(p + 2, h.md, h.md_len)
        p += 2 + h.md_len
        put_u32(p, <uint32_t>h.nentries)
        p += 4
    memcpy(p, h.eh, h.eh_len)
    p += h.eh_len
    put_u64(p, h.bl_tx_id)
    p += 8
    memcpy(p, h.bl_root, h.bl_root_len)
    return p + h.bl_root_len


cdef int decode_header_into(const uchar* p, Py_ssize_t n, Header* h) except -1:
    """Parse exactly one serialized header (all of p[:n]) with the parse rules of §5."""
    cdef Py_ssize_t pos
    if n < 50:
        raise IllegalArgumentsError("tx header too short")
    h.id = get_u64(p)
    h.prev_alh = p + 8
    h.prev_alh_len = DIGEST
    h.ts = get_u64(p + 40)
    h.version = get_u16(p + 48)
    if h.version == 0:
        if n != HEADER_V0_SIZE:
            raise IllegalArgumentsError("tx header v0 must be 124 bytes")
        h.md = p + 52
        h.md_len = 0
        h.nentries = get_u16(p + 50)
        pos = 52
    elif h.version == 1:
        if n < HEADER_V1_SIZE_MIN:
            raise IllegalArgumentsError("tx header v1 too short")
        h.md_len = get_u16(p + 50)
        if h.md_len > TX_MD_MAX:
            raise IllegalArgumentsError("tx metadata too long")
        if n != HEADER_V1_SIZE_MIN + h.md_len:
            raise IllegalArgumentsError("tx header length does not match its metadata length")
        h.md = p + 52
        h.nentries = get_u32(p + 52 + h.md_len)
        pos = 56 + h.md_len
    else:
        raise IllegalArgumentsError("tx created with a newer version or data is corrupted")
    h.eh = p + pos
    h.eh_len = DIGEST
    h.bl_tx_id = get_u64(p + pos + 32)
    h.bl_root = p + pos + 40
    h.bl_root_len = DIGEST
    if h.id < 1:
        raise IllegalArgumentsError("tx id must be at least 1")
    if h.nentries < 1:
        raise IllegalArgumentsError("tx must have at least one entry")
    if h.bl_tx_id >= h.id:
        raise IllegalArgumentsError("bl_tx_id must be lower than the tx id")
    return 0


cdef tuple header_tuple(const Header* h):
    """(id, prev_alh, ts, version, metadata, nentries, eh, bl_tx_id, bl_root) of a decoded header."""
    return (PyLong_FromUnsignedLongLong(h.id), digest_bytes(h.prev_alh),
            PyLong_FromUnsignedLongLong(h.ts), <int>h.version, slice_bytes(h.md, h.md_len),
            PyLong_FromUnsignedLongLong(h.nentries), digest_bytes(h.eh),
            PyLong_FromUnsignedLongLong(h.bl_tx_id), digest_bytes(h.bl_root))


cdef inline void inner_hash_of_decoded(const uchar* header, Py_ssize_t n, uchar* out) noexcept nogil:
    """A decoded header's inner hash: H of everything after ID and PrevAlh."""
    sha256_into(header + 8 + DIGEST, <size_t>(n - 8 - DIGEST), out)


cdef object header_from_args(Header* h, object ts, object version, object metadata,
                             object nentries, object eh, object bl_tx_id, object bl_root,
                             list keep):
    """Fill every field after PrevAlh from Python values, in the order the pure codec packs them
    (so the first bad value raises the same error). Byte values are appended to ``keep``."""
    cdef bytes md, eh_b, bl_b
    h.ts = to_u64(ts)
    h.version = to_u16(version)
    if h.version == 0:
        if metadata:
            raise IllegalArgumentsError("metadata is unsupported when in 1.1 compatibility mode")
        h.nentries = to_u16(nentries)
        h.md = NULL
        h.md_len = 0
    elif h.version == 1:
        md = as_bytes(metadata)
        if len(md) > 0xFFFF:
            _U16.pack(len(md))
        keep.append(md)
        h.md = bptr(md)
        h.md_len = len(md)
        h.nentries = to_u32(nentries)
    else:
        raise IllegalArgumentsError(f"unsupported tx header version {version}")
    eh_b = as_bytes(eh)
    keep.append(eh_b)
    h.eh = bptr(eh_b)
    h.eh_len = len(eh_b)
    h.bl_tx_id = to_u64(bl_tx_id)
    bl_b = as_bytes(bl_root)
    keep.append(bl_b)
    h.bl_root = bptr(bl_b)
    h.bl_root_len = len(bl_b)
    return None


def encode_header(id, prev_alh, ts, version, metadata, nentries, eh, bl_tx_id, bl_root):
    cdef Header h
    cdef list keep = []
    h.id = to_u64(id)
    cdef bytes prev = as_bytes(prev_alh)
    h.prev_alh = bptr(prev)
    h.prev_alh_len = len(prev)
    header_from_args(&h, ts, version, metadata, nentries, eh, bl_tx_id, bl_root, keep)
    cdef bytes out = new_bytes(header_size(&h))
    put_header(&h, wptr(out))
    return out


def decode_header(buf):
    """Parse exactly one serialized header (the whole of ``buf``) into a header tuple."""
    cdef InBuf b
    cdef Header h
    inbuf_get(buf, &b)
    try:
        decode_header_into(b.p, b.n, &h)
        return header_tuple(&h)
    finally:
        inbuf_release(&b)


def inner_hash(id, prev_alh, ts, version, metadata, nentries, eh, bl_tx_id, bl_root):
    # H(Ts | Version | counts | Eh | BlTxID | BlRoot): the header without ID and PrevAlh, which
    # the pure codec ignores entirely (so no check on them here either).
    cdef Header h
    cdef list keep = []
    h.id = 0
    h.prev_alh = NULL
    h.prev_alh_len = 0
    header_from_args(&h, ts, version, metadata, nentries, eh, bl_tx_id, bl_root, keep)
    cdef Py_ssize_t size = header_size(&h)
    cdef uchar* buf = <uchar*>checked_malloc(size)
    cdef bytes out = new_bytes(DIGEST)
    try:
        put_header(&h, buf)
        sha256_into(buf + 8, <size_t>(size - 8), wptr(out))
    finally:
        PyMem_Free(buf)
    return out


def alh(id, prev_alh, inner):
    cdef uchar id_be[8]
    put_u64(id_be, to_u64(id))
    cdef bytes prev = as_bytes(prev_alh)
    cdef bytes inn = as_bytes(inner)
    cdef const uchar* parts[3]
    cdef size_t sizes[3]
    cdef bytes out = new_bytes(DIGEST)
    parts[0] = id_be
    sizes[0] = 8
    parts[1] = bptr(prev)
    sizes[1] = <size_t>len(prev)
    parts[2] = bptr(inn)
    sizes[2] = <size_t>len(inn)
    sha256_parts(parts, sizes, 3, wptr(out))
    return out
