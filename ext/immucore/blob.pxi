# Export blobs (§11): parsing with every length checked, verification, building and replicating.

cdef int check_entry(Py_ssize_t key_len, Py_ssize_t value_len, Py_ssize_t md_len,
                     Limits lim) except -1:
    if key_len == 0:
        raise IllegalArgumentsError("key can not be empty")
    if key_len > lim.key_max:
        raise IllegalArgumentsError(
            f"key length {key_len} exceeds the limit of {lim.key_max_obj} bytes")
    if value_len > lim.value_max:
        raise IllegalArgumentsError(
            f"value length {value_len} exceeds the limit of {lim.value_max_obj} bytes")
    if md_len > KV_MD_MAX:
        raise IllegalArgumentsError("kv metadata too long")
    return 0


cdef int check_caller_kv_md(bytes md) except -1:
    """Metadata a caller hands in must parse, or it would seal a tx no one can read back."""
    cdef bint deleted, has_expiry, non_indexable
    cdef uint64_t expires_at
    try:
        parse_kv_md(bptr(md), len(md), &deleted, &has_expiry, &expires_at, &non_indexable)
    except CorruptedDataError as exc:
        raise IllegalArgumentsError(f"invalid kv metadata: {exc}") from None
    return 0


cdef int ent_key_cmp(const void* a, const void* b) noexcept nogil:
    cdef const Ent* x = (<const Ent**>a)[0]
    cdef const Ent* y = (<const Ent**>b)[0]
    if x.key_len != y.key_len:
        return -1 if x.key_len < y.key_len else 1
    return memcmp(x.key, y.key, <size_t>x.key_len)


cdef inline uint64_t key_fingerprint(const uchar* key, Py_ssize_t n) noexcept nogil:
    """Length and the first and last 8 bytes: equal keys have equal fingerprints."""
    cdef uint64_t head = 0, tail = 0
    if n >= 8:
        memcpy(&head, key, 8)
        memcpy(&tail, key + n - 8, 8)
    else:
        memcpy(&head, key, <size_t>n)
    return head ^ (tail * 0x9E3779B97F4A7C15ULL) ^ (<uint64_t>n << 56)


cdef bint has_duplicate_keys(const Ent* ents, Py_ssize_t n) except -1:
    """Pairwise on fingerprints for small txs, sort-and-compare-neighbours for large ones."""
    cdef Py_ssize_t i, j
    cdef const Ent** order
    cdef uint64_t prints[32]
    cdef bint dup = False
    if n <= 32:
        for i in range(n):
            prints[i] = key_fingerprint(ents[i].key, ents[i].key_len)
        for i in range(n):
            for j in range(i + 1, n):
                if (prints[i] == prints[j] and ents[i].key_len == ents[j].key_len
                        and memcmp(ents[i].key, ents[j].key, <size_t>ents[i].key_len) == 0):
                    return True
        return False
    order = <const Ent**>checked_malloc(n * sizeof(Ent*))
    for i in range(n):
        order[i] = &ents[i]
    qsort(order, n, sizeof(Ent*), ent_key_cmp)
    for i in range(1, n):
        if ent_key_cmp(&order[i - 1], &order[i]) == 0:
            dup = True
            break
    PyMem_Free(order)
    return dup


cdef inline Py_ssize_t walk_entry(const uchar* p, Py_ssize_t size, Py_ssize_t pos, Ent* e) except -1:
    """Read the entry at ``pos`` into ``e`` (pointers into ``p``) and return where the next one
    starts; each length is checked against what is left, with parse_blob's messages."""
    cdef Py_ssize_t key_len, md_len
    cdef uint32_t value_len
    if pos + 2 > size:
        raise IllegalArgumentsError("export blob truncated in an entry")
    key_len = get_u16(p + pos)
    pos += 2
    if pos + key_len + 2 > size:
        raise IllegalArgumentsError("export blob truncated in an entry key")
    e.key = p + pos
    e.key_len = key_len
    pos += key_len
    md_len = get_u16(p + pos)
    pos += 2
    if md_len > KV_MD_MAX or pos + md_len + 4 > size:
        raise IllegalArgumentsError("export blob kv metadata length out of range")
    e.md = p + pos
    e.md_len = md_len
    pos += md_len
    value_len = get_u32(p + pos)
    pos += 4
    if value_len > size - pos:
        raise IllegalArgumentsError("export blob truncated in an entry value")
    e.value = p + pos
    e.value_len = value_len
    return pos + value_len


cdef int parse_blob(const uchar* p, Py_ssize_t size, Limits lim, Header* h, EntBuf* ents,
                    bint* truncated, bint check_duplicates=True,
                    Py_ssize_t checked_entry=-1) except -1:
    """Parse one export blob; its entries are appended to ``ents`` (pointers into ``p``).

    Every length is checked against what is left of the blob before it is used, and nothing is
    allocated from a length the blob claims: an entry takes at least 8 bytes, so the entry count
    only sizes the array up to what the remaining bytes could hold. Raises with the pure codec's
    messages, in its order.
    """
    cdef Py_ssize_t hdr_len, pos, start, i
    cdef uint64_t nentries, k
    cdef unsigned int flag
    cdef Ent* e
    cdef bint deleted, has_expiry, non_indexable
    cdef uint64_t expires_at
    if size < 4:
        raise IllegalArgumentsError("export blob too short")
    hdr_len = get_u32(p)
    if hdr_len > size - 4 or hdr_len > HEADER_V1_SIZE_MIN + TX_MD_MAX:
        raise IllegalArgumentsError("export blob header length out of range")
    decode_header_into(p + 4, hdr_len, h)
    nentries = h.nentries
    if <long long>nentries > lim.entries_max:
        raise IllegalArgumentsError(
            f"{nentries} entries exceed the limit of {lim.entries_max_obj} entries per tx")
    pos = 4 + hdr_len
    ents_reserve(ents, <Py_ssize_t>min(nentries, <uint64_t>((size - pos) // ENTRY_SIZE_MIN)))
    start = ents.count
    k = 0
    while k < nentries:
        if ents.count == ents.cap:
            ents_reserve(ents, 1)
        pos = walk_entry(p, size, pos, &ents.items[ents.count])
        ents.count += 1
        k += 1
    truncated[0] = False
    if pos != size:     # the trailer is optional (older primaries)
        if size - pos != 3 or get_u16(p + pos) != 1:
            raise IllegalArgumentsError("export blob has trailing bytes")
        flag = p[pos + 2]
        if flag > 1:
            raise IllegalArgumentsError("invalid truncation info")
        truncated[0] = flag == 1
    for i in range(start, ents.count):
        if checked_entry >= 0 and i - start != checked_entry:
            continue       # a read of one stored entry checks only it (pure: checked_entry)
        e = &ents.items[i]
        check_entry(e.key_len, 0 if truncated[0] else e.value_len, e.md_len, lim)
        if truncated[0] and e.value_len != DIGEST:
            raise IllegalArgumentsError("truncated value must be a 32-byte hash")
        if h.version == 0 and e.md_len:
            raise IllegalArgumentsError("kv metadata is unsupported in tx header version 0")
        if e.md_len:
            parse_kv_md(e.md, e.md_len, &deleted, &has_expiry, &expires_at, &non_indexable)
    if check_duplicates and has_duplicate_keys(ents.items + start, ents.count - start):
        raise IllegalArgumentsError("duplicated key")
    return 0


def blob_tx_id(blob):
    """The tx id an export blob's header starts with (``u32 hdrLen || u64 id || ...``), nothing
    else checked: what a replica needs to place a blob before it verifies it."""
    cdef InBuf b
    inbuf_get(blob, &b)
    try:
        if b.n < 12:
            raise IllegalArgumentsError("export blob too short")
        return PyLong_FromUnsignedLongLong(get_u64(b.p + 4))
    finally:
        inbuf_release(&b)


def verify_blob(blob, limits):
    """Parse an export blob and check its entries against its Eh: returns (header, alh)."""
    cdef InBuf b
    cdef Limits lim = load_limits(limits)
    cdef Header h
    cdef EntBuf ents
    cdef bint truncated
    cdef Py_ssize_t n
    cdef uchar eh[DIGEST]
    cdef uchar inner[DIGEST]
    cdef uchar* scratch = NULL
    cdef const uchar* p
    cdef bytes alh_b
    ents_init(&ents)
    inbuf_get(blob, &b)
    p = b.p
    try:
        parse_blob(p, b.n, lim, &h, &ents, &truncated)
        n = ents.count
        scratch = <uchar*>checked_malloc(2 * n * DIGEST)
        if entries_blocks(ents.items, n) >= NOGIL_BLOCKS_MIN:
            with nogil:
                eh_of_entries(h.version == 0, ents.items, n, truncated, scratch,
                              scratch + n * DIGEST, eh)
        else:
            eh_of_entries(h.version == 0, ents.items, n, truncated, scratch,
                          scratch + n * DIGEST, eh)
        if memcmp(eh, h.eh, DIGEST) != 0:
            raise IllegalArgumentsError("entries hash (Eh) differs")
        alh_b = new_bytes(DIGEST)
        alh_of_decoded(p + 4, get_u32(p), inner, wptr(alh_b))
        return header_tuple(&h), alh_b
    finally:
        PyMem_Free(scratch)
        inbuf_release(&b)
        ents_free(&ents)


cdef inline void alh_of_decoded(const uchar* header, Py_ssize_t n, uchar* inner,
                                uchar* out) noexcept nogil:
    """Alh = H(ID | PrevAlh | innerHash) of a decoded header (its first 40 bytes are ID|PrevAlh)."""
    cdef uchar buf[8 + 2 * DIGEST]
    inner_hash_of_decoded(header, n, inner)
    memcpy(buf, header, 8 + DIGEST)
    memcpy(buf + 8 + DIGEST, inner, DIGEST)
    sha256_into(buf, 8 + 2 * DIGEST, out)


# --- build_txs -----------------------------------------------------------------------------------

ctypedef struct TxPlan:
    Py_ssize_t start            # first entry in the EntBuf
    Py_ssize_t n
    Py_ssize_t hdr_len
    Py_ssize_t blob_len
    uchar* record
    uchar* nodes
    uchar eh[DIGEST]
    uchar alh[DIGEST]
    uchar bl_root[DIGEST]
    const uchar* bl_root_ptr    # bl_root, or (tx 0 only) the caller's single peak as it is
    Py_ssize_t bl_root_len


ctypedef struct BuildJob:
    TxPlan* plans
    Py_ssize_t ntx
    const Ent* ents
    PeakStack* stack
    uchar* level                # scratch: 32 bytes per entry of the largest tx
    bint v0
    unsigned int version
    uint64_t ts
    uint64_t bl_tx_id0          # first_id - 1
    const uchar* prev_alh       # the caller's, for tx 0
    Py_ssize_t prev_alh_len


cdef int build_run(BuildJob* job) noexcept nogil:
    """Write and hash every planned tx: entries, hvalues, Eh, blRoot, header, Alh, AHT nodes."""
    cdef Py_ssize_t t, i
    cdef TxPlan* plan
    cdef const Ent* e
    cdef uchar* rec
    cdef uchar* p
    cdef uchar* key_at
    cdef uchar* value_at
    cdef uchar* hv
    cdef uchar* node
    cdef Header h
    cdef uchar inner[DIGEST]
    cdef const uchar* parts[2]
    cdef size_t sizes[2]
    for t in range(job.ntx):
        plan = &job.plans[t]
        rec = plan.record
        p = rec + 4 + plan.hdr_len
        for i in range(plan.n):
            e = &job.ents[plan.start + i]
            # u16 kLen | 0x00 key | u16 mdLen | md | u32 vLen | 0x00 value (the stored forms)
            put_u16(p, <unsigned int>(e.key_len + 1))
            key_at = p + 2
            key_at[0] = 0
            memcpy(key_at + 1, e.key, e.key_len)
            p = key_at + 1 + e.key_len
            put_u16(p, <unsigned int>e.md_len)
            memcpy(p + 2, e.md, e.md_len)
            p += 2 + e.md_len
            put_u32(p, <uint32_t>(e.value_len + 1))
            value_at = p + 4
            value_at[0] = 0
            memcpy(value_at + 1, e.value, e.value_len)
            p = value_at + 1 + e.value_len
            hv = rec + plan.blob_len + i * DIGEST
            sha256_into(value_at, <size_t>(e.value_len + 1), hv)
            node = job.level + i * DIGEST
            entry_digest_into(job.v0, key_at, <size_t>(e.key_len + 1), e.md, <size_t>e.md_len,
                              hv, DIGEST, node)
            leaf_hash32(node, node)
        p[0] = 0            # trailer: u16 1 | u8 0 (values present)
        p[1] = 1
        p[2] = 0
        if plan.n:
            htree_reduce(job.level, plan.n)
            memcpy(plan.eh, job.level, DIGEST)
        else:   # only an object that is truthy with len() 0 gets here; pure hashes it as H("")
            sha256_into(plan.eh, 0, plan.eh)
        stack_root(job.stack, plan.bl_root, &plan.bl_root_ptr, &plan.bl_root_len)
        if plan.bl_root_ptr != <const uchar*>plan.bl_root and plan.bl_root_len == DIGEST:
            memcpy(plan.bl_root, plan.bl_root_ptr, DIGEST)
            plan.bl_root_ptr = plan.bl_root
        h.id = job.bl_tx_id0 + 1 + t
        if t == 0:
            h.prev_alh = job.prev_alh
            h.prev_alh_len = job.prev_alh_len
        else:
            h.prev_alh = job.plans[t - 1].alh
            h.prev_alh_len = DIGEST
        h.ts = job.ts
        h.version = job.version
        h.md = NULL
        h.md_len = 0
        h.nentries = <uint64_t>plan.n
        h.eh = plan.eh
        h.eh_len = DIGEST
        h.bl_tx_id = job.bl_tx_id0 + t
        h.bl_root = plan.bl_root_ptr
        h.bl_root_len = plan.bl_root_len
        put_u32(rec, <uint32_t>plan.hdr_len)
        put_header(&h, rec + 4)
        # innerHash = H(header after ID|PrevAlh); Alh = H(ID | PrevAlh | innerHash)
        sha256_into(rec + 4 + 8 + h.prev_alh_len, <size_t>(plan.hdr_len - 8 - h.prev_alh_len),
                    inner)
        parts[0] = rec + 4
        sizes[0] = <size_t>(8 + h.prev_alh_len)
        parts[1] = inner
        sizes[1] = DIGEST
        sha256_parts(parts, sizes, 2, plan.alh)
        memcpy(rec + plan.blob_len + plan.n * DIGEST, plan.alh, DIGEST)
        if stack_append(job.stack, h.bl_tx_id, plan.alh, plan.nodes) != 0:
            return -1       # cannot happen: build_txs checked the stack depth of every append
    return 0


cdef inline object flat_kvs(object tx):
    """A FlatTx's list of keys and values (checked to be a list: a tuple of it is copied)."""
    cdef object kvs = (<tuple>tx)[0]
    if type(kvs) is not list:
        raise IllegalArgumentsError("kvs_flat must be a list")
    return kvs


def build_txs(version, first_id, prev_alh, peaks, ts, txs, limits):
    """Turn callers' writes into chained transactions (see the pure codec for the contract).

    Every tx is validated, and every value the seal would pack is range-checked, before anything
    is hashed or ``peaks`` is touched; ``peaks`` is then updated in one step. A tx is a list of
    (key, value, metadata) tuples or a ``FlatTx``.
    """
    cdef tuple tx_list = tuple(txs)
    cdef Py_ssize_t ntx = len(tx_list)
    if ntx == 0:
        return []
    cdef Limits lim = load_limits(limits)
    cdef bint v0 = is_v0(version)
    cdef EntBuf ents
    cdef ObjVec held
    cdef PeakStack stack
    cdef BuildJob job
    cdef TxPlan* plans = NULL
    cdef TxPlan* plan
    cdef Ent* e
    cdef Py_ssize_t t, i, n, n_max = 0, depth, merges, body, blocks = 0
    cdef object entries, item, key, value, md
    cdef bint flat
    cdef bytes kb, vb, mb, prev_b = None, rec, nodes
    cdef tuple items, peaks_held = None
    cdef list records, nodes_list, out
    cdef uint64_t ts_c = 0, bl0 = 0, first_c
    cdef unsigned int ver_c = 0
    cdef object tx_id_obj, prev_obj, alh_obj, root_obj
    # Scratch for the common case (a few small txs) lives on the C stack.
    cdef TxPlan plans_inline[4]
    cdef const uchar* stack_ptr_inline[STACK_INLINE_MAX]
    cdef Py_ssize_t stack_size_inline[STACK_INLINE_MAX]
    cdef uchar level_inline[64 * DIGEST]
    ents_init(&ents)
    objs_init(&held)
    stack.ptr = NULL
    stack.size = NULL
    stack.heap = False
    job.level = NULL
    try:
        plans = &plans_inline[0] if ntx <= 4 else <TxPlan*>checked_malloc(ntx * sizeof(TxPlan))
        # 1. Validate every tx (the pure codec's checks, messages and order).
        for t in range(ntx):
            entries = tx_list[t]
            flat = type(entries) is _FlatTx
            if flat:
                # keys and values alternate in one list; one metadata for every entry
                items = tuple(flat_kvs(entries))
                if len(items) % 2:
                    raise IllegalArgumentsError("kvs_flat must alternate keys and values")
                n = len(items) // 2
                md = (<tuple>entries)[1]
                if type(md) is not bytes:
                    raise IllegalArgumentsError("keys, values and metadata must be bytes")
                if n == 0:
                    raise IllegalArgumentsError("no entries provided")
            else:
                if not entries:
                    raise IllegalArgumentsError("no entries provided")
                items = tuple(entries)
                n = len(items)
            if n > lim.entries_max:
                raise IllegalArgumentsError(
                    f"{n} entries exceed the limit of {lim.entries_max_obj} entries per tx")
            plan = &plans[t]
            plan.start = ents.count
            plan.n = n
            if n > n_max:
                n_max = n
            ents_reserve(&ents, n)
            for i in range(n):
                if flat:
                    key = items[2 * i]
                    value = items[2 * i + 1]
                else:
                    item = items[i]
                    if type(item) is not tuple or len(<tuple>item) != 3:
                        raise IllegalArgumentsError(
                            "each entry must be a (key, value, metadata) tuple")
                    key, value, md = <tuple>item
                if type(key) is not bytes or type(value) is not bytes or type(md) is not bytes:
                    raise IllegalArgumentsError("keys, values and metadata must be bytes")
                kb = <bytes>key
                vb = <bytes>value
                mb = <bytes>md
                if len(kb) == 0:
                    raise IllegalArgumentsError("key can not be empty")
                check_entry(len(kb) + 1, len(vb) + 1, len(mb), lim)
                if len(mb) and (i == 0 or not flat):      # a FlatTx's one metadata: once
                    check_caller_kv_md(mb)
                if v0 and len(mb):
                    raise IllegalArgumentsError(
                        "kv metadata is unsupported in tx header version 0")
                objs_push(&held, kb)
                objs_push(&held, vb)
                objs_push(&held, mb)
                e = &ents.items[ents.count]
                e.key = bptr(kb)
                e.key_len = len(kb)
                e.value = bptr(vb)
                e.value_len = len(vb)
                e.md = bptr(mb)
                e.md_len = len(mb)
                ents.count += 1
            if has_duplicate_keys(ents.items + plan.start, n):
                raise IllegalArgumentsError("duplicated key")

        # 2. What the pure codec's _seal would raise on, tx by tx, before hashing anything.
        for t in range(ntx):
            plan = &plans[t]
            if not v0:      # entry_digest packs u16 key lengths
                for i in range(plan.start, plan.start + plan.n):
                    if ents.items[i].key_len + 1 > 0xFFFF:
                        _U16.pack(ents.items[i].key_len + 1)
            if t == 0:
                peaks_held = peaks_as_bytes(peaks)      # aht_root(peaks)
                depth = len(peaks_held)
                ts_c = to_u64(ts)                       # inner_hash
                ver_c = to_u16(version)
                if ver_c > 1:
                    raise IllegalArgumentsError(f"unsupported tx header version {version}")
            if ver_c == 0 and plan.n > 0xFFFF:
                _U16.pack(plan.n)
            elif ver_c == 1 and plan.n > 0xFFFFFFFF:
                _U32.pack(plan.n)
            if t == 0:
                if int_u64(first_id, &first_c) and first_c >= 1:
                    bl0 = first_c - 1                   # bl_tx_id = id - 1
                else:
                    bl0 = to_u64(first_id - 1)
                if bl0 == UINT64_MAX:
                    _U64.pack(first_id)                 # alh packs the id
                prev_b = as_bytes(prev_alh)
            elif bl0 + <uint64_t>t < bl0 or bl0 + <uint64_t>t == UINT64_MAX:
                _U64.pack(first_id + t)
            for i in range(plan.start, plan.start + plan.n):   # _export_blob
                if ents.items[i].key_len + 1 > 0xFFFF:
                    _U16.pack(ents.items[i].key_len + 1)
                if ents.items[i].value_len + 1 > 0xFFFFFFFF:
                    _U32.pack(ents.items[i].value_len + 1)
            merges = trailing_ones(bl0 + <uint64_t>t)           # aht_append pops
            if merges > depth:
                raise IndexError("pop from empty list")
            depth += 1 - merges

        # 3. Lay out every record and allocate the results.
        records = [None] * ntx
        nodes_list = [None] * ntx
        stack_init(&stack, peaks_held, ntx, &stack_ptr_inline[0], &stack_size_inline[0])
        for t in range(ntx):
            plan = &plans[t]
            plan.hdr_len = (8 + (len(prev_b) if t == 0 else DIGEST) + 8 + 2
                            + (2 if ver_c == 0 else 6) + DIGEST + 8
                            + (stack.size[0] if t == 0 and stack.count == 1 else DIGEST))
            if plan.hdr_len > 0xFFFFFFFF:
                _U32.pack(plan.hdr_len)
            body = 0
            for i in range(plan.start, plan.start + plan.n):
                e = &ents.items[i]
                body += 2 + e.key_len + 1 + 2 + e.md_len + 4 + e.value_len + 1
            plan.blob_len = 4 + plan.hdr_len + body + 3
            rec = new_bytes(plan.blob_len + (plan.n + 1) * DIGEST)
            records[t] = rec
            plan.record = wptr(rec)
            merges = trailing_ones(bl0 + <uint64_t>t)
            nodes = new_bytes((merges + 1) * DIGEST)
            nodes_list[t] = nodes
            plan.nodes = wptr(nodes)
            blocks += (body >> 6) + 6 * plan.n + 8 + 2 * stack.count
        job.plans = plans
        job.ntx = ntx
        job.ents = ents.items
        job.stack = &stack
        job.level = &level_inline[0] if n_max <= 64 else <uchar*>checked_malloc(n_max * DIGEST)
        job.v0 = v0
        job.version = ver_c
        job.ts = ts_c
        job.bl_tx_id0 = bl0
        job.prev_alh = bptr(prev_b)
        job.prev_alh_len = len(prev_b)

        # 4. Hash and write.
        if blocks >= NOGIL_BLOCKS_MIN:
            with nogil:
                i = build_run(&job)
        else:
            i = build_run(&job)
        if i != 0:
            raise RuntimeError("immucore._native: AHT stack underflow after checking its depth")

        # 5. Results, then peaks in one step.
        out = []
        prev_obj = prev_b
        for t in range(ntx):
            plan = &plans[t]
            tx_id_obj = PyLong_FromUnsignedLongLong(bl0 + 1 + t)
            alh_obj = digest_bytes(plan.alh)
            if plan.bl_root_ptr == <const uchar*>plan.bl_root:
                root_obj = digest_bytes(plan.bl_root)
            else:   # tx 0 over a single peak that is not 32 bytes: aht_root returns it as it is
                root_obj = peaks_held[0]
            out.append(((tx_id_obj, prev_obj, ts, version, _EMPTY, plan.n,
                         digest_bytes(plan.eh), PyLong_FromUnsignedLongLong(bl0 + t), root_obj),
                        alh_obj, records[t], nodes_list[t]))
            prev_obj = alh_obj
        stack_store(&stack, peaks)
        return out
    finally:
        if job.level != &level_inline[0]:
            PyMem_Free(job.level)
        stack_free(&stack)
        objs_free(&held)
        ents_free(&ents)
        if plans != &plans_inline[0]:
            PyMem_Free(plans)


# --- replicate_blobs -----------------------------------------------------------------------------

cdef enum:
    REPLICA_OK = 0
    REPLICA_EH = 1
    REPLICA_ORDER = 2
    REPLICA_BL_TX_ID = 3
    REPLICA_BL_ROOT = 4
    REPLICA_PREV_ALH = 5
    REPLICA_STACK = 6


ctypedef struct BlobPlan:
    Header h
    const uchar* blob
    Py_ssize_t blob_len
    Py_ssize_t start
    Py_ssize_t n
    bint truncated
    uchar* record
    uchar* nodes
    uchar alh[DIGEST]


ctypedef struct ReplicaJob:
    BlobPlan* plans
    Py_ssize_t count            # blobs that parsed
    const Ent* ents
    PeakStack* stack
    uchar* level
    bint first_id_ok
    uint64_t first_id
    const uchar* prev_alh       # NULL when the caller's value is not bytes-like (never equal)
    Py_ssize_t prev_alh_len
    Py_ssize_t failed_at
    int failure


cdef void replica_run(ReplicaJob* job) noexcept nogil:
    """Check each blob against the chain in immudb's order (Eh, order, blTxID, blRoot, prevAlh)
    and seal it; stops at the first failure (job.failed_at, job.failure)."""
    cdef Py_ssize_t i
    cdef BlobPlan* plan
    cdef uint64_t tx_id
    cdef uchar eh[DIGEST]
    cdef uchar acc[DIGEST]
    cdef uchar inner[DIGEST]
    cdef const uchar* root
    cdef Py_ssize_t root_len
    cdef const uchar* chain = job.prev_alh
    cdef Py_ssize_t chain_len = job.prev_alh_len
    job.failure = REPLICA_OK
    for i in range(job.count):
        plan = &job.plans[i]
        job.failed_at = i
        eh_of_entries(plan.h.version == 0, job.ents + plan.start, plan.n, plan.truncated,
                      plan.record + plan.blob_len, job.level, eh)
        if memcmp(eh, plan.h.eh, DIGEST) != 0:
            job.failure = REPLICA_EH
            return
        tx_id = job.first_id + <uint64_t>i
        if not job.first_id_ok or tx_id < job.first_id or plan.h.id != tx_id:
            job.failure = REPLICA_ORDER
            return
        if plan.h.bl_tx_id != tx_id - 1:
            job.failure = REPLICA_BL_TX_ID
            return
        stack_root(job.stack, acc, &root, &root_len)
        if root_len != DIGEST or memcmp(root, plan.h.bl_root, DIGEST) != 0:
            job.failure = REPLICA_BL_ROOT
            return
        if chain is NULL or chain_len != DIGEST or memcmp(chain, plan.h.prev_alh, DIGEST) != 0:
            job.failure = REPLICA_PREV_ALH
            return
        alh_of_decoded(plan.blob + 4, get_u32(plan.blob), inner, plan.alh)
        if stack_append(job.stack, tx_id - 1, plan.alh, plan.nodes) != 0:
            job.failure = REPLICA_STACK
            return
        memcpy(plan.record, plan.blob, plan.blob_len)
        memcpy(plan.record + plan.blob_len + plan.n * DIGEST, plan.alh, DIGEST)
        chain = plan.alh
        chain_len = DIGEST


def replicate_blobs(blobs, first_id, prev_alh, peaks, limits):
    """Verify exported txs against the local chain and seal them, as ``build_txs`` does.

    Every blob is parsed first; the hashing and chain checks then run in C (without the GIL for
    big batches). ``peaks`` is written once, at the end, and only if every blob passed.
    """
    cdef tuple blob_list = tuple(blobs)
    cdef Py_ssize_t nb = len(blob_list)
    if nb == 0:
        return []
    cdef Limits lim = load_limits(limits)
    cdef list blob_bytes = [None] * nb
    cdef list records, nodes_list, out
    cdef object parse_error = None
    cdef bytes b, rec, nodes, prev_b = None
    cdef tuple peaks_held
    cdef EntBuf ents
    cdef PeakStack stack
    cdef ReplicaJob job
    cdef BlobPlan* plans = NULL
    cdef BlobPlan* plan
    cdef Py_ssize_t i, count, n_max = 0, blocks = 0
    cdef uint64_t tx_id
    cdef object tx_id_obj, alh_obj
    ents_init(&ents)
    stack.ptr = NULL
    stack.size = NULL
    stack.heap = False
    job.level = NULL
    try:
        plans = <BlobPlan*>checked_malloc(nb * sizeof(BlobPlan))
        # 1. Parse every blob up to the first that does not parse (its error is raised only if
        #    every blob before it passes its chain checks, as in a one-by-one loop).
        count = nb
        for i in range(nb):
            plan = &plans[i]
            try:
                b = as_bytes(blob_list[i])
                blob_bytes[i] = b
                plan.blob = bptr(b)
                plan.blob_len = len(b)
                plan.start = ents.count
                parse_blob(plan.blob, plan.blob_len, lim, &plan.h, &ents, &plan.truncated)
            except Exception as exc:
                parse_error = exc
                count = i
                break
            plan.n = ents.count - plan.start
            if plan.n > n_max:
                n_max = plan.n
            blocks += (plan.blob_len >> 6) + 6 * plan.n + 10
        # 2. The chain we extend.
        job.first_id_ok = int_u64(first_id, &job.first_id)
        try:
            prev_b = as_bytes(prev_alh)
            job.prev_alh = bptr(prev_b)
            job.prev_alh_len = len(prev_b)
        except TypeError:           # pure compares with !=: a non-bytes value is never equal
            job.prev_alh = NULL
            job.prev_alh_len = 0
        peaks_held = peaks_as_bytes(peaks)
        stack_init(&stack, peaks_held, count, NULL, NULL)
        # 3. Results to write into.
        records = [None] * count
        nodes_list = [None] * count
        for i in range(count):
            plan = &plans[i]
            rec = new_bytes(plan.blob_len + (plan.n + 1) * DIGEST)
            records[i] = rec
            plan.record = wptr(rec)
            tx_id = job.first_id + <uint64_t>i
            nodes = new_bytes((trailing_ones(tx_id - 1) + 1) * DIGEST if job.first_id_ok
                              else DIGEST)
            nodes_list[i] = nodes
            plan.nodes = wptr(nodes)
            blocks += 2 * stack.count
        job.plans = plans
        job.count = count
        job.ents = ents.items
        job.stack = &stack
        job.level = <uchar*>checked_malloc(n_max * DIGEST)
        # 4. Hash and check.
        if blocks >= NOGIL_BLOCKS_MIN:
            with nogil:
                replica_run(&job)
        else:
            replica_run(&job)
        if job.failure != REPLICA_OK:
            raise_replica_failure(&job, first_id)
        if parse_error is not None:
            raise parse_error
        # 5. Results, then peaks in one step.
        out = []
        for i in range(count):
            plan = &plans[i]
            alh_obj = digest_bytes(plan.alh)
            out.append((header_tuple(&plan.h), alh_obj, records[i], nodes_list[i]))
        stack_store(&stack, peaks)
        return out
    finally:
        PyMem_Free(job.level)
        stack_free(&stack)
        ents_free(&ents)
        PyMem_Free(plans)


cdef int raise_replica_failure(ReplicaJob* job, object first_id) except -1:
    cdef Py_ssize_t i = job.failed_at
    cdef Header* h = &job.plans[i].h
    cdef object tx_id = first_id if i == 0 else first_id + i
    if job.failure == REPLICA_EH:
        raise IllegalArgumentsError(f"entries hash (Eh) differs at tx {h.id}")
    if job.failure == REPLICA_ORDER:
        raise IllegalArgumentsError(
            f"attempt to commit a tx in wrong order: expected tx {tx_id}, got tx {h.id}")
    if job.failure == REPLICA_BL_TX_ID:
        raise IllegalArgumentsError(
            f"tx {tx_id} links to bl_tx_id {h.bl_tx_id}; immucore requires bl_tx_id = id - 1")
    if job.failure == REPLICA_BL_ROOT:
        raise IllegalArgumentsError(f"attempt to commit a tx with invalid blRoot at tx {tx_id}")
    if job.failure == REPLICA_PREV_ALH:
        raise IllegalArgumentsError(f"attempt to commit a tx with invalid prevAlh at tx {tx_id}")
    raise IndexError("pop from empty list")
