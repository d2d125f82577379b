# The commonest requests' fixed-shape bodies, read and written in C: a plain GET's key and its
# entry answer on the node; a SET's header answer on the node and read back by the client; a
# SET's request from the client. The twins of immucore/protocol/answers.py's pure
# functions (the reference the tests compare against: same keys, same bytes).
#
# A pipelined burst of reads is made of plain GETs, and without these the per-request msgpack
# work (building the answer's two maps, packing them, framing the result) was a quarter of the
# event loop's time per get; a SET's answer cost 2.3 us of the loop, 0.2 us here. The layouts
# are fixed, so they are written directly, with msgpack's smallest encodings, as
# msgpack-python's packer writes them (use_bin_type=True).

# {"entry": {"_t": "Entry", "tx": ...: fixmap(1), fixstr "entry", fixmap(6), "_t", "Entry", "tx"
_ANSWER_HEAD = b"\x81\xa5entry\x86\xa2_t\xa5Entry\xa2tx"
_ANSWER_KEY = b"\xa3key"
_ANSWER_VALUE = b"\xa5value"
_ANSWER_NO_METADATA = b"\xa8metadata\xc0"      # "metadata": nil
_ANSWER_REVISION = b"\xa8revision"
_PLAIN_GET_HEAD = b"\x81\xa3key"              # a plain GET's body: fixmap(1), fixstr "key"

cdef enum:
    MP_FIXINT_MAX = 0x7F
    MP_UINT8 = 0xCC
    MP_UINT16 = 0xCD
    MP_UINT32 = 0xCE
    MP_UINT64 = 0xCF
    MP_BIN8 = 0xC4
    MP_BIN16 = 0xC5
    MP_BIN32 = 0xC6


cdef inline Py_ssize_t mp_uint_size(uint64_t v) noexcept:
    if v <= MP_FIXINT_MAX:
        return 1
    if v <= 0xFF:
        return 2
    if v <= 0xFFFF:
        return 3
    if v <= 0xFFFFFFFF:
        return 5
    return 9


cdef inline uchar* mp_put_uint(uchar* p, uint64_t v) noexcept:
    if v <= MP_FIXINT_MAX:
        p[0] = <uchar>v
        return p + 1
    if v <= 0xFF:
        p[0] = MP_UINT8
        p[1] = <uchar>v
        return p + 2
    if v <= 0xFFFF:
        p[0] = MP_UINT16
        put_u16(p + 1, <unsigned int>v)
        return p + 3
    if v <= 0xFFFFFFFF:
        p[0] = MP_UINT32
        put_u32(p + 1, <uint32_t>v)
        return p + 5
    p[0] = MP_UINT64
    put_u64(p + 1, v)
    return p + 9


cdef inline Py_ssize_t mp_bin_size(Py_ssize_t n) noexcept:
    return n + (2 if n <= 0xFF else 3 if n <= 0xFFFF else 5)


cdef inline uchar* mp_put_bin(uchar* p, const uchar* data, Py_ssize_t n) noexcept:
    if n <= 0xFF:
        p[0] = MP_BIN8
        p[1] = <uchar>n
        p += 2
    elif n <= 0xFFFF:
        p[0] = MP_BIN16
        put_u16(p + 1, <unsigned int>n)
        p += 3
    else:
        p[0] = MP_BIN32
        put_u32(p + 1, <uint32_t>n)
        p += 5
    if n:
        memcpy(p, data, n)
    return p + n


cdef inline bint plain_frame_ids(object msg_type, object request_id) noexcept:
    """Exact ints in range: frame_fields then runs no Python code (an ``__index__`` could change
    the arguments between sizing a frame and filling it)."""
    cdef unsigned long long unused
    return exact_uint(msg_type, 0xFF, &unused) and exact_uint(request_id, UINT64_MAX, &unused)


cdef inline uchar* put_raw(uchar* p, bytes raw) noexcept:
    memcpy(p, bptr(raw), PyBytes_GET_SIZE(raw))
    return p + PyBytes_GET_SIZE(raw)


def plain_get_key(body):
    """The key of a plain GET's body (exactly ``{"key": <bin>}``), or None for any other."""
    cdef InBuf b
    cdef Py_ssize_t start, length
    inbuf_get(body, &b)
    try:
        if b.n < 6 or memcmp(b.p, bptr(_PLAIN_GET_HEAD), 5) != 0:
            return None
        if b.p[5] == MP_BIN8 and b.n >= 7:
            start, length = 7, b.p[6]
        elif b.p[5] == MP_BIN16 and b.n >= 8:
            start, length = 8, get_u16(b.p + 6)
        elif b.p[5] == MP_BIN32 and b.n >= 10:
            start, length = 10, get_u32(b.p + 6)
        else:
            return None
        if length != b.n - start:
            return None                  # short, or more follows the key: not a plain GET
        return slice_bytes(b.p + start, length)
    finally:
        inbuf_release(&b)


def encode_entry_answer(msg_type, request_id, tx, key, value, revision):
    """The answer frame of a GET whose entry has no metadata: ``encode_frame(msg_type, 0,
    request_id, pack({"entry": {"_t": "Entry", "tx": tx, "key": key, "value": value,
    "metadata": None, "revision": revision}}))``. Arguments other than exact ints in range and
    bytes-like key and value go to that pure twin, for its result or its error."""
    cdef unsigned long long tx_id, rev
    cdef FrameFields f
    cdef InBuf k, v
    cdef Py_ssize_t body_len
    cdef bytes frame
    cdef uchar* p
    if not (plain_frame_ids(msg_type, request_id)
            and exact_uint(tx, UINT64_MAX, &tx_id) and exact_uint(revision, UINT64_MAX, &rev)
            and (PyBytes_Check(key) or PyObject_CheckBuffer(key))
            and (PyBytes_Check(value) or PyObject_CheckBuffer(value))):
        from immucore.protocol.answers import pure_encode_entry_answer
        return pure_encode_entry_answer(msg_type, request_id, tx, key, value, revision)
    inbuf_get(key, &k)
    try:
        inbuf_get(value, &v)
        try:
            # each under 256 MiB, so the sum below stays far from even a 32-bit Py_ssize_t's
            # limit; bigger ones (never a node's: values are at most 32 MiB) go to the pure one
            if k.n > 0xFFFFFFF or v.n > 0xFFFFFFF:
                from immucore.protocol.answers import pure_encode_entry_answer
                return pure_encode_entry_answer(msg_type, request_id, tx, key, value, revision)
            body_len = (PyBytes_GET_SIZE(_ANSWER_HEAD) + mp_uint_size(tx_id)
                        + PyBytes_GET_SIZE(_ANSWER_KEY) + mp_bin_size(k.n)
                        + PyBytes_GET_SIZE(_ANSWER_VALUE) + mp_bin_size(v.n)
                        + PyBytes_GET_SIZE(_ANSWER_NO_METADATA)
                        + PyBytes_GET_SIZE(_ANSWER_REVISION) + mp_uint_size(rev))
            frame_fields(&f, msg_type, 0, request_id, body_len)
            frame = new_bytes(FRAME_HEADER + body_len)
            p = wptr(frame) + FRAME_HEADER
            p = put_raw(p, _ANSWER_HEAD)
            p = mp_put_uint(p, tx_id)
            p = put_raw(p, _ANSWER_KEY)
            p = mp_put_bin(p, k.p, k.n)
            p = put_raw(p, _ANSWER_VALUE)
            p = mp_put_bin(p, v.p, v.n)
            p = put_raw(p, _ANSWER_NO_METADATA)
            p = put_raw(p, _ANSWER_REVISION)
            mp_put_uint(p, rev)
        finally:
            inbuf_release(&v)
    finally:
        inbuf_release(&k)
    write_frame_header(wptr(frame), &f)
    return frame


# {"header": {"_t": "TxHeader", "id": ...: fixmap(1), fixstr "header", fixmap(10), "_t",
# "TxHeader", then the fields in TxHeader's order, each name a fixstr
_HEADER_ANSWER_HEAD = b"\x81\xa6header\x8a\xa2_t\xa8TxHeader"
_HEADER_FIELD_NAMES = (b"\xa2id", b"\xa8prev_alh", b"\xa2ts", b"\xa7version", b"\xa8metadata",
                       b"\xa8nentries", b"\xa2eh", b"\xa8bl_tx_id", b"\xa7bl_root")
cdef enum:
    HEADER_FIELDS = 9
# which of them are integers (the rest are byte strings)
cdef bint _HEADER_FIELD_IS_INT[HEADER_FIELDS]
_HEADER_FIELD_IS_INT[:] = [True, False, True, True, False, True, False, True, False]


def encode_header_answer(msg_type, request_id, header):
    """The answer frame of a SET: ``encode_frame(msg_type, 0, request_id, pack({"header":
    header_to_wire(header)}))`` for the writer's 9-field header tuple. A header whose fields are
    not exact ints in range and bytes where TxHeader has them goes to that pure twin, for its
    result or its error."""
    cdef unsigned long long ints[HEADER_FIELDS]
    cdef FrameFields f
    cdef Py_ssize_t body_len, i
    cdef bytes frame, raw
    cdef uchar* p
    if not (type(header) is tuple and len(header) == HEADER_FIELDS
            and plain_frame_ids(msg_type, request_id)):
        return _pure_header_answer(msg_type, request_id, header)
    body_len = PyBytes_GET_SIZE(_HEADER_ANSWER_HEAD)
    for i in range(HEADER_FIELDS):
        body_len += PyBytes_GET_SIZE(<bytes>_HEADER_FIELD_NAMES[i])
        value = header[i]
        if _HEADER_FIELD_IS_INT[i]:
            if not exact_uint(value, UINT64_MAX, &ints[i]):
                return _pure_header_answer(msg_type, request_id, header)
            body_len += mp_uint_size(ints[i])
        else:
            # (under 256 MiB each, as for an entry: the sum cannot wrap)
            if not PyBytes_CheckExact(value) or PyBytes_GET_SIZE(<bytes>value) > 0xFFFFFFF:
                return _pure_header_answer(msg_type, request_id, header)
            body_len += mp_bin_size(PyBytes_GET_SIZE(<bytes>value))
    frame_fields(&f, msg_type, 0, request_id, body_len)
    frame = new_bytes(FRAME_HEADER + body_len)
    p = put_raw(wptr(frame) + FRAME_HEADER, _HEADER_ANSWER_HEAD)
    for i in range(HEADER_FIELDS):
        p = put_raw(p, <bytes>_HEADER_FIELD_NAMES[i])
        if _HEADER_FIELD_IS_INT[i]:
            p = mp_put_uint(p, ints[i])
        else:
            raw = <bytes>header[i]
            p = mp_put_bin(p, bptr(raw), PyBytes_GET_SIZE(raw))
    write_frame_header(wptr(frame), &f)
    return frame


def _pure_header_answer(msg_type, request_id, header):
    from immucore.protocol.answers import pure_encode_header_answer
    return pure_encode_header_answer(msg_type, request_id, header)


def decode_header_answer(body):
    """The header tuple of a SET's answer body laid out as ``encode_header_answer`` writes it
    (any of msgpack's unsigned int and bin widths), or None for any other body."""
    cdef InBuf b
    cdef Py_ssize_t at, n, i, width
    cdef const uchar* p
    cdef uchar tag
    cdef uint64_t number
    cdef bytes name
    cdef list fields = []
    inbuf_get(body, &b)
    try:
        p, n = b.p, b.n
        at = PyBytes_GET_SIZE(_HEADER_ANSWER_HEAD)
        if n < at or memcmp(p, bptr(_HEADER_ANSWER_HEAD), at) != 0:
            return None
        for i in range(HEADER_FIELDS):
            name = <bytes>_HEADER_FIELD_NAMES[i]
            if (n - at <= PyBytes_GET_SIZE(name)
                    or memcmp(p + at, bptr(name), PyBytes_GET_SIZE(name)) != 0):
                return None
            at += PyBytes_GET_SIZE(name)
            tag = p[at]
            at += 1
            if _HEADER_FIELD_IS_INT[i] and tag <= MP_FIXINT_MAX:
                fields.append(tag)
                continue
            if _HEADER_FIELD_IS_INT[i]:
                width = (1 if tag == MP_UINT8 else 2 if tag == MP_UINT16
                         else 4 if tag == MP_UINT32 else 8 if tag == MP_UINT64 else 0)
            else:
                width = (1 if tag == MP_BIN8 else 2 if tag == MP_BIN16
                         else 4 if tag == MP_BIN32 else 0)
            if width == 0 or n - at < width:
                return None
            number = (p[at] if width == 1 else get_u16(p + at) if width == 2
                      else get_u32(p + at) if width == 4 else get_u64(p + at))
            at += width
            if _HEADER_FIELD_IS_INT[i]:
                fields.append(PyLong_FromUnsignedLongLong(number))
                continue
            if number > <uint64_t>(n - at):
                return None
            fields.append(slice_bytes(p + at, <Py_ssize_t>number))
            at += <Py_ssize_t>number
        if at != n:
            return None
        return tuple(fields)
    finally:
        inbuf_release(&b)


# {"kvs_flat": [...]}: fixmap(1), fixstr "kvs_flat"
_FLAT_SET_HEAD = b"\x81\xa8kvs_flat"

cdef enum:
    MP_FIXARRAY = 0x90
    MP_FIXARRAY_MAX = 15
    MP_ARRAY16 = 0xDC
    MP_ARRAY32 = 0xDD


def encode_flat_set_request(msg_type, request_id, kvs_flat):
    """A SET request's frame from a list of keys and values (``[k1, v1, k2, v2, ...]``, all
    exactly bytes): ``encode_frame(msg_type, 0, request_id, pack({"kvs_flat": kvs_flat}))``.
    Anything else goes to that pure twin, for its result or its error."""
    cdef FrameFields f
    cdef Py_ssize_t i, count
    cdef uint64_t body_len
    cdef tuple items
    cdef bytes frame, item
    cdef uchar* p
    if not (type(kvs_flat) is list and plain_frame_ids(msg_type, request_id)):
        return _pure_flat_set_request(msg_type, request_id, kvs_flat)
    items = tuple(kvs_flat)        # sized and copied from one snapshot of the list
    count = len(items)
    body_len = (PyBytes_GET_SIZE(_FLAT_SET_HEAD)
                + (1 if count <= MP_FIXARRAY_MAX else 3 if count <= 0xFFFF else 5))
    for i in range(count):
        if not PyBytes_CheckExact(items[i]):
            return _pure_flat_set_request(msg_type, request_id, kvs_flat)
        body_len += <uint64_t>mp_bin_size(PyBytes_GET_SIZE(<bytes>items[i]))
        if body_len > 0xFFFFFFFF:        # past a frame's length field: the pure one's error
            return _pure_flat_set_request(msg_type, request_id, kvs_flat)
    frame_fields(&f, msg_type, 0, request_id, <Py_ssize_t>body_len)
    frame = new_bytes(FRAME_HEADER + <Py_ssize_t>body_len)
    p = put_raw(wptr(frame) + FRAME_HEADER, _FLAT_SET_HEAD)
    if count <= MP_FIXARRAY_MAX:
        p[0] = <uchar>(MP_FIXARRAY | count)
        p += 1
    elif count <= 0xFFFF:
        p[0] = MP_ARRAY16
        put_u16(p + 1, <unsigned int>count)
        p += 3
    else:
        p[0] = MP_ARRAY32
        put_u32(p + 1, <uint32_t>count)
        p += 5
    for i in range(count):
        item = <bytes>items[i]
        p = mp_put_bin(p, bptr(item), PyBytes_GET_SIZE(item))
    write_frame_header(wptr(frame), &f)
    return frame


def _pure_flat_set_request(msg_type, request_id, kvs_flat):
    from immucore.protocol.answers import pure_encode_flat_set_request
    return pure_encode_flat_set_request(msg_type, request_id, kvs_flat)
