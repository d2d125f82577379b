# C-level declarations of immucore._native: OpenSSL's SHA-256 and the structs the .pxi files share.
#
# Cython reads this file because it sits at the module's dotted path under the include directory
# (ext/immucore/_native.pxd for immucore._native); see setup.py.

from libc.stdint cimport uint64_t

ctypedef unsigned char uchar

cdef extern from *:
    """
    /* SHA256_Init/Update are deprecated in OpenSSL 3 in favour of EVP, but they are the unwrapped
       block function: OpenSSL 3's one-shot SHA256() goes through an EVP fetch and costs ~5x more
       for the 33..101-byte messages this codec hashes. */
    #ifndef OPENSSL_SUPPRESS_DEPRECATED
    #define OPENSSL_SUPPRESS_DEPRECATED 1
    #endif
    #include <openssl/sha.h>
    #include <stdint.h>
    #include <string.h>

    #define IMC_SMALL_MESSAGE_MAX 247   /* padded, a message up to this size fits 256 bytes */

    static inline void imc_store_be32(unsigned char* p, uint32_t v) {
    #if defined(__GNUC__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
        v = __builtin_bswap32(v);
        memcpy(p, &v, 4);
    #else
        p[0] = (unsigned char)(v >> 24); p[1] = (unsigned char)(v >> 16);
        p[2] = (unsigned char)(v >> 8); p[3] = (unsigned char)v;
    #endif
    }

    static inline void imc_store_be64(unsigned char* p, uint64_t v) {
        imc_store_be32(p, (uint32_t)(v >> 32));
        imc_store_be32(p + 4, (uint32_t)v);
    }

    /* A fresh context without SHA256_Init's call and memset (only h and the counters matter). */
    static inline void imc_sha256_begin(SHA256_CTX* c) {
        c->h[0] = 0x6a09e667UL; c->h[1] = 0xbb67ae85UL; c->h[2] = 0x3c6ef372UL;
        c->h[3] = 0xa54ff53aUL; c->h[4] = 0x510e527fUL; c->h[5] = 0x9b05688cUL;
        c->h[6] = 0x1f83d9abUL; c->h[7] = 0x5be0cd19UL;
        c->Nl = 0; c->Nh = 0; c->num = 0; c->md_len = SHA256_DIGEST_LENGTH;
    }

    static inline void imc_sha256_end(const SHA256_CTX* c, unsigned char* out) {
        int i;
        for (i = 0; i < 8; i++) imc_store_be32(out + 4 * i, c->h[i]);
    }

    /* SHA-256 of buf[0:n] (n <= IMC_SMALL_MESSAGE_MAX), padding in place: buf must hold 256 bytes.
       One SHA256_Update of whole blocks goes straight to OpenSSL's block function (no copy into
       the context), and the digest is read from the state (no SHA256_Final). */
    static inline void imc_sha256_padded(unsigned char* buf, size_t n, unsigned char* out) {
        SHA256_CTX c;
        size_t padded = (n + 9 + 63) & ~(size_t)63;
        buf[n] = 0x80;
        memset(buf + n + 1, 0, padded - 8 - n - 1);
        imc_store_be64(buf + padded - 8, (uint64_t)n << 3);
        imc_sha256_begin(&c);
        SHA256_Update(&c, buf, padded);
        imc_sha256_end(&c, out);
    }

    /* SHA-256 of p[0:n]; out may overlap p (it is written last). */
    static void imc_sha256(const unsigned char* p, size_t n, unsigned char* out) {
        unsigned char buf[256];
        SHA256_CTX c;
        size_t full;
        if (n <= IMC_SMALL_MESSAGE_MAX) {
            memcpy(buf, p, n);
            imc_sha256_padded(buf, n, out);
            return;
        }
        full = n & ~(size_t)63;
        imc_sha256_begin(&c);
        SHA256_Update(&c, p, full);
        SHA256_Update(&c, p + full, n - full);
        SHA256_Final(out, &c);
    }
    """
    ctypedef struct SHA256_CTX:
        pass
    int SHA256_Init(SHA256_CTX* c) nogil
    int SHA256_Update(SHA256_CTX* c, const void* data, size_t n) nogil
    int SHA256_Final(uchar* md, SHA256_CTX* c) nogil
    enum: IMC_SMALL_MESSAGE_MAX
    void imc_sha256_padded(uchar* buf, size_t n, uchar* out) nogil
    void imc_sha256(const uchar* p, size_t n, uchar* out) nogil


# A transaction header (docs/immudb-format.md §5). Byte fields point into memory someone else
# owns (a blob, a record, a caller's bytes); their lengths are 32 except when a caller passes odd
# values to encode_header/inner_hash or build_txs, which accept whatever the pure codec accepts.
ctypedef struct Header:
    uint64_t id
    const uchar* prev_alh
    Py_ssize_t prev_alh_len
    uint64_t ts
    unsigned int version        # 0 or 1 once validated
    const uchar* md             # tx metadata (v1 only)
    Py_ssize_t md_len
    uint64_t nentries
    const uchar* eh
    Py_ssize_t eh_len
    uint64_t bl_tx_id
    const uchar* bl_root
    Py_ssize_t bl_root_len


# One entry of an export blob (pointers into the blob) or of a caller's tx (unprefixed key/value).
ctypedef struct Ent:
    const uchar* key
    Py_ssize_t key_len
    const uchar* md
    Py_ssize_t md_len
    const uchar* value          # the value, or its 32-byte hash when the blob is truncated
    Py_ssize_t value_len


# A growable array of entries with room for a typical tx inline (no malloc on the hot path).
ctypedef struct EntBuf:
    Ent* items
    Py_ssize_t count
    Py_ssize_t cap
    Ent inline[16]


# The AHT's peaks as a stack of (pointer, length). The bottom `kept` items are still the caller's
# peaks; everything above points into node buffers this codec wrote.
ctypedef struct PeakStack:
    const uchar** ptr
    Py_ssize_t* size
    Py_ssize_t count
    Py_ssize_t cap
    Py_ssize_t kept
    bint heap                   # ptr/size were allocated (else they are the caller's arrays)
