# Frames of the wire protocol (docs/wire-protocol.md): XXH64, encode_frame and FrameDecoder.
#
# The twins of immucore/protocol/frames.py's pure encoder and decoder (the reference the tests
# compare against): the same bytes out, the same frames, and the same ProtocolError (code and
# message) raised at the same byte, in the same order of checks. Every request and answer of the
# node passes through here on the event loop's thread, so the per-frame work is C: one bytes
# object per encoded frame, one per decoded body, and one tuple per frame.

from libc.string cimport memmove

from immucore.constants import (FRAME_HEADER_SIZE as _FRAME_HEADER_SIZE_PY,
                                FRAME_MAGIC as _FRAME_MAGIC_PY,
                                PROTOCOL_VERSION as _PROTOCOL_VERSION_PY)
from immucore.errors import ProtocolError

cdef extern from *:
    """
    /* XXH64, written from the xxHash specification (XXH64 algorithm description: five primes,
       four lanes over 32-byte stripes, merge rounds, 8/4/1-byte tail, avalanche). Input words are
       little-endian; they are loaded with memcpy, which compilers turn into one load on targets
       that allow unaligned access and into safe code elsewhere. */
    #include <stdint.h>
    #include <string.h>

    #define IMC_XXH_PRIME1 0x9E3779B185EBCA87ULL
    #define IMC_XXH_PRIME2 0xC2B2AE3D27D4EB4FULL
    #define IMC_XXH_PRIME3 0x165667B19E3779F9ULL
    #define IMC_XXH_PRIME4 0x85EBCA77C2B2AE63ULL
    #define IMC_XXH_PRIME5 0x27D4EB2F165667C5ULL

    static const unsigned char imc_frame_magic[4] = {'I', 'M', 'C', '1'};

    static inline uint64_t imc_rotl64(uint64_t x, int r) {
        return (x << r) | (x >> (64 - r));
    }

    static inline uint64_t imc_load_le64(const unsigned char* p) {
    #if defined(__GNUC__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
        uint64_t v;
        memcpy(&v, p, 8);
        return v;
    #elif defined(__GNUC__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        uint64_t v;
        memcpy(&v, p, 8);
        return __builtin_bswap64(v);
    #else
        return (uint64_t)p[0] | ((uint64_t)p[1] << 8) | ((uint64_t)p[2] << 16)
               | ((uint64_t)p[3] << 24) | ((uint64_t)p[4] << 32) | ((uint64_t)p[5] << 40)
               | ((uint64_t)p[6] << 48) | ((uint64_t)p[7] << 56);
    #endif
    }

    static inline uint32_t imc_load_le32(const unsigned char* p) {
    #if defined(__GNUC__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
        uint32_t v;
        memcpy(&v, p, 4);
        return v;
    #elif defined(__GNUC__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        uint32_t v;
        memcpy(&v, p, 4);
        return __builtin_bswap32(v);
    #else
        return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16)
               | ((uint32_t)p[3] << 24);
    #endif
    }

    /* One lane's step: the spec's round(accN, laneN). */
    static inline uint64_t imc_xxh64_round(uint64_t acc, uint64_t lane) {
        acc += lane * IMC_XXH_PRIME2;
        acc = imc_rotl64(acc, 31);
        return acc * IMC_XXH_PRIME1;
    }

    /* The spec's mergeAccumulator(acc, accN): folds one lane into the converged accumulator. */
    static inline uint64_t imc_xxh64_merge(uint64_t acc, uint64_t lane_acc) {
        acc ^= imc_xxh64_round(0, lane_acc);
        return acc * IMC_XXH_PRIME1 + IMC_XXH_PRIME4;
    }

    /* Steps 1-3 for input of at least 32 bytes: the four lanes over every whole stripe, then
       converged. *pp advances past the stripes; the tail is left to the caller. */
    static inline uint64_t imc_xxh64_stripes(const unsigned char** pp, size_t n, uint64_t seed) {
        const unsigned char* p = *pp;
        const unsigned char* stripes_end = p + (n & ~(size_t)31);
        uint64_t v1 = seed + IMC_XXH_PRIME1 + IMC_XXH_PRIME2;
        uint64_t v2 = seed + IMC_XXH_PRIME2;
        uint64_t v3 = seed;
        uint64_t v4 = seed - IMC_XXH_PRIME1;
        uint64_t acc;
        do {
            v1 = imc_xxh64_round(v1, imc_load_le64(p));
            v2 = imc_xxh64_round(v2, imc_load_le64(p + 8));
            v3 = imc_xxh64_round(v3, imc_load_le64(p + 16));
            v4 = imc_xxh64_round(v4, imc_load_le64(p + 24));
            p += 32;
        } while (p < stripes_end);
        acc = imc_rotl64(v1, 1) + imc_rotl64(v2, 7) + imc_rotl64(v3, 12) + imc_rotl64(v4, 18);
        acc = imc_xxh64_merge(acc, v1);
        acc = imc_xxh64_merge(acc, v2);
        acc = imc_xxh64_merge(acc, v3);
        acc = imc_xxh64_merge(acc, v4);
        *pp = p;
        return acc;
    }

    /* Step 5: the last 0..31 bytes, as 8-byte, then one 4-byte, then single-byte pieces. */
    static inline uint64_t imc_xxh64_tail(uint64_t acc, const unsigned char* p,
                                          const unsigned char* end) {
        while (end - p >= 8) {
            acc ^= imc_xxh64_round(0, imc_load_le64(p));
            acc = imc_rotl64(acc, 27) * IMC_XXH_PRIME1 + IMC_XXH_PRIME4;
            p += 8;
        }
        if (end - p >= 4) {
            acc ^= (uint64_t)imc_load_le32(p) * IMC_XXH_PRIME1;
            acc = imc_rotl64(acc, 23) * IMC_XXH_PRIME2 + IMC_XXH_PRIME3;
            p += 4;
        }
        while (p < end) {
            acc ^= (uint64_t)(*p) * IMC_XXH_PRIME5;
            acc = imc_rotl64(acc, 11) * IMC_XXH_PRIME1;
            p++;
        }
        return acc;
    }

    /* Step 6: the final mix, so every input bit reaches every output bit. */
    static inline uint64_t imc_xxh64_avalanche(uint64_t acc) {
        acc ^= acc >> 33;
        acc *= IMC_XXH_PRIME2;
        acc ^= acc >> 29;
        acc *= IMC_XXH_PRIME3;
        acc ^= acc >> 32;
        return acc;
    }

    static uint64_t imc_xxh64(const unsigned char* p, size_t n, uint64_t seed) {
        const unsigned char* end = p + n;
        uint64_t acc = n >= 32 ? imc_xxh64_stripes(&p, n, seed) : seed + IMC_XXH_PRIME5;
        acc += (uint64_t)n;                                  /* step 4 */
        return imc_xxh64_avalanche(imc_xxh64_tail(acc, p, end));
    }
    """
    const uchar imc_frame_magic[4]
    uint64_t imc_xxh64(const uchar* p, size_t n, uint64_t seed) nogil


cdef enum:
    FRAME_HEADER = 40               # FRAME_HEADER_SIZE
    FRAME_HASHED_HEADER = 32        # the header bytes header_hash covers
    FRAME_MAGIC_SIZE = 4
    FRAME_VERSION = 1               # PROTOCOL_VERSION
    # Header field offsets (immucore/protocol/frames.py has the table).
    FRAME_AT_VERSION = 4
    FRAME_AT_MSG_TYPE = 5
    FRAME_AT_FLAGS = 6
    FRAME_AT_REQUEST_ID = 8
    FRAME_AT_BODY_LEN = 16
    FRAME_AT_RESERVED = 20
    FRAME_AT_BODY_HASH = 24
    FRAME_AT_HEADER_HASH = 32
    # Bytes from which a hash runs without the GIL: ~100 us of XXH64, so the writer's and the
    # readers' threads go on while a large body is hashed; below it the switch costs more.
    XXH_NOGIL_BYTES_MIN = 1 << 20
    # The decoder's buffer: its first allocation, and the capacity it keeps between frames (more
    # is given back once the large frame that needed it has been returned).
    DECODER_BUFFER_MIN = 4096
    DECODER_BUFFER_KEEP = 64 << 10

_BAD_MAGIC = "not an immucore frame (bad magic)"
_BAD_HEADER_CHECKSUM = "frame header checksum mismatch"
_BAD_RESERVED = "reserved header bytes must be zero"
_BAD_BODY_CHECKSUM = "frame body checksum mismatch"

# The pure encoder's struct for bytes 0..23: arguments that are not plain ints in range go through
# it, so they raise its struct.error (or are accepted, e.g. a bool) exactly as there.
_FRAME_HEAD = _struct.Struct(">4sBBHQII")


def _check_frame_constants():
    for name, mine, theirs in (("FRAME_HEADER_SIZE", FRAME_HEADER, _FRAME_HEADER_SIZE_PY),
                               ("PROTOCOL_VERSION", FRAME_VERSION, _PROTOCOL_VERSION_PY),
                               ("FRAME_MAGIC", (<const char*>imc_frame_magic)[:FRAME_MAGIC_SIZE],
                                _FRAME_MAGIC_PY)):
        if mine != theirs:
            raise ImportError(f"immucore._native was built with {name}={mine!r} but "
                              f"immucore.constants says {theirs!r}; rebuild the extension")


_check_frame_constants()


# --- XXH64 ---------------------------------------------------------------------------------------

cdef uint64_t xxh64_of(const uchar* p, Py_ssize_t n) noexcept:
    """XXH64 (seed 0) of memory nobody else can change or free while the GIL is released."""
    cdef uint64_t h
    if n < XXH_NOGIL_BYTES_MIN:
        return imc_xxh64(p, n, 0)
    with nogil:
        h = imc_xxh64(p, n, 0)
    return h


def xxh64_intdigest(data, uint64_t seed=0):
    """XXH64 of ``data`` (any bytes-like) as an int: ``xxhash.xxh64_intdigest``'s result."""
    cdef InBuf b
    cdef uint64_t h
    inbuf_get(data, &b)
    try:
        if b.n < XXH_NOGIL_BYTES_MIN:
            h = imc_xxh64(b.p, b.n, seed)
        else:
            with nogil:     # the held view keeps the memory alive and its size fixed
                h = imc_xxh64(b.p, b.n, seed)
    finally:
        inbuf_release(&b)
    return h


# --- encoding ------------------------------------------------------------------------------------

ctypedef struct FrameFields:
    unsigned int msg_type
    unsigned int flags
    uint64_t request_id
    uint32_t body_len


cdef bint exact_uint(object v, unsigned long long max_value, unsigned long long* out) noexcept:
    """True (and the value) for an exact int in [0, max_value]: the encoder's fast path."""
    cdef unsigned long long r
    if not PyLong_CheckExact(v):
        return False
    r = _long_as_u64(v)
    if r == <unsigned long long>-1 and PyErr_Occurred() is not NULL:
        PyErr_Clear()
        return False
    if r > max_value:
        return False
    out[0] = r
    return True


cdef int frame_fields(FrameFields* f, object msg_type, object flags, object request_id,
                      Py_ssize_t body_len) except -1:
    """The header's fields from the arguments, accepted or refused as the pure encoder does."""
    cdef unsigned long long t, fl, r
    if (exact_uint(msg_type, 0xFF, &t) and exact_uint(flags, 0xFFFF, &fl)
            and exact_uint(request_id, UINT64_MAX, &r) and body_len <= 0xFFFFFFFF):
        f.msg_type = <unsigned int>t
        f.flags = <unsigned int>fl
        f.request_id = r
        f.body_len = <uint32_t>body_len
        return 0
    # Anything else is packed by the pure encoder's own struct: its error, or its reading of the
    # value (bool, an __index__ object).
    packed = _FRAME_HEAD.pack(_FRAME_MAGIC_PY, FRAME_VERSION, msg_type, flags, request_id,
                              body_len, 0)
    _, _, f.msg_type, f.flags, f.request_id, f.body_len, _ = _FRAME_HEAD.unpack(packed)
    return 0


cdef void write_frame_header(uchar* frame, const FrameFields* f) noexcept:
    """The 40-byte header in front of the body already at ``frame + FRAME_HEADER``."""
    memcpy(frame, imc_frame_magic, FRAME_MAGIC_SIZE)
    frame[FRAME_AT_VERSION] = FRAME_VERSION
    frame[FRAME_AT_MSG_TYPE] = <uchar>f.msg_type
    put_u16(frame + FRAME_AT_FLAGS, f.flags)
    put_u64(frame + FRAME_AT_REQUEST_ID, f.request_id)
    put_u32(frame + FRAME_AT_BODY_LEN, f.body_len)
    put_u32(frame + FRAME_AT_RESERVED, 0)
    put_u64(frame + FRAME_AT_BODY_HASH, xxh64_of(frame + FRAME_HEADER, f.body_len))
    put_u64(frame + FRAME_AT_HEADER_HASH, imc_xxh64(frame, FRAME_HASHED_HEADER, 0))


def encode_frame(msg_type, flags, request_id, body):
    """One frame: header and ``body`` (any bytes-like), built into a single new bytes object."""
    cdef InBuf b
    cdef FrameFields f
    cdef bytes frame
    inbuf_get(body, &b)
    try:
        frame_fields(&f, msg_type, flags, request_id, b.n)
        frame = new_bytes(FRAME_HEADER + b.n)
        if b.n:
            memcpy(wptr(frame) + FRAME_HEADER, b.p, b.n)
    finally:
        inbuf_release(&b)
    # The body is hashed from the copy: nobody else holds the new bytes object, so a large body
    # can be hashed without the GIL even when the caller's was a mutable buffer.
    write_frame_header(wptr(frame), &f)
    return frame


# --- decoding ------------------------------------------------------------------------------------

cdef int check_magic_prefix(const uchar* p, Py_ssize_t available) except -1:
    """A frame's first bytes must begin the magic, so a foreign protocol (HTTP, TLS, PostgreSQL)
    is refused at its first bytes rather than after a whole header's worth has arrived."""
    if memcmp(p, imc_frame_magic, min(available, <Py_ssize_t>FRAME_MAGIC_SIZE)) != 0:
        raise ProtocolError("bad_magic", _BAD_MAGIC)
    return 0


cdef tuple checked_frame(const uchar* p, Py_ssize_t frame_size):
    """``(msg_type, flags, request_id, body)`` of the whole frame at ``p``, once its body hash
    matches (checked in place, so a corrupted body allocates nothing)."""
    cdef Py_ssize_t body_len = frame_size - FRAME_HEADER
    if xxh64_of(p + FRAME_HEADER, body_len) != get_u64(p + FRAME_AT_BODY_HASH):
        raise ProtocolError("bad_checksum", _BAD_BODY_CHECKSUM)
    return (p[FRAME_AT_MSG_TYPE], get_u16(p + FRAME_AT_FLAGS), get_u64(p + FRAME_AT_REQUEST_ID),
            slice_bytes(p + FRAME_HEADER, body_len))


@cython.final
cdef class FrameDecoder:
    """Feed bytes in, get whole frames out: ``(msg_type, flags, request_id, body)`` tuples.

    The pure decoder's API and behaviour (immucore/protocol/frames.py), down to what it holds
    after an error; only a feed while another feed of this decoder runs is refused
    (RuntimeError). Each feed parses every whole frame in one pass, from the caller's bytes when
    nothing was pending (only the last, incomplete frame is copied), and moves what is left to
    the buffer's start once. Memory grows with the bytes that arrived, never with a length read
    from the wire.
    """
    cdef uchar* _buf                # bytes fed and not returned yet; starts at a frame's start
    cdef Py_ssize_t _len
    cdef Py_ssize_t _cap
    # The whole size of the frame _buf starts with once its header has passed every check (else
    # 0): growth stops there, so a 64 MiB frame needs 64 MiB, not the next power of two.
    cdef uint64_t _first_frame_size
    cdef object _limit              # body_bytes_max as it was set
    cdef long long _limit_c         # the same limit as a C integer, when _limit_is_int
    cdef bint _limit_is_int
    # Set while feed runs: a second feed meanwhile (another thread during a hash without the
    # GIL, or a re-entrant call) could move the buffer under the first one.
    cdef bint _feeding

    def __cinit__(self):
        self._buf = NULL
        self._len = self._cap = 0
        self._first_frame_size = 0
        self._feeding = False

    def __init__(self, body_bytes_max):
        self.body_bytes_max = body_bytes_max

    def __dealloc__(self):
        PyMem_Free(self._buf)

    @property
    def body_bytes_max(self):
        return self._limit

    @body_bytes_max.setter
    def body_bytes_max(self, value):
        # The connection raises it after login, and lowers it after logout.
        self._limit_is_int = PyLong_CheckExact(value)
        if self._limit_is_int:
            self._limit_c = clamp_limit(value)
        self._limit = value

    @property
    def buffered_bytes(self):
        return self._len

    def feed(self, data):
        cdef InBuf view
        cdef list frames = []
        if self._feeding:
            raise RuntimeError("FrameDecoder.feed is already running on this decoder")
        inbuf_get(data, &view)
        self._feeding = True
        try:
            if self._len == 0 and PyBytes_CheckExact(data):
                # bytes cannot change while they are parsed; other buffers are copied first
                self._feed_in_place(view.p, view.n, frames)
            else:
                self._append(view.p, view.n)
                self._drop(self._parse(self._buf, self._len, frames))
        finally:
            self._feeding = False
            inbuf_release(&view)
        return frames

    cdef int _feed_in_place(self, const uchar* p, Py_ssize_t n, list frames) except -1:
        cdef Py_ssize_t used
        try:
            used = self._parse(p, n, frames)
        except BaseException:
            # The pure decoder holds everything fed when it raises (a ProtocolError, or whatever
            # comparing an odd limit raised); so does this one: buffered_bytes and a later feed
            # behave the same.
            self._append(p, n)
            raise
        self._append(p + used, n - used)
        return 0

    cdef Py_ssize_t _parse(self, const uchar* p, Py_ssize_t n, list frames) except -1:
        """Append the whole frames at the start of p[0:n] to ``frames``; the bytes they took.
        Raises ProtocolError at the first bad byte."""
        cdef Py_ssize_t pos = 0
        cdef uint64_t frame_size
        self._first_frame_size = 0
        while pos < n:
            check_magic_prefix(p + pos, n - pos)
            if n - pos < FRAME_HEADER:
                break
            frame_size = self._checked_frame_size(p + pos)
            if <uint64_t>(n - pos) < frame_size:
                self._first_frame_size = frame_size     # it will start the buffer
                break
            frames.append(checked_frame(p + pos, <Py_ssize_t>frame_size))
            pos += <Py_ssize_t>frame_size
        return pos

    cdef uint64_t _checked_frame_size(self, const uchar* header) except 0:
        """Header and body size of the frame whose whole header is at ``header``, after the
        header's checks in the pure decoder's order (the magic was checked before)."""
        cdef unsigned int version = header[FRAME_AT_VERSION]
        cdef uint32_t body_len = get_u32(header + FRAME_AT_BODY_LEN)
        if imc_xxh64(header, FRAME_HASHED_HEADER, 0) != get_u64(header + FRAME_AT_HEADER_HASH):
            raise ProtocolError("bad_checksum", _BAD_HEADER_CHECKSUM)
        if version != FRAME_VERSION:
            raise ProtocolError("bad_version", f"unsupported protocol version {version} "
                                               f"(this node speaks {_PROTOCOL_VERSION_PY})")
        if get_u32(header + FRAME_AT_RESERVED) != 0:
            raise ProtocolError("bad_frame", _BAD_RESERVED)
        if self._over_limit(body_len):
            raise ProtocolError("frame_too_large", f"frame body of {body_len} bytes exceeds the "
                                                   f"limit of {self._limit} bytes")
        return <uint64_t>FRAME_HEADER + body_len

    cdef bint _over_limit(self, uint32_t body_len) except -1:
        if self._limit_is_int:
            return <long long>body_len > self._limit_c
        return body_len > self._limit       # a float, None, ...: compared as the pure one does

    cdef int _append(self, const uchar* p, Py_ssize_t n) except -1:
        if n == 0:
            return 0
        self._reserve(self._len + n)
        memcpy(self._buf + self._len, p, n)
        self._len += n
        return 0

    cdef int _reserve(self, Py_ssize_t needed) except -1:
        """Room for ``needed`` bytes: doubling (so a frame fed in small pieces is copied a
        bounded number of times), but not past the frame being received when its size is known."""
        cdef Py_ssize_t cap
        cdef uchar* grown
        if needed <= self._cap:
            return 0
        cap = max(needed, 2 * self._cap, <Py_ssize_t>DECODER_BUFFER_MIN)
        if <uint64_t>needed <= self._first_frame_size < <uint64_t>cap:
            cap = <Py_ssize_t>self._first_frame_size
        grown = <uchar*>PyMem_Realloc(self._buf, cap)
        if grown is NULL:
            raise MemoryError()
        self._buf, self._cap = grown, cap
        return 0

    cdef void _drop(self, Py_ssize_t used) noexcept:
        """Forget the first ``used`` bytes (frames returned) with one move of the rest, and give
        back the capacity a large frame needed once it is gone."""
        cdef uchar* shrunk
        if used:
            self._len -= used
            if self._len:
                memmove(self._buf, self._buf + used, self._len)
        if self._cap > DECODER_BUFFER_KEEP and self._len <= DECODER_BUFFER_KEEP:
            shrunk = <uchar*>PyMem_Realloc(self._buf, DECODER_BUFFER_KEEP)
            if shrunk is not NULL:          # else the larger buffer simply stays
                self._buf, self._cap = shrunk, DECODER_BUFFER_KEEP
