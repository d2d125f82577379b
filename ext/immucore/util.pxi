# Byte order, integer conversion, bytes at the boundary, limits, small growable arrays.

_U16 = _struct.Struct(">H")
_U32 = _struct.Struct(">I")
_U64 = _struct.Struct(">Q")

cdef bytes _EMPTY = b""


# --- big-endian fields ---------------------------------------------------------------------------

cdef inline void put_u16(uchar* p, unsigned int v) noexcept nogil:
    p[0] = <uchar>(v >> 8)
    p[1] = <uchar>v


cdef inline void put_u32(uchar* p, uint32_t v) noexcept nogil:
    p[0] = <uchar>(v >> 24)
    p[1] = <uchar>(v >> 16)
    p[2] = <uchar>(v >> 8)
    p[3] = <uchar>v


cdef inline void put_u64(uchar* p, uint64_t v) noexcept nogil:
    put_u32(p, <uint32_t>(v >> 32))
    put_u32(p + 4, <uint32_t>v)


cdef inline unsigned int get_u16(const uchar* p) noexcept nogil:
    return (<unsigned int>p[0] << 8) | p[1]


cdef inline uint32_t get_u32(const uchar* p) noexcept nogil:
    return ((<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8)
            | <uint32_t>p[3])


cdef inline uint64_t get_u64(const uchar* p) noexcept nogil:
    return (<uint64_t>get_u32(p) << 32) | get_u32(p + 4)


cdef inline int trailing_ones(uint64_t v) noexcept nogil:
    cdef int n = 0
    while v & 1:
        n += 1
        v >>= 1
    return n


# --- integers from Python, with struct's own errors ----------------------------------------------
# The pure codec packs integers with struct, so an out-of-range or non-integer value raises
# struct.error with struct's message. The fast path reads exact ints; anything else goes through
# the same Struct so the error (or the accepted __index__ value) is identical.

cdef extern from "Python.h":
    unsigned long long _long_as_u64 "PyLong_AsUnsignedLongLong"(object v)
    PyObject* PyErr_Occurred()
    void PyErr_Clear()
    object PyNumber_Index(object v)


cdef uint64_t to_u64(object v) except? 0xFFFFFFFFFFFFFFFF:
    cdef unsigned long long r
    if PyLong_CheckExact(v):
        r = _long_as_u64(v)
        if r != <unsigned long long>-1 or PyErr_Occurred() is NULL:
            return r
        PyErr_Clear()
    _U64.pack(v)                # raises struct.error exactly as the pure codec would
    return _long_as_u64(PyNumber_Index(v))


cdef unsigned int to_u16(object v) except? 0xFFFFFFFF:
    cdef unsigned long long r
    if PyLong_CheckExact(v):
        r = _long_as_u64(v)
        if r <= 0xFFFF and (r != <unsigned long long>-1 or PyErr_Occurred() is NULL):
            return <unsigned int>r
        PyErr_Clear()
    _U16.pack(v)
    return <unsigned int>_long_as_u64(PyNumber_Index(v))


cdef uint32_t to_u32(object v) except? 0xFFFFFFFF:
    cdef unsigned long long r
    if PyLong_CheckExact(v):
        r = _long_as_u64(v)
        if r <= 0xFFFFFFFF and (r != <unsigned long long>-1 or PyErr_Occurred() is NULL):
            return <uint32_t>r
        PyErr_Clear()
    _U32.pack(v)
    return <uint32_t>_long_as_u64(PyNumber_Index(v))


cdef bint int_u64(object v, uint64_t* out):
    """True (and the value) when ``v`` is an int in [0, 2**64): for ids compared, not packed."""
    cdef unsigned long long r
    if not PyLong_Check(v):
        return False
    r = _long_as_u64(v)
    if r == <unsigned long long>-1 and PyErr_Occurred() is not NULL:
        PyErr_Clear()
        return False
    out[0] = r
    return True


# --- bytes at the boundary -----------------------------------------------------------------------

cdef bytes _copy_buffer(object obj):
    cdef Py_buffer view
    PyObject_GetBuffer(obj, &view, PyBUF_SIMPLE)   # TypeError for anything not bytes-like
    try:
        return PyBytes_FromStringAndSize(<char*>view.buf, view.len)
    finally:
        PyBuffer_Release(&view)


cdef inline bytes as_bytes(object obj):
    """``obj`` as a bytes object (itself when it already is one): what pointers are taken from."""
    if PyBytes_CheckExact(obj):
        return <bytes>obj
    if PyBytes_Check(obj):
        return PyBytes_FromStringAndSize(PyBytes_AS_STRING(obj), PyBytes_GET_SIZE(obj))
    return _copy_buffer(obj)


# Read-only input without a copy: bytes directly, anything else through a held buffer view
# (a memoryview from an LMDB read transaction, a bytearray that cannot be resized meanwhile).
ctypedef struct InBuf:
    const uchar* p
    Py_ssize_t n
    Py_buffer view
    bint has_view


cdef int inbuf_get(object obj, InBuf* b) except -1:
    b.has_view = False
    if PyBytes_Check(obj):
        b.p = <const uchar*>PyBytes_AS_STRING(obj)
        b.n = PyBytes_GET_SIZE(obj)
        return 0
    PyObject_GetBuffer(obj, &b.view, PyBUF_SIMPLE)  # TypeError for anything not bytes-like
    b.has_view = True
    b.p = <const uchar*>b.view.buf
    b.n = b.view.len
    return 0


cdef inline void inbuf_release(InBuf* b) noexcept:
    if b.has_view:
        PyBuffer_Release(&b.view)
        b.has_view = False


cdef inline const uchar* bptr(bytes b) noexcept:
    return <const uchar*>PyBytes_AS_STRING(b)


cdef inline bytes new_bytes(Py_ssize_t size):
    """An uninitialised bytes object to write into before anyone else sees it."""
    return PyBytes_FromStringAndSize(NULL, size)


cdef inline uchar* wptr(bytes b) noexcept:
    return <uchar*>PyBytes_AS_STRING(b)


cdef inline bytes digest_bytes(const uchar* p):
    return PyBytes_FromStringAndSize(<const char*>p, DIGEST)


cdef inline bytes slice_bytes(const uchar* p, Py_ssize_t n):
    if n == 0:
        return _EMPTY
    return PyBytes_FromStringAndSize(<const char*>p, n)


# --- limits (entries per tx, key bytes, value bytes) ---------------------------------------------

cdef extern from "Python.h":
    long long _long_as_ll_overflow "PyLong_AsLongLongAndOverflow"(object v, int* overflow) except? -1


cdef long long clamp_limit(object v) except? -2:
    """A limit as a C integer that compares with every length exactly as the Python value does."""
    cdef int overflow = 0
    cdef long long r
    if not PyLong_Check(v):
        v = _math.floor(v)          # `n > 2.5` is `n > 2` for integer n; TypeError as in pure
    r = _long_as_ll_overflow(v, &overflow)
    if overflow > 0 or r > (1LL << 62):
        return 1LL << 62
    if overflow < 0 or r < 0:
        return -1
    return r


@cython.final
cdef class Limits:
    cdef long long entries_max
    cdef long long key_max
    cdef long long value_max
    cdef object entries_max_obj     # the caller's values, for error messages
    cdef object key_max_obj
    cdef object value_max_obj


cdef Limits load_limits(object limits):
    cdef Limits lim = Limits.__new__(Limits)
    lim.entries_max_obj, lim.key_max_obj, lim.value_max_obj = limits
    lim.entries_max = clamp_limit(lim.entries_max_obj)
    lim.key_max = clamp_limit(lim.key_max_obj)
    lim.value_max = clamp_limit(lim.value_max_obj)
    return lim


# --- small growable arrays -----------------------------------------------------------------------

cdef inline void ents_init(EntBuf* b) noexcept:
    b.items = b.inline
    b.count = 0
    b.cap = 16


cdef int ents_reserve(EntBuf* b, Py_ssize_t extra) except -1:
    cdef Py_ssize_t want = b.count + extra
    cdef Py_ssize_t cap = b.cap
    cdef Ent* items
    if want <= cap:
        return 0
    while cap < want:
        cap *= 2
    if b.items == b.inline:
        items = <Ent*>PyMem_Malloc(cap * sizeof(Ent))
        if items is NULL:
            raise MemoryError()
        memcpy(items, b.inline, b.count * sizeof(Ent))
    else:
        items = <Ent*>PyMem_Realloc(b.items, cap * sizeof(Ent))
        if items is NULL:
            raise MemoryError()
    b.items = items
    b.cap = cap
    return 0


cdef inline void ents_free(EntBuf* b) noexcept:
    if b.items != b.inline:
        PyMem_Free(b.items)
    b.items = b.inline
    b.count = 0
    b.cap = 16


cdef void* checked_malloc(size_t size) except NULL:
    cdef void* p = PyMem_Malloc(size if size else 1)
    if p is NULL:
        raise MemoryError()
    return p


# Object references held across a nogil section: the bytes objects whose memory C pointers use.
# Room for a 10-entry tx inline; more goes to the heap.
cdef enum:
    OBJVEC_INLINE = 48


ctypedef struct ObjVec:
    PyObject** items
    Py_ssize_t count
    Py_ssize_t cap
    PyObject* inline[OBJVEC_INLINE]


cdef inline void objs_init(ObjVec* v) noexcept:
    v.items = v.inline
    v.count = 0
    v.cap = OBJVEC_INLINE


cdef int objs_push(ObjVec* v, object obj) except -1:
    cdef Py_ssize_t cap
    cdef PyObject** items
    if v.count == v.cap:
        cap = v.cap * 2
        if v.items == v.inline:
            items = <PyObject**>PyMem_Malloc(cap * sizeof(PyObject*))
            if items is not NULL:
                memcpy(items, v.inline, v.count * sizeof(PyObject*))
        else:
            items = <PyObject**>PyMem_Realloc(v.items, cap * sizeof(PyObject*))
        if items is NULL:
            raise MemoryError()
        v.items = items
        v.cap = cap
    Py_INCREF(obj)
    v.items[v.count] = <PyObject*>obj
    v.count += 1
    return 0


cdef void objs_free(ObjVec* v) noexcept:
    cdef Py_ssize_t i
    for i in range(v.count):
        Py_DECREF(<object>v.items[i])
    if v.items != v.inline:
        PyMem_Free(v.items)
    objs_init(v)
