# SHA-256, entry digests, the per-tx entry hash tree (format §6, §7) and the AHT (§9).

# --- SHA-256 -------------------------------------------------------------------------------------

cdef inline void sha256_into(const uchar* p, size_t n, uchar* out) noexcept nogil:
    """SHA-256 of one contiguous message (``out`` may overlap ``p``): see imc_sha256."""
    imc_sha256(p, n, out)


cdef void sha256_parts(const uchar** parts, const size_t* sizes, int count,
                       uchar* out) noexcept nogil:
    """SHA-256 of the concatenation of ``count`` parts (``out`` may overlap any part)."""
    cdef uchar buf[256]
    cdef size_t total = 0
    cdef int i
    cdef SHA256_CTX c
    for i in range(count):
        total += sizes[i]
    if total <= IMC_SMALL_MESSAGE_MAX:
        total = 0
        for i in range(count):
            if sizes[i]:
                memcpy(buf + total, parts[i], sizes[i])
                total += sizes[i]
        imc_sha256_padded(buf, total, out)
        return
    SHA256_Init(&c)
    for i in range(count):
        SHA256_Update(&c, parts[i], sizes[i])
    SHA256_Final(out, &c)


cdef inline void leaf_hash32(const uchar* d, uchar* out) noexcept nogil:
    """H(0x00 || d) for a 32-byte d (``out`` may be ``d``)."""
    cdef uchar buf[256]
    buf[0] = 0
    memcpy(buf + 1, d, DIGEST)
    imc_sha256_padded(buf, 1 + DIGEST, out)


cdef void leaf_hash(const uchar* d, size_t n, uchar* out) noexcept nogil:
    """H(0x00 || d) for a d of any length."""
    cdef uchar prefix = 0
    cdef const uchar* parts[2]
    cdef size_t sizes[2]
    if n == DIGEST:
        leaf_hash32(d, out)
        return
    parts[0] = &prefix
    sizes[0] = 1
    parts[1] = d
    sizes[1] = n
    sha256_parts(parts, sizes, 2, out)


cdef inline void node_hash32(const uchar* left, const uchar* right, uchar* out) noexcept nogil:
    """H(0x01 || left || right) for 32-byte children (``out`` may be either child)."""
    cdef uchar buf[256]
    buf[0] = 1
    memcpy(buf + 1, left, DIGEST)
    memcpy(buf + 1 + DIGEST, right, DIGEST)
    imc_sha256_padded(buf, 1 + 2 * DIGEST, out)


cdef void node_hash(const uchar* left, size_t left_len, const uchar* right, size_t right_len,
                    uchar* out) noexcept nogil:
    cdef uchar prefix = 1
    cdef const uchar* parts[3]
    cdef size_t sizes[3]
    if left_len == DIGEST and right_len == DIGEST:
        node_hash32(left, right, out)
        return
    parts[0] = &prefix
    sizes[0] = 1
    parts[1] = left
    sizes[1] = left_len
    parts[2] = right
    sizes[2] = right_len
    sha256_parts(parts, sizes, 3, out)


cdef void entry_digest_into(bint v0, const uchar* key, size_t key_len, const uchar* md,
                            size_t md_len, const uchar* hvalue, size_t hvalue_len,
                            uchar* out) noexcept nogil:
    """v0: H(key || hValue); v1: H(u16 len(md) || md || u16 len(key) || key || hValue) (§6).

    The caller has checked that both lengths fit their u16 fields.
    """
    cdef uchar md_len_be[2]
    cdef uchar key_len_be[2]
    cdef const uchar* parts[5]
    cdef size_t sizes[5]
    if v0:
        parts[0] = key
        sizes[0] = key_len
        parts[1] = hvalue
        sizes[1] = hvalue_len
        sha256_parts(parts, sizes, 2, out)
        return
    put_u16(md_len_be, <unsigned int>md_len)
    put_u16(key_len_be, <unsigned int>key_len)
    parts[0] = md_len_be
    sizes[0] = 2
    parts[1] = md
    sizes[1] = md_len
    parts[2] = key_len_be
    sizes[2] = 2
    parts[3] = key
    sizes[3] = key_len
    parts[4] = hvalue
    sizes[4] = hvalue_len
    sha256_parts(parts, sizes, 5, out)


# --- the entry hash tree -------------------------------------------------------------------------

cdef void htree_reduce(uchar* level, Py_ssize_t n) noexcept nogil:
    """``level`` holds n >= 1 leaf hashes; leaves the root in its first 32 bytes.

    Pairs neighbours level by level in place (node i is written after nodes 2i and 2i+1 were
    read); an odd last node is promoted unchanged.
    """
    cdef Py_ssize_t i, half
    while n > 1:
        half = n >> 1
        for i in range(half):
            node_hash32(level + 2 * i * DIGEST, level + (2 * i + 1) * DIGEST, level + i * DIGEST)
        if n & 1:
            memcpy(level + half * DIGEST, level + (n - 1) * DIGEST, DIGEST)
            n = half + 1
        else:
            n = half


cdef void eh_of_entries(bint v0, const Ent* ents, Py_ssize_t n, bint truncated, uchar* hvalues,
                        uchar* level, uchar* eh) noexcept nogil:
    """Hash values (or take the truncated hashes), entry digests and the tree root (Eh).

    ``hvalues`` receives n hvalues (32 bytes each), ``level`` is n * 32 bytes of scratch.
    """
    cdef Py_ssize_t i
    cdef const Ent* e
    cdef uchar* hv
    cdef uchar* node
    for i in range(n):
        e = &ents[i]
        hv = hvalues + i * DIGEST
        node = level + i * DIGEST
        if truncated:
            memcpy(hv, e.value, DIGEST)
        else:
            sha256_into(e.value, <size_t>e.value_len, hv)
        entry_digest_into(v0, e.key, <size_t>e.key_len, e.md, <size_t>e.md_len, hv, DIGEST, node)
        leaf_hash32(node, node)
    htree_reduce(level, n)
    memcpy(eh, level, DIGEST)


cdef inline Py_ssize_t entries_blocks(const Ent* ents, Py_ssize_t n) noexcept nogil:
    """Roughly how many SHA-256 blocks hashing these entries takes (for the GIL decision)."""
    cdef Py_ssize_t i, blocks = 0
    for i in range(n):
        blocks += (ents[i].value_len >> 6) + (ents[i].key_len >> 6) + 6
    return blocks


# --- the AHT's peaks -----------------------------------------------------------------------------

cdef tuple peaks_as_bytes(object peaks):
    """The caller's peaks as a tuple of bytes objects (copies only of those that are not bytes)."""
    cdef tuple items = tuple(peaks)
    cdef Py_ssize_t i, n = len(items)
    cdef list converted
    for i in range(n):
        if not PyBytes_CheckExact(items[i]):
            converted = list(items)
            for i in range(i, n):
                converted[i] = as_bytes(converted[i])
            return tuple(converted)
    return items


cdef enum:
    STACK_INLINE_MAX = 64       # peaks + appends that fit the caller's on-stack arrays


cdef int stack_init(PeakStack* s, tuple held, Py_ssize_t appends, const uchar** ptr_inline,
                    Py_ssize_t* size_inline) except -1:
    """Point a stack at ``held`` (bytes peaks) with room for ``appends`` more pushes; uses the
    caller's STACK_INLINE_MAX-item arrays when they are big enough (may be NULL)."""
    cdef Py_ssize_t i, n = len(held)
    cdef bytes peak
    s.cap = n + appends + 1
    s.heap = ptr_inline is NULL or s.cap > STACK_INLINE_MAX
    if s.heap:
        s.ptr = <const uchar**>checked_malloc(s.cap * sizeof(uchar*))
        s.size = <Py_ssize_t*>PyMem_Malloc(s.cap * sizeof(Py_ssize_t))
        if s.size is NULL:
            PyMem_Free(s.ptr)
            s.ptr = NULL
            s.heap = False
            raise MemoryError()
    else:
        s.ptr = ptr_inline
        s.size = size_inline
    for i in range(n):
        peak = <bytes>held[i]
        s.ptr[i] = bptr(peak)
        s.size[i] = PyBytes_GET_SIZE(peak)
    s.count = n
    s.kept = n
    return 0


cdef void stack_free(PeakStack* s) noexcept:
    if s.heap:
        PyMem_Free(s.ptr)
        PyMem_Free(s.size)
    s.ptr = NULL
    s.size = NULL
    s.count = 0
    s.heap = False


cdef int stack_store(PeakStack* s, object peaks) except -1:
    """Write the stack back: keep the caller's untouched peaks, replace the rest."""
    cdef Py_ssize_t i
    cdef list fresh = []
    for i in range(s.kept, s.count):
        fresh.append(PyBytes_FromStringAndSize(<const char*>s.ptr[i], s.size[i]))
    peaks[s.kept:] = fresh
    return 0


cdef void stack_root(const PeakStack* s, uchar* acc, const uchar** root,
                     Py_ssize_t* root_len) noexcept nogil:
    """The AHT root over the stack (§9): zeros when empty, the only peak, or the fold of
    H(0x01 || peak || acc) from the smallest peak up. ``acc`` is 32 bytes of scratch."""
    cdef Py_ssize_t i, n = s.count
    if n == 0:
        memset(acc, 0, DIGEST)
        root[0] = acc
        root_len[0] = DIGEST
        return
    if n == 1:
        root[0] = s.ptr[0]
        root_len[0] = s.size[0]
        return
    node_hash(s.ptr[n - 2], <size_t>s.size[n - 2], s.ptr[n - 1], <size_t>s.size[n - 1], acc)
    i = n - 3
    while i >= 0:
        node_hash(s.ptr[i], <size_t>s.size[i], acc, DIGEST, acc)
        i -= 1
    root[0] = acc
    root_len[0] = DIGEST


cdef int stack_append(PeakStack* s, uint64_t leaf_index, const uchar* alh_value,
                      uchar* nodes) noexcept nogil:
    """Append one leaf: writes the leaf hash then each new parent to ``nodes`` (32 bytes each,
    room for 1 + trailing_ones(leaf_index)) and pushes the last. Returns -1 (touching nothing)
    if the stack holds fewer peaks than the leaf index needs."""
    cdef int merges = trailing_ones(leaf_index)
    cdef int j
    if merges > s.count or s.count - merges + 1 > s.cap:
        return -1
    leaf_hash32(alh_value, nodes)
    for j in range(merges):
        s.count -= 1
        node_hash(s.ptr[s.count], <size_t>s.size[s.count], nodes + j * DIGEST, DIGEST,
                  nodes + (j + 1) * DIGEST)
    if s.kept > s.count:
        s.kept = s.count
    s.ptr[s.count] = nodes + merges * DIGEST
    s.size[s.count] = DIGEST
    s.count += 1
    return 0


# --- API -----------------------------------------------------------------------------------------

cdef bytes _EMPTY_DIGEST = bytes.fromhex(
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
cdef bytes _ZERO_DIGEST = bytes(DIGEST)


def sha256(data):
    cdef Py_buffer view
    cdef bytes out = new_bytes(DIGEST)
    cdef uchar* o = wptr(out)
    cdef const uchar* p
    cdef size_t n
    if PyBytes_CheckExact(data):
        p = bptr(<bytes>data)
        n = <size_t>PyBytes_GET_SIZE(data)
        if (n >> 6) >= NOGIL_BLOCKS_MIN:
            with nogil:
                sha256_into(p, n, o)
        else:
            sha256_into(p, n, o)
        return out
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)   # holds a bytearray's size while hashing
    try:
        p = <const uchar*>view.buf
        n = <size_t>view.len
        if (n >> 6) >= NOGIL_BLOCKS_MIN:
            with nogil:
                sha256_into(p, n, o)
        else:
            sha256_into(p, n, o)
    finally:
        PyBuffer_Release(&view)
    return out


cdef bint is_v0(object version) except -1:
    """``version == 0`` as the pure codec evaluates it."""
    if PyLong_CheckExact(version):
        return version == 0
    return bool(version == 0)


def entry_digest(version, key, metadata, hvalue):
    cdef bytes k, m, h
    cdef bytes out = new_bytes(DIGEST)
    if is_v0(version):
        if metadata:
            raise IllegalArgumentsError("kv metadata is unsupported in tx header version 0")
        k = as_bytes(key)
        h = as_bytes(hvalue)
        entry_digest_into(True, bptr(k), len(k), NULL, 0, bptr(h), len(h), wptr(out))
        return out
    m = as_bytes(metadata)
    if len(m) > 0xFFFF:
        _U16.pack(len(m))
    k = as_bytes(key)
    if len(k) > 0xFFFF:
        _U16.pack(len(k))
    h = as_bytes(hvalue)
    entry_digest_into(False, bptr(k), len(k), bptr(m), len(m), bptr(h), len(h), wptr(out))
    return out


cdef struct Digests:
    const uchar** ptr
    size_t* size
    Py_ssize_t n


cdef int digests_of(tuple items, Digests* d) except -1:
    """Pointers to a tuple of bytes (the tuple keeps them alive)."""
    cdef Py_ssize_t i
    cdef bytes item
    d.n = len(items)
    d.ptr = <const uchar**>checked_malloc(d.n * sizeof(uchar*))
    d.size = <size_t*>PyMem_Malloc(d.n * sizeof(size_t) + 1)
    if d.size is NULL:
        PyMem_Free(d.ptr)
        raise MemoryError()
    for i in range(d.n):
        item = <bytes>items[i]
        d.ptr[i] = bptr(item)
        d.size[i] = <size_t>PyBytes_GET_SIZE(item)
    return 0


cdef void digests_free(Digests* d) noexcept:
    PyMem_Free(d.ptr)
    PyMem_Free(d.size)


cdef void leaves_run(const Digests* d, uchar* level) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(d.n):
        leaf_hash(d.ptr[i], d.size[i], level + i * DIGEST)


cdef void entries_hash_run(const Digests* d, uchar* level) noexcept nogil:
    leaves_run(d, level)
    htree_reduce(level, d.n)


def entries_hash(digests):
    if not digests:
        return _EMPTY_DIGEST
    cdef tuple items = peaks_as_bytes(digests)
    cdef Digests d
    digests_of(items, &d)
    cdef uchar* level = NULL
    try:
        level = <uchar*>checked_malloc(d.n * DIGEST)
        if 3 * d.n >= NOGIL_BLOCKS_MIN:
            with nogil:
                entries_hash_run(&d, level)
        else:
            entries_hash_run(&d, level)
        return digest_bytes(level)
    finally:
        PyMem_Free(level)
        digests_free(&d)


cdef Py_ssize_t htree_levels_run(const Digests* d, uchar* nodes) noexcept nogil:
    """Every level of the tree, level k right after level k-1; returns the node count."""
    cdef Py_ssize_t width = d.n, half, j, total = d.n
    cdef uchar* level = nodes
    cdef uchar* up
    leaves_run(d, nodes)
    while width > 1:
        half = width >> 1
        up = level + width * DIGEST
        for j in range(half):
            node_hash32(level + 2 * j * DIGEST, level + (2 * j + 1) * DIGEST, up + j * DIGEST)
        if width & 1:
            memcpy(up + half * DIGEST, level + (width - 1) * DIGEST, DIGEST)
            half += 1
        level = up
        width = half
        total += width
    return total


def htree_inclusion_proof(digests, index):
    """The bottom-up audit path of entry ``index`` (RFC 6962 PATH over the entry digests)."""
    if not 0 <= index < len(digests):
        raise IllegalArgumentsError("entry index out of range")
    cdef Py_ssize_t i = index
    cdef tuple items = peaks_as_bytes(digests)
    cdef Digests d
    cdef Py_ssize_t width, sibling
    cdef list terms = []
    cdef uchar* nodes = NULL
    cdef uchar* level
    digests_of(items, &d)
    try:
        # Widths are n, ceil(n/2), ceil(n/4)... (odd nodes are promoted): under 2n + 64 nodes.
        nodes = <uchar*>checked_malloc((2 * d.n + 64) * DIGEST)
        if 3 * d.n >= NOGIL_BLOCKS_MIN:
            with nogil:
                htree_levels_run(&d, nodes)
        else:
            htree_levels_run(&d, nodes)
        level = nodes
        width = d.n
        while width > 1:
            sibling = i ^ 1
            if sibling < width:
                terms.append(digest_bytes(level + sibling * DIGEST))
            level += width * DIGEST
            width = (width + 1) >> 1
            i >>= 1
        return terms
    finally:
        PyMem_Free(nodes)
        digests_free(&d)


def aht_root(peaks):
    """Root over every leaf appended so far; 32 zero bytes for an empty tree (blRoot of tx 1)."""
    if not peaks:
        return _ZERO_DIGEST
    cdef tuple held = peaks_as_bytes(peaks)
    if len(held) == 1:
        return held[0]
    cdef PeakStack s
    s.heap = False
    cdef uchar acc[DIGEST]
    cdef const uchar* root
    cdef Py_ssize_t root_len
    stack_init(&s, held, 0, NULL, NULL)
    try:
        stack_root(&s, acc, &root, &root_len)
        return digest_bytes(root)
    finally:
        stack_free(&s)


cdef Py_ssize_t trailing_ones_py(object index) except -2:
    """How many peaks appending leaf ``index`` merges; -1 for "forever" (index == -1)."""
    cdef uint64_t v
    if int_u64(index, &v):
        return trailing_ones(v)
    index = PyNumber_Index(index)
    if index == -1:
        return -1
    return (~index & (index + 1)).bit_length() - 1


def aht_append(peaks, leaf_count, alh_value):
    """Append one leaf; return the new nodes (leaf hash, then each new parent) concatenated."""
    cdef bytes value = as_bytes(alh_value)
    cdef uchar leaf[DIGEST]
    leaf_hash(bptr(value), <size_t>PyBytes_GET_SIZE(value), leaf)
    cdef Py_ssize_t merges = trailing_ones_py(leaf_count)
    cdef Py_ssize_t have = len(peaks)
    if merges < 0 or merges > have:
        # The pure codec pops until the list is empty and then fails; this leaves peaks as it was.
        raise IndexError("pop from empty list")
    cdef tuple popped = peaks_as_bytes(peaks[have - merges:]) if merges else ()
    cdef bytes nodes = new_bytes((merges + 1) * DIGEST)
    cdef uchar* out = wptr(nodes)
    cdef bytes peak
    cdef Py_ssize_t j
    memcpy(out, leaf, DIGEST)
    for j in range(merges):
        peak = <bytes>popped[merges - 1 - j]     # the last peak is popped first
        node_hash(bptr(peak), <size_t>PyBytes_GET_SIZE(peak), out + j * DIGEST, DIGEST,
                  out + (j + 1) * DIGEST)
    if merges:
        del peaks[have - merges:]
    peaks.append(digest_bytes(out + merges * DIGEST))
    return nodes
