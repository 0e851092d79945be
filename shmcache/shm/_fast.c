/*
 * shmcache.shm._fast: the hot paths of SharedMemorySessionCache, compiled.
 *
 * Layer: the same as table.py + lock.py + the request half of cache.py, over the SAME
 * segment layout (layout.py, version 5) and the SAME lock protocol (mutex.py, lock.py).
 * Processes with and without this module share one segment: every store below is the
 * store the pure-Python code makes, in the same order, with the same keyed hashes.
 * The pure-Python code is the reference; this file follows it function by function, and
 * each function names the Python function it mirrors.
 *
 * What is here: get (the per-process map's hit path and the table's read path), set
 * (encode, fingerprint, lease check, store_locked), invalidate, invalidate_by_user, the
 * value arena's common paths (a free block of the size, the bump pointer, a free: arena.py
 * does the rest: committing pages, splitting, rebuilding), and the segment lock itself (trylock, timed waits in slices, EOWNERDEAD
 * recovery, W_WRITING, W_GEN). What is not: clear, purge, check, stats, recovery's
 * journal replay (Table.repair_locked is called back), the rare paths (a full per-process
 * map, a damaged copy of a tag, an oversize warning): they stay in Python.
 *
 * Hashing: the keyed xxh3 hashes of table.py, computed by xxHash's own header inline when
 * the build found it (setup.py: libxxhash-dev, SHMCACHE_XXHASH_INLINE), else by the xxhash
 * module's functions (the package has no C API: METH_FASTCALL builtins called with
 * PyObject_Vectorcall, no bytecode runs, about 600 instructions more per hash). Both are
 * the same xxh3 (stable since xxHash 0.8.0): tests/shm/test_fast.py compares every byte
 * the two implementations store.
 *
 * Signals: Python runs signal handlers only between bytecodes or in PyErr_CheckSignals.
 * Between taking and releasing the lock this code runs no bytecode of its own but in two
 * rare cases: Table.repair_locked (a previous holder died or left a write unfinished) and
 * Arena.alloc_locked (pages to commit, a split, a rebuild). There a signal handler (or
 * another thread) may run and raise: the write stops before its journal entry, and
 * abandon_write repairs (the rebuild makes the arena whole again), as the pure-Python
 * code's except path does. The waits call PyErr_CheckSignals between 20 ms slices, while
 * holding nothing.
 *
 * Little-endian hosts with glibc only (the Python side checks both before using this).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#ifdef __SSE2__
#include <emmintrin.h>
#endif
#ifdef SHMCACHE_XXHASH_INLINE
#define XXH_INLINE_ALL
#include <xxhash.h>
#endif

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "shmcache's segment words are native little-endian: big-endian hosts are refused"
#endif

/* ---- layout.py, mirrored (fast.py checks these against layout.py at import) ---------- */

#define LAYOUT_VERSION 5
#define W_WRITING (128 / 8)
#define W_GEN (136 / 8)
#define W_JOURNAL (144 / 8)
#define W_EVICTIONS (152 / 8)
#define W_RECOVERIES (160 / 8)
#define W_OVERSIZE (168 / 8)
#define W_CLEARED_AT (208 / 8)
#define W_LEASE_DROPS (216 / 8)
#define MUTEX_OFFSET 256
#define TAG_SIZE 16
#define NONCE_BITS 20
#define NONCE_MASK ((UINT64_C(1) << NONCE_BITS) - 1)
#define MAX_EXPIRY_MS ((UINT64_C(1) << 44) - 1)
#define CHECK_HASH_BITS 40
#define CHECK_HASH_MASK ((UINT64_C(1) << CHECK_HASH_BITS) - 1)
#define STAMP_MASK ((UINT64_C(1) << (64 - CHECK_HASH_BITS)) - 1)
#define UNIT 16 /* arena.py */
#define PAGE 4096
#define CTL_TOP 0
#define CTL_COMMITTED 1
#define CTL_LIVE 2
#define CTL_FREED 5
#define ARENA_CTL_WORDS 8
#define OP_SLOT UINT64_C(1)
#define USER_SALT UINT64_C(0x5553455273484D43)
#define FP_SALT UINT64_C(0x4650524E54534D43)
#define MAX_TTL 1e15

/* lock.py */
#define SPINS 20
#define SLICE_NS 20000000LL

/* ---- the object ---------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    /* The mapping: a buffer export of the segment's mmap, held while the cache is open
       (so the mapping cannot be unmapped under a call in flight). */
    Py_buffer view;
    int have_view;
    int closed;
    int in_flight;
    unsigned char *base;
    uint64_t *words;
    uint64_t nwords;
    pthread_mutex_t *mutex;
    /* Geometry (layout.Geometry), in words unless said otherwise. */
    uint64_t nslots, window, phys, value_size, max_units, rwords;
    uint64_t tags_off; /* bytes */
    uint64_t checks_w, users_w, rec_w, leases_w, lease_mask;
    uint64_t ctl_w, heads_w, arena_w, arena_off, arena_size; /* the value arena (arena.py) */
    /* Keyed hashing: the xxhash builtins and the seeds as Python ints. */
    PyObject *xxh128, *xxh64;
    PyObject *tag_seed, *check_seed, *user_seed, *fp_seed;
    uint64_t tag_seed_u, check_seed_u, user_seed_u, fp_seed_u; /* the same, for inline xxh3 */
    /* Python helpers for the general (error) paths, and the errors raised. */
    PyObject *dumps, *canonical, *ttl_arg, *user_key, *on_recover;
    PyObject *arena_alloc; /* Arena.alloc_locked: the allocator's rare paths; NULL: no arena */
    PyObject *e_type, *e_arg, *e_closed, *e_shm, *e_timeout, *e_corrupted;
    /* The cache object and what this core shares with it. */
    PyObject *owner, *local, *clock, *encode, *decode, *user_id_of, *lease_tls;
    PyObject *encode_arg; /* NULL, or encode's second argument (pickle.dumps' protocol) */
    unsigned long long serial; /* unique in the process: thread_leases' cache key */
    int value_mode;
    double lock_timeout, lease_timeout;
    PyObject *lock_timeout_obj; /* as given, for LockTimeout's message */
    Py_ssize_t max_local, max_leases;
    /* This object's figures (the cache reads them: admin.stats, _publish). */
    unsigned long long hits, misses, decode_errors, lease_drops;
    Py_ssize_t counter_rec;
    /* Test hooks (tests/shm: a holder killed at its n-th store, a torn store, a holder
       that never releases, a callback at each wait slice). Off: -1, -1, 0, NULL. */
    long long test_budget, test_torn;
    int test_hold;
    PyObject *wait_hook;
} Core;

static PyObject *s_leases, *s_dict, *s_claim, *s_prune_local, *s_warn_oversize,
    *s_drop_damaged, *s_oversize_len, *s_prune, *s_leases_attr, *i_protocol5;

/* ---- shared-memory words: single aligned 8-byte loads and stores, in program order -- */

static inline uint64_t ld(Core *c, uint64_t i)
{
    return __atomic_load_n(&c->words[i], __ATOMIC_ACQUIRE);
}

static void test_store(Core *c, int bytes_store, unsigned char *dst, const void *src, size_t n);

/* A store of the table (journal, slot words, eviction counter): what tests/shm/test_crash
   counts, like its KillOnWrite wrapper around Table.words and Table._buf. */
static inline void st(Core *c, uint64_t i, uint64_t v)
{
    if (c->test_budget >= 0)
        test_store(c, 0, NULL, NULL, 0);
    __atomic_store_n(&c->words[i], v, __ATOMIC_RELEASE);
}

/* A header word the cache (not the table) stores: W_WRITING, W_GEN, counters, marks. */
static inline void st_header(Core *c, uint64_t i, uint64_t v)
{
    __atomic_store_n(&c->words[i], v, __ATOMIC_RELEASE);
}

static inline void st_bytes(Core *c, uint64_t off, const void *src, size_t n)
{
    if (c->test_budget >= 0 || c->test_torn >= 0) {
        test_store(c, 1, c->base + off, src, n);
        return;
    }
    __atomic_signal_fence(__ATOMIC_SEQ_CST); /* no reordering around the copy */
    memcpy(c->base + off, src, n);
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
}

static void test_store(Core *c, int bytes_store, unsigned char *dst, const void *src, size_t n)
{
    if (bytes_store && c->test_torn >= 0) {
        /* The torn-th byte-range store writes only its first half, and nothing dies. */
        if (c->test_torn == 0 && n > 1)
            n /= 2;
        c->test_torn--;
        memcpy(dst, src, n);
        return;
    }
    if (c->test_budget == 0) {
        kill(getpid(), SIGKILL);
        for (;;)
            pause();
    }
    c->test_budget--;
    if (bytes_store)
        memcpy(dst, src, n);
}

/* ---- the clock --------------------------------------------------------------------- */

/* The cache's clock: time.monotonic() computed as CPython computes it, or the injected one. */
static int now_seconds(Core *c, double *out)
{
    if (c->clock == NULL) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        long long ns = (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
        *out = (ns % 1000000000LL == 0) ? (double)(ns / 1000000000LL) : (double)ns / 1e9;
        return 0;
    }
    PyObject *r = PyObject_CallNoArgs(c->clock);
    if (r == NULL)
        return -1;
    double d = PyFloat_AsDouble(r);
    Py_DECREF(r);
    if (d == -1.0 && PyErr_Occurred())
        return -1;
    *out = d;
    return 0;
}

/* int(x) and round(x) of a float, as Python computes them; an integer beyond 64 bits is
   clamped (every comparison it takes part in gives Python's answer). */
static int float_to_ll(double x, int rounding, long long *out)
{
    if (isnan(x)) {
        PyErr_SetString(PyExc_ValueError, "cannot convert float NaN to integer");
        return -1;
    }
    if (isinf(x)) {
        PyErr_SetString(PyExc_OverflowError, "cannot convert float infinity to integer");
        return -1;
    }
    double r = rounding ? nearbyint(x) : trunc(x); /* nearbyint: half to even, as round() */
    if (r >= 9.2e18)
        *out = LLONG_MAX / 2;
    else if (r <= -9.2e18)
        *out = LLONG_MIN / 2;
    else
        *out = (long long)r;
    return 0;
}

static int now_ms(Core *c, long long *out)
{
    double now;
    if (now_seconds(c, &now) < 0)
        return -1;
    return float_to_ll(now * 1000, 1, out);
}

/* meta < (now_ms + 1) << NONCE_BITS: expired (Table's threshold, in 128 bits). */
static inline int meta_expired(uint64_t meta, long long now_ms)
{
    __int128 threshold = ((__int128)now_ms + 1) * ((__int128)1 << NONCE_BITS);
    return (__int128)meta < threshold;
}

/* ---- keyed hashes (table.py: tag_of, user_tag, fingerprint, _checksum) ------------- */

static int hash64(Core *c, PyObject *seed, PyObject *data, uint64_t *out)
{
#ifdef SHMCACHE_XXHASH_INLINE
    if (PyBytes_CheckExact(data)) {
        /* seed is one of the core's four seed objects: its value, without a conversion */
        uint64_t s = seed == c->check_seed  ? c->check_seed_u
                     : seed == c->fp_seed   ? c->fp_seed_u
                     : seed == c->user_seed ? c->user_seed_u
                                            : c->tag_seed_u;
        *out = XXH3_64bits_withSeed(PyBytes_AS_STRING(data), (size_t)PyBytes_GET_SIZE(data), s);
        return 0;
    }
#endif
    PyObject *args[2] = {data, seed};
    PyObject *r = PyObject_Vectorcall(c->xxh64, args, 2, NULL);
    if (r == NULL)
        return -1;
    *out = PyLong_AsUnsignedLongLong(r);
    Py_DECREF(r);
    if (*out == (uint64_t)-1 && PyErr_Occurred())
        return -1;
    return 0;
}

/* token.encode("utf-8", "surrogatepass") (_args.token_bytes) */
static PyObject *str_bytes(PyObject *s)
{
#if PY_VERSION_HEX < 0x030C0000
    if (PyUnicode_READY(s) < 0)
        return NULL;
#endif
    if (PyUnicode_IS_ASCII(s))
        return PyBytes_FromStringAndSize((const char *)PyUnicode_DATA(s), PyUnicode_GET_LENGTH(s));
    return PyUnicode_AsEncodedString(s, "utf-8", "surrogatepass");
}

/* Table.tag_of: h = xxh3_128(token, tag_seed) or 1; the tag is h in 16 little-endian
   bytes, the home slot h % N. The digest is h big-endian (xxhash's canonical form). */
static int tag_of(Core *c, PyObject *token, uint8_t tag[TAG_SIZE], uint64_t *home)
{
#ifdef SHMCACHE_XXHASH_INLINE
    PyObject *b = NULL;
    const char *p;
    Py_ssize_t n;
#if PY_VERSION_HEX < 0x030C0000
    if (PyUnicode_READY(token) < 0)
        return -1;
#endif
    if (PyUnicode_IS_ASCII(token)) { /* its UTF-8 is its data: no bytes object */
        p = (const char *)PyUnicode_DATA(token);
        n = PyUnicode_GET_LENGTH(token);
    } else {
        if ((b = str_bytes(token)) == NULL)
            return -1;
        p = PyBytes_AS_STRING(b);
        n = PyBytes_GET_SIZE(b);
    }
    XXH128_hash_t x = XXH3_128bits_withSeed(p, (size_t)n, c->tag_seed_u);
    Py_XDECREF(b);
    memcpy(tag, &x.low64, 8); /* the int h in 16 little-endian bytes */
    memcpy(tag + 8, &x.high64, 8);
#else
    PyObject *b = str_bytes(token);
    if (b == NULL)
        return -1;
    PyObject *args[2] = {b, c->tag_seed};
    PyObject *d = PyObject_Vectorcall(c->xxh128, args, 2, NULL);
    Py_DECREF(b);
    if (d == NULL)
        return -1;
    if (!PyBytes_Check(d) || PyBytes_GET_SIZE(d) != TAG_SIZE) {
        Py_DECREF(d);
        PyErr_SetString(PyExc_RuntimeError, "xxh3_128_digest did not return 16 bytes");
        return -1;
    }
    const uint8_t *be = (const uint8_t *)PyBytes_AS_STRING(d);
    for (int i = 0; i < TAG_SIZE; i++)
        tag[i] = be[TAG_SIZE - 1 - i];
    Py_DECREF(d);
#endif
    uint64_t lo, hi;
    memcpy(&lo, tag, 8);
    memcpy(&hi, tag + 8, 8);
    if (!lo && !hi) { /* an all-zero tag would read as an empty slot */
        lo = 1;
        tag[0] = 1;
    }
    unsigned __int128 h = ((unsigned __int128)hi << 64) | lo;
    *home = (uint64_t)(h % c->nslots);
    return 0;
}

static inline uint64_t tag_hi(const uint8_t tag[TAG_SIZE])
{
    uint64_t hi;
    memcpy(&hi, tag + 8, 8);
    return hi;
}

/* Table.user_tag(user_key(user_id)) */
static int user_tag(Core *c, PyObject *user_id, uint64_t *out)
{
    PyObject *key;
    if (PyUnicode_CheckExact(user_id) && PyUnicode_GET_LENGTH(user_id) > 0) {
        key = Py_NewRef(user_id);
    } else {
        key = PyObject_CallOneArg(c->user_key, user_id); /* str(), or the error */
        if (key == NULL)
            return -1;
    }
    PyObject *b = str_bytes(key);
    Py_DECREF(key);
    if (b == NULL)
        return -1;
    int rc = hash64(c, c->user_seed, b, out);
    Py_DECREF(b);
    if (rc == 0 && *out == 0)
        *out = 1;
    return rc;
}

/* ---- slots (table.py) ----------------------------------------------------------------- */

static inline uint64_t tag_off(Core *c, uint64_t slot)
{
    return c->tags_off + TAG_SIZE * slot;
}

static inline uint64_t meta_w(Core *c, uint64_t slot)
{
    return c->rec_w + slot * c->rwords;
}

/* ---- the value arena (arena.py) ------------------------------------------------------- */

static inline uint64_t ref_units(uint64_t length)
{
    return length ? (length + UNIT - 1) / UNIT : 1;
}

/* Arena.span: the byte offset of a reference's value (its length in *length), or 0 if it
   cannot be one (outside what was committed, longer than value_size). */
static uint64_t arena_span(Core *c, uint64_t ref, uint32_t *length)
{
    uint64_t hi = ref >> 32;
    uint32_t len = (uint32_t)ref;
    if (hi == 0 || len > c->value_size)
        return 0;
    uint64_t committed = ld(c, c->ctl_w + CTL_COMMITTED);
    uint64_t limit = committed < c->arena_size ? committed : c->arena_size;
    if (hi - 1 > limit / UNIT || (hi - 1) * UNIT + len > limit)
        return 0;
    *length = len;
    return c->arena_off + (hi - 1) * UNIT;
}

/* Arena.alloc_locked: a free block of the size, else the bump pointer inside what is
   committed; anything else (pages to commit, a split, a rebuild, a damaged list or control
   word) is the Python method's. *ref: the reference, 0 if there is no room. */
static int arena_alloc(Core *c, uint64_t length, uint64_t *ref)
{
    uint64_t n = ref_units(length), unit = 0;
    uint64_t top = ld(c, c->ctl_w + CTL_TOP), committed = ld(c, c->ctl_w + CTL_COMMITTED);
    int found = 0;
    if (committed <= c->arena_size && top <= committed / UNIT &&
        !(committed % PAGE && committed != c->arena_size)) {
        uint64_t h = c->heads_w + n, head = ld(c, h);
        if (head) {
            unit = head - 1;
            if (n <= top && unit <= top - n) { /* no wrap, whatever the word holds */
                uint64_t next = ld(c, c->arena_w + unit * 2);
                if (next <= top) {
                    st(c, h, next);
                    found = 1;
                }
            }
        } else if ((top + n) * UNIT <= committed) {
            st(c, c->ctl_w + CTL_TOP, top + n);
            unit = top;
            found = 1;
        }
    }
    if (!found) {
        PyObject *arg = PyLong_FromUnsignedLongLong(length);
        if (arg == NULL)
            return -1;
        PyObject *r = PyObject_CallOneArg(c->arena_alloc, arg);
        Py_DECREF(arg);
        if (r == NULL)
            return -1;
        *ref = PyLong_AsUnsignedLongLong(r);
        Py_DECREF(r);
        return (*ref == (uint64_t)-1 && PyErr_Occurred()) ? -1 : 0;
    }
    st(c, c->ctl_w + CTL_LIVE, ld(c, c->ctl_w + CTL_LIVE) + n);
    *ref = ((unit + 1) << 32) | length;
    return 0;
}

/* Arena.free_locked: the block goes on its size's list; a reference that cannot be ours
   (damage) is ignored (a leak the next rebuild ends). */
static void arena_free(Core *c, uint64_t ref)
{
    uint64_t hi = ref >> 32;
    if (hi == 0)
        return;
    uint64_t unit = hi - 1, n = ref_units((uint32_t)ref), top = ld(c, c->ctl_w + CTL_TOP);
    uint64_t committed = ld(c, c->ctl_w + CTL_COMMITTED);
    uint64_t limit = committed < c->arena_size ? committed : c->arena_size;
    if (n > c->max_units || unit + n > top || top > limit / UNIT)
        return;
    uint64_t h = c->heads_w + n;
    st(c, c->arena_w + unit * 2, ld(c, h));
    st(c, h, unit + 1);
    uint64_t live = ld(c, c->ctl_w + CTL_LIVE);
    st(c, c->ctl_w + CTL_LIVE, live > n ? live - n : 0);
    st(c, c->ctl_w + CTL_FREED, ld(c, c->ctl_w + CTL_FREED) + n);
}

/* Table.find: the first slot of the window [home, home + W) holding tag, or -1. A miss
   reads the whole window: one 16-byte compare per slot where SSE2 is there (x86-64). */
static Py_ssize_t find_tag(Core *c, const uint8_t tag[TAG_SIZE], uint64_t home)
{
    const unsigned char *t = c->base + tag_off(c, home);
#ifdef __SSE2__
    __m128i want = _mm_loadu_si128((const __m128i *)tag);
    for (uint64_t i = 0, n = c->window; i < n; i++) {
        __m128i slot = _mm_load_si128((const __m128i *)(t + TAG_SIZE * i));
        if (_mm_movemask_epi8(_mm_cmpeq_epi8(slot, want)) == 0xFFFF) {
            __atomic_thread_fence(__ATOMIC_ACQUIRE);
            return (Py_ssize_t)(home + i);
        }
    }
#else
    uint64_t a, b;
    memcpy(&a, tag, 8);
    memcpy(&b, tag + 8, 8);
    const uint64_t *w = (const uint64_t *)t;
    for (uint64_t i = 0, n = c->window; i < n; i++) {
        if (__atomic_load_n(&w[2 * i], __ATOMIC_RELAXED) == a &&
            __atomic_load_n(&w[2 * i + 1], __ATOMIC_ACQUIRE) == b)
            return (Py_ssize_t)(home + i);
    }
#endif
    return -1;
}

/* The bytes a check word hashes: tag | meta | user | fingerprint [| reference | value]. */
static PyObject *check_blob(const uint8_t tag[TAG_SIZE], uint64_t meta, uint64_t user,
                            uint64_t fp, Py_ssize_t area_len)
{
    PyObject *blob = PyBytes_FromStringAndSize(NULL, 40 + area_len);
    if (blob == NULL)
        return NULL;
    char *p = PyBytes_AS_STRING(blob);
    memcpy(p, tag, TAG_SIZE);
    memcpy(p + 16, &meta, 8);
    memcpy(p + 24, &user, 8);
    memcpy(p + 32, &fp, 8);
    return blob;
}

typedef struct {
    uint64_t check, meta, fp, user;
    PyObject *blob;   /* the checked copy (tag | words | area) */
    Py_ssize_t vlen;  /* -1: the slot holds no value */
} Snap;

/* Table.read_slot: a consistent copy of a slot, accepted only if its keyed hash matches
   the check word. Returns 1 (s filled, s->blob owned), 0 (torn, invalid, empty), -1. */
static int read_slot(Core *c, uint64_t slot, Snap *s)
{
    uint64_t check = ld(c, c->checks_w + slot);
    if (!check)
        return 0;
    uint64_t t0 = tag_off(c, slot) / 8;
    uint64_t tag_words[2] = {ld(c, t0), ld(c, t0 + 1)};
    uint64_t mw = meta_w(c, slot);
    uint64_t meta = ld(c, mw), fp = ld(c, mw + 1), user = ld(c, c->users_w + slot);
    uint64_t ref = 0, voff = 0;
    uint32_t length = 0;
    Py_ssize_t area_len = 0;
    if (c->value_mode) {
        ref = ld(c, mw + 2);
        area_len = 8;
        if (ref) {
            voff = arena_span(c, ref, &length);
            if (!voff)
                return 0;
            area_len = 8 + (Py_ssize_t)length;
        }
    }
    PyObject *blob = check_blob((const uint8_t *)tag_words, meta, user, fp, area_len);
    if (blob == NULL)
        return -1;
    if (area_len) {
        char *p = PyBytes_AS_STRING(blob) + 40;
        memcpy(p, &ref, 8);
        if (voff) {
            __atomic_signal_fence(__ATOMIC_SEQ_CST);
            memcpy(p + 8, c->base + voff, (size_t)length);
        }
    }
    uint64_t h;
    if (hash64(c, c->check_seed, blob, &h) < 0) {
        Py_DECREF(blob);
        return -1;
    }
    if (((h & CHECK_HASH_MASK) ? (h & CHECK_HASH_MASK) : 1) != (check & CHECK_HASH_MASK)) {
        Py_DECREF(blob);
        return 0;
    }
    s->check = check;
    s->meta = meta;
    s->fp = fp;
    s->user = user;
    s->blob = blob;
    s->vlen = ref ? (Py_ssize_t)length : -1;
    return 1;
}

/* Table._zero_slot_locked */
static void zero_slot(Core *c, uint64_t slot)
{
    static const uint8_t zero[TAG_SIZE] = {0};
    st(c, W_JOURNAL, (OP_SLOT << 56) | slot);
    st(c, c->checks_w + slot, 0);
    st_bytes(c, tag_off(c, slot), zero, TAG_SIZE);
    st(c, meta_w(c, slot), 0);
    st(c, meta_w(c, slot) + 1, 0);
    st(c, c->users_w + slot, 0);
    if (c->value_mode) {
        uint64_t ref = ld(c, meta_w(c, slot) + 2);
        st(c, meta_w(c, slot) + 2, 0);
        arena_free(c, ref);
    }
}

/* Table._reclaim_window_locked: reclaim every expired or invalid slot of a full window,
   else evict the entry that expires soonest. */
static uint64_t reclaim_window(Core *c, uint64_t home, long long now_ms)
{
    Py_ssize_t first_free = -1;
    uint64_t min_meta = UINT64_MAX, min_i = 0;
    for (uint64_t i = 0; i < c->window; i++) {
        uint64_t meta = ld(c, meta_w(c, home + i));
        if (meta < min_meta) {
            min_meta = meta;
            min_i = i;
        }
    }
    int any_free = meta_expired(min_meta, now_ms);
    for (uint64_t i = 0; i < c->window && !any_free; i++)
        any_free = !ld(c, c->checks_w + home + i);
    if (any_free) {
        /* Python reads the window's checks and metas first, then zeroes: same here. */
        uint64_t n = c->window;
        uint8_t *free_slots = PyMem_Malloc(n ? n : 1);
        for (uint64_t i = 0; i < n; i++) {
            int f = meta_expired(ld(c, meta_w(c, home + i)), now_ms) || !ld(c, c->checks_w + home + i);
            if (free_slots)
                free_slots[i] = (uint8_t)f;
            if (f && first_free < 0)
                first_free = (Py_ssize_t)i;
        }
        for (uint64_t i = 0; i < n; i++) {
            int f = free_slots ? free_slots[i]
                               : (meta_expired(ld(c, meta_w(c, home + i)), now_ms) ||
                                  !ld(c, c->checks_w + home + i));
            if (f)
                zero_slot(c, home + i);
        }
        PyMem_Free(free_slots);
        return home + (uint64_t)first_free;
    }
    st(c, W_EVICTIONS, ld(c, W_EVICTIONS) + 1);
    return home + min_i;
}

/* Table._write_slot_locked. The check word's hash is computed before the first store, so
   nothing can fail between the journal entry and the check word that completes the slot. */
static int write_slot(Core *c, uint64_t slot, const uint8_t tag[TAG_SIZE], uint64_t meta,
                      const char *value, Py_ssize_t vlen, uint64_t stamp, uint64_t user,
                      uint64_t fp, uint64_t *check_out)
{
    uint64_t mw = meta_w(c, slot), old_ref = 0, ref = 0;
    if (c->value_mode) { /* the value's block first: nothing names it yet */
        if (vlen >= 0) {
            if (arena_alloc(c, (uint64_t)vlen, &ref) < 0)
                return -1; /* abandon_write's repair rebuilds the arena */
            uint32_t length;
            uint64_t off = ref ? arena_span(c, ref, &length) : 0;
            if (off)
                st_bytes(c, off, value, (size_t)vlen);
        }
        /* after the allocation: a rebuild inside it may have dropped this slot (damaged),
           giving its block back already */
        old_ref = ld(c, mw + 2);
    }
    Py_ssize_t area_len = c->value_mode ? (ref ? 8 + vlen : 8) : 0;
    PyObject *blob = check_blob(tag, meta, user, fp, area_len);
    if (blob == NULL)
        return -1;
    char *area = PyBytes_AS_STRING(blob) + 40;
    if (area_len) {
        memcpy(area, &ref, 8);
        if (ref && vlen > 0)
            memcpy(area + 8, value, (size_t)vlen);
    }
    uint64_t h;
    if (hash64(c, c->check_seed, blob, &h) < 0) {
        Py_DECREF(blob);
        return -1;
    }
    uint64_t check = ((stamp & STAMP_MASK) << CHECK_HASH_BITS) |
                     ((h & CHECK_HASH_MASK) ? (h & CHECK_HASH_MASK) : 1);
    /* No "check = 0" first: until the new check lands, a reader that copies the slot sees
       bytes that do not match the old check (a miss), and one that compares only the
       check word sees the old entry, still the latest complete write. */
    st(c, W_JOURNAL, (OP_SLOT << 56) | slot);
    st_bytes(c, tag_off(c, slot), tag, TAG_SIZE);
    st(c, mw, meta);
    st(c, mw + 1, fp);
    st(c, c->users_w + slot, user);
    if (c->value_mode)
        st(c, mw + 2, ref);
    st(c, c->checks_w + slot, check);
    Py_DECREF(blob);
    if (old_ref)
        arena_free(c, old_ref); /* after the new check: nothing names it any more */
    *check_out = check;
    return 0;
}

/* Table.store_locked: the tag's own slot, else an empty one, else reclaim. */
static int store_locked(Core *c, const uint8_t tag[TAG_SIZE], uint64_t home, uint64_t meta,
                        const char *value, Py_ssize_t vlen, long long now_ms, uint64_t stamp,
                        uint64_t user, uint64_t fp, uint64_t *slot_out, uint64_t *check_out)
{
    static const uint8_t zero[TAG_SIZE] = {0};
    Py_ssize_t slot = find_tag(c, tag, home);
    if (slot < 0)
        slot = find_tag(c, zero, home);
    if (slot < 0)
        slot = (Py_ssize_t)reclaim_window(c, home, now_ms);
    *slot_out = (uint64_t)slot;
    return write_slot(c, (uint64_t)slot, tag, meta, value, vlen, stamp, user, fp, check_out);
}

/* Table.remove_locked: every copy of tag in its window; 1 if there was one. */
static int remove_locked(Core *c, const uint8_t tag[TAG_SIZE], uint64_t home)
{
    Py_ssize_t slot = find_tag(c, tag, home);
    int found = slot >= 0;
    while (slot >= 0) {
        zero_slot(c, (uint64_t)slot);
        slot = find_tag(c, tag, home);
    }
    return found;
}

/* Table.remove_user_locked: one pass over the dense user array. */
static Py_ssize_t remove_user_locked(Core *c, uint64_t user, long long now_ms)
{
    Py_ssize_t live = 0;
    for (uint64_t slot = 0; slot < c->phys; slot++) {
        if (ld(c, c->users_w + slot) != user)
            continue;
        if (ld(c, c->checks_w + slot) && !meta_expired(ld(c, meta_w(c, slot)), now_ms))
            live++;
        zero_slot(c, slot);
    }
    return live;
}

/* Whether Table.damaged_copies could find anything: an aligned half of tag in the window
   (after remove_locked, a whole copy is gone; a half match is a damaged tag, or a 2**-64
   accident). The rare positive goes to the Python code, which checks and drops it. */
static int half_tag_in_window(Core *c, const uint8_t tag[TAG_SIZE], uint64_t home)
{
    uint64_t a, b;
    memcpy(&a, tag, 8);
    memcpy(&b, tag + 8, 8);
    const uint64_t *t = c->words + tag_off(c, home) / 8;
    uint64_t hit = 0;
    for (uint64_t i = 0, n = 2 * c->window; i < n; i += 2) /* no early exit: vectorizable */
        hit |= (t[i] == a) | (t[i + 1] == b);
    return hit != 0;
}

/* ---- the lock (lock.py: SegmentLock.acquire and _contended; mutex.py) ---------------- */

static void release(Core *c)
{
    if (c->test_hold)
        return; /* a test's holder that dies holding the lock */
    pthread_mutex_unlock(c->mutex);
}

static int reentered(Core *c)
{
    PyErr_SetString(c->e_shm,
                    "shmcache write re-entered while this thread holds the segment lock (a "
                    "signal handler called the cache during a write): refused, nothing changed");
    return -1;
}

/* SegmentLock._checked: the lock is ours (0 / EOWNERDEAD), or an error is set (-1). */
static int checked(Core *c, int rc)
{
    if (rc == 0 || rc == EOWNERDEAD)
        return rc;
    if (rc == EDEADLK)
        return reentered(c);
    if (rc == ENOTRECOVERABLE) {
        PyErr_SetString(c->e_corrupted,
                        "the segment lock is unrecoverable (a holder released it without "
                        "repairing after its predecessor died): recreate the segment "
                        "(shmcache reset cannot)");
        return -1;
    }
    errno = rc;
    PyErr_SetFromErrno(PyExc_OSError);
    return -1;
}

static double mono(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

/* SegmentLock._contended: spin a little (yielding, without the GIL), then sleep in 20 ms
   slices until lock_timeout; pending signal handlers run between slices, and what they
   raise propagates (nothing is held then). */
static int contended(Core *c, int rc)
{
    for (int i = 0; i < SPINS; i++) {
        if (rc != EBUSY)
            return checked(c, rc);
        Py_BEGIN_ALLOW_THREADS
        sched_yield();
        Py_END_ALLOW_THREADS
        rc = pthread_mutex_trylock(c->mutex);
    }
    if (rc != EBUSY)
        return checked(c, rc);
    double start = mono(), deadline = start + c->lock_timeout;
    for (;;) {
        double now = mono();
        if (now >= deadline) {
            int owner = __atomic_load_n((int *)c->mutex, __ATOMIC_RELAXED) & 0x3FFFFFFF;
            char who[32];
            if (owner)
                snprintf(who, sizeof who, "%d", owner);
            else
                snprintf(who, sizeof who, "?");
            char waited[32];
            snprintf(waited, sizeof waited, "%.2f", now - start);
            PyErr_Format(c->e_timeout,
                         "waited %s s for the shmcache lock (lock_timeout %R s), held by "
                         "live threads all along (now thread %s; a dead holder is recovered "
                         "at once): nothing was changed",
                         waited, c->lock_timeout_obj, who);
            return -1;
        }
        if (c->wait_hook != NULL) {
            PyObject *r = PyObject_CallNoArgs(c->wait_hook);
            if (r == NULL)
                return -1;
            Py_DECREF(r);
        }
        double until = now + SLICE_NS / 1e9;
        if (until > deadline)
            until = deadline;
        struct timespec ts;
        ts.tv_sec = (time_t)until;
        ts.tv_nsec = (long)((until - (double)ts.tv_sec) * 1e9);
        Py_BEGIN_ALLOW_THREADS
        rc = pthread_mutex_clocklock(c->mutex, CLOCK_MONOTONIC, &ts);
        Py_END_ALLOW_THREADS
        if (rc != ETIMEDOUT)
            return checked(c, rc);
        if (PyErr_CheckSignals() < 0)
            return -1;
    }
}

/* Table.repair_locked, called back (only after a death or an unfinished write). */
static int run_recover(Core *c)
{
    PyObject *r = PyObject_CallNoArgs(c->on_recover);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

/* SegmentLock.acquire: take the lock, repair what a dead or interrupted holder left, raise
   W_WRITING, and return the new generation. On failure nothing is held. */
static int acquire(Core *c, uint64_t *gen)
{
    int rc = pthread_mutex_trylock(c->mutex);
    if (rc) {
        rc = contended(c, rc);
        if (rc < 0)
            return -1;
    }
    if (rc == EOWNERDEAD) {
        /* SegmentLock._recover_dead_holder */
        pthread_mutex_consistent(c->mutex);
        st_header(c, W_RECOVERIES, ld(c, W_RECOVERIES) + 1);
        if (run_recover(c) < 0) {
            release(c); /* W_WRITING stays as the dead holder left it: the next one repairs */
            return -1;
        }
        st_header(c, W_WRITING, 0);
    } else if (ld(c, W_WRITING)) {
        if (run_recover(c) < 0) { /* a live holder's write was cut short by an exception */
            release(c);
            return -1;
        }
    }
    st_header(c, W_WRITING, 1); /* cleared when the write is complete */
    *gen = ld(c, W_GEN) + 1;
    st_header(c, W_GEN, *gen);
    return 0;
}

/* The end of a write that failed after acquire (an allocation, a hash call): repair what
   the journal names (as cache.py's "except BaseException: repair_locked()"), release. */
static void abandon_write(Core *c)
{
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    if (run_recover(c) == 0)
        st_header(c, W_WRITING, 0);
    else
        PyErr_Clear(); /* W_WRITING stays set: the next holder repairs */
    release(c);
    PyErr_Restore(type, value, tb);
}

/* ---- calls in flight, closing ------------------------------------------------------ */

static int enter(Core *c)
{
    if (c->closed) {
        PyErr_SetString(c->e_closed, "this SharedMemorySessionCache is closed");
        return -1;
    }
    c->in_flight++;
    return 0;
}

static void drop_view(Core *c)
{
    if (c->have_view) {
        c->have_view = 0;
        c->base = NULL;
        c->words = NULL;
        PyBuffer_Release(&c->view);
    }
}

static void leave(Core *c)
{
    if (--c->in_flight == 0 && c->closed)
        drop_view(c);
}

/* ---- leases (_leases.py: Leases.grant and Leases.take, on the same thread-local) ----- */

#define NO_LEASE 0
#define EXPIRED 1
#define STAMPED 2

/* This thread's dict of the Leases' threading.local, as the last core that asked saw it.
   Borrowed: the dict lives while this thread and the threading.local do, and the core that
   cached it (its serial is unique in the process) keeps the threading.local alive. */
static __thread unsigned long long tls_serial;
static __thread PyObject *tls_ldict;
static unsigned long long next_serial = 1;

static PyObject *thread_leases(Core *c, int create)
{
    PyObject *tdict;
    if (tls_serial == c->serial) {
        tdict = Py_NewRef(tls_ldict);
    } else {
        tdict = PyObject_GetAttr(c->lease_tls, s_dict);
        if (tdict == NULL)
            return NULL;
        if (!PyDict_Check(tdict)) {
            Py_DECREF(tdict);
            PyErr_SetString(PyExc_TypeError, "a threading.local's __dict__ is not a dict");
            return NULL;
        }
        tls_serial = c->serial;
        tls_ldict = tdict;
    }
    PyObject *leases = PyDict_GetItemWithError(tdict, s_leases);
    if (leases != NULL || PyErr_Occurred() || !create) {
        Py_XINCREF(leases);
        Py_DECREF(tdict);
        return leases;
    }
    leases = PyDict_New();
    if (leases == NULL || PyDict_SetItem(tdict, s_leases, leases) < 0) {
        Py_XDECREF(leases);
        Py_DECREF(tdict);
        return NULL;
    }
    Py_DECREF(tdict);
    return leases;
}

/* (a, b), stealing both references (either may be NULL: then NULL, both released). */
static PyObject *pair(PyObject *a, PyObject *b)
{
    PyObject *t = (a && b) ? PyTuple_New(2) : NULL;
    if (t == NULL) {
        Py_XDECREF(a);
        Py_XDECREF(b);
        return NULL;
    }
    PyTuple_SET_ITEM(t, 0, a);
    PyTuple_SET_ITEM(t, 1, b);
    return t;
}

static int lease_grant(Core *c, PyObject *token, uint64_t stamp)
{
    PyObject *leases = thread_leases(c, 1);
    if (leases == NULL)
        return -1;
    double now;
    int rc = -1;
    if (now_seconds(c, &now) < 0)
        goto done;
    PyObject *held = PyDict_GetItemWithError(leases, token);
    if (held == NULL && PyErr_Occurred())
        goto done;
    if (held != NULL && PyTuple_Check(held) && PyTuple_GET_SIZE(held) == 2) {
        double since = PyFloat_AsDouble(PyTuple_GET_ITEM(held, 1));
        if (since == -1.0 && PyErr_Occurred())
            goto done;
        if (now - since < c->lease_timeout) {
            rc = 0;
            goto done;
        }
    }
    if (PyDict_GET_SIZE(leases) >= c->max_leases && held == NULL) {
        PyObject *mgr = PyObject_GetAttr(c->owner, s_leases_attr);
        if (mgr == NULL)
            goto done;
        PyObject *r = PyObject_CallMethod(mgr, "_prune", "Od", leases, now);
        Py_DECREF(mgr);
        if (r == NULL)
            goto done;
        Py_DECREF(r);
    }
    PyObject *entry = pair(PyLong_FromUnsignedLongLong(stamp), PyFloat_FromDouble(now));
    if (entry == NULL)
        goto done;
    rc = PyDict_SetItem(leases, token, entry);
    Py_DECREF(entry);
done:
    Py_DECREF(leases);
    return rc;
}

static int lease_take(Core *c, PyObject *token, uint64_t *stamp)
{
    PyObject *leases = thread_leases(c, 0);
    if (leases == NULL)
        return PyErr_Occurred() ? -1 : NO_LEASE;
    if (PyDict_GET_SIZE(leases) == 0) {
        Py_DECREF(leases);
        return NO_LEASE;
    }
    PyObject *held = PyDict_GetItemWithError(leases, token);
    if (held == NULL) {
        Py_DECREF(leases);
        return PyErr_Occurred() ? -1 : NO_LEASE;
    }
    Py_INCREF(held);
    int rc = PyDict_DelItem(leases, token);
    Py_DECREF(leases);
    if (rc < 0 || !PyTuple_Check(held) || PyTuple_GET_SIZE(held) != 2) {
        Py_DECREF(held);
        if (rc == 0)
            PyErr_SetString(PyExc_RuntimeError, "a lease is not a (stamp, time) pair");
        return -1;
    }
    double now, since = PyFloat_AsDouble(PyTuple_GET_ITEM(held, 1));
    if ((since == -1.0 && PyErr_Occurred()) || now_seconds(c, &now) < 0) {
        Py_DECREF(held);
        return -1;
    }
    if (now - since >= c->lease_timeout) {
        Py_DECREF(held);
        return EXPIRED;
    }
    *stamp = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(held, 0));
    Py_DECREF(held);
    if (*stamp == (uint64_t)-1 && PyErr_Occurred())
        return -1;
    return STAMPED;
}

/* Table.logout_mark_locked: a mark above the generation is damage; reset. */
static uint64_t logout_mark(Core *c, uint64_t word, uint64_t gen)
{
    uint64_t mark = ld(c, word);
    if (mark > gen) {
        st(c, word, 0);
        return 0;
    }
    return mark;
}

/* ---- the per-process map and counters (local.py, admin.py) ----------------------------- */

/* SegmentAdmin._publish: copy this object's figures into its record in the header. The
   first time, claim a record under the lock (this core's lock: a dead holder found here is
   recovered by this code); a live holder past lock_timeout, or this thread's own hold (a
   signal handler's get inside a write), leaves the figures local until the next time. */
static int publish(Core *c)
{
    Py_ssize_t rec = c->counter_rec;
    if (rec == -2) {
        if (!(c->hits || c->misses))
            return 0; /* nothing to say yet */
        uint64_t gen;
        if (acquire(c, &gen) < 0) {
            if (!PyErr_ExceptionMatches(c->e_shm))
                return -1;
            PyErr_Clear();
            return 0;
        }
        PyObject *r = PyObject_CallMethodNoArgs(c->owner, s_claim);
        if (r == NULL) {
            abandon_write(c);
            return -1;
        }
        st_header(c, W_WRITING, 0);
        release(c);
        rec = PyLong_AsSsize_t(r);
        Py_DECREF(r);
        if (rec == -1 && PyErr_Occurred())
            return -1;
        c->counter_rec = rec;
    }
    if (rec >= 0 && (uint64_t)rec + 2 < c->nwords) {
        st_header(c, (uint64_t)rec + 1, c->hits);
        st_header(c, (uint64_t)rec + 2, c->misses);
    }
    return 0;
}

/* dict.pop(key, None): one lookup, and no KeyError raised and cleared when it is absent. */
static int discard(PyObject *dict, PyObject *key)
{
#if PY_VERSION_HEX >= 0x030D0000
    return PyDict_Pop(dict, key, NULL) < 0 ? -1 : 0;
#else
    PyObject *r = _PyDict_Pop(dict, key, Py_None);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
#endif
}

/* LocalCopies._remember */
static int remember(Core *c, PyObject *token, PyObject *session, uint64_t slot, uint64_t check,
                    uint64_t expiry_ms, uint64_t fp)
{
    if (PyDict_GET_SIZE(c->local) >= c->max_local) {
        int has = PyDict_Contains(c->local, token);
        if (has < 0)
            return -1;
        if (!has) {
            PyObject *r = PyObject_CallMethodNoArgs(c->owner, s_prune_local);
            if (r == NULL)
                return -1;
            Py_DECREF(r);
        }
    }
    PyObject *entry = PyTuple_New(5);
    if (entry == NULL)
        return -1;
    PyObject *items[4] = {PyLong_FromUnsignedLongLong(c->checks_w + slot),
                          PyLong_FromUnsignedLongLong(check),
                          PyFloat_FromDouble((double)expiry_ms / 1000.0),
                          PyLong_FromUnsignedLongLong(fp)};
    PyTuple_SET_ITEM(entry, 0, Py_NewRef(session));
    for (int i = 0; i < 4; i++)
        PyTuple_SET_ITEM(entry, i + 1, items[i]);
    if (!items[0] || !items[1] || !items[2] || !items[3]) {
        Py_DECREF(entry);
        return -1;
    }
    int rc = PyDict_SetItem(c->local, token, entry);
    Py_DECREF(entry);
    return rc;
}

/* ---- get (cache.py: get, _get_slow, _load) ------------------------------------------ */

static PyObject *invalid_type(Core *c, const char *what, PyObject *obj)
{
    PyErr_Format(c->e_type, "%s must be a str, got %s", what, Py_TYPE(obj)->tp_name);
    return NULL;
}

/* _load: the live entry of tag, as this process's copy (equal fingerprint) or decoded.
   New reference, Py_None for "nothing", NULL with an exception. */
static PyObject *load(Core *c, PyObject *token, const uint8_t tag[TAG_SIZE], uint64_t home,
                      PyObject *entry)
{
    long long now;
    if (now_ms(c, &now) < 0)
        return NULL;
    Py_ssize_t slot = find_tag(c, tag, home);
    if (slot < 0)
        Py_RETURN_NONE;
    Snap s;
    int ok = read_slot(c, (uint64_t)slot, &s);
    if (ok <= 0) {
        if (ok < 0)
            return NULL;
        Py_RETURN_NONE;
    }
    PyObject *session = NULL;
    uint64_t expiry = s.meta >> NONCE_BITS;
    if (memcmp(PyBytes_AS_STRING(s.blob), tag, TAG_SIZE) != 0 || (long long)expiry <= now) {
        Py_DECREF(s.blob);
        Py_RETURN_NONE;
    }
    if (entry != NULL && s.fp && PyTuple_CheckExact(entry) && PyTuple_GET_SIZE(entry) == 5) {
        PyObject *efp = PyTuple_GET_ITEM(entry, 4);
        unsigned long long v = PyLong_AsUnsignedLongLong(efp);
        if (v == (unsigned long long)-1 && PyErr_Occurred())
            PyErr_Clear();
        else if (v == s.fp)
            session = Py_NewRef(PyTuple_GET_ITEM(entry, 0)); /* an equal set elsewhere */
    }
    if (session == NULL) {
        if (s.vlen < 0 || c->decode == NULL) {
            Py_DECREF(s.blob);
            Py_RETURN_NONE;
        }
        PyObject *value = PyBytes_FromStringAndSize(PyBytes_AS_STRING(s.blob) + 48, s.vlen);
        Py_DECREF(s.blob);
        s.blob = NULL;
        if (value == NULL)
            return NULL;
        session = PyObject_CallOneArg(c->decode, value);
        Py_DECREF(value);
        if (session == NULL) {
            if (!PyErr_ExceptionMatches(PyExc_Exception))
                return NULL;
            PyErr_Clear();
            c->decode_errors++;
            Py_RETURN_NONE;
        }
    }
    Py_XDECREF(s.blob);
    if (remember(c, token, session, (uint64_t)slot, s.check, expiry, s.fp) < 0) {
        Py_DECREF(session);
        return NULL;
    }
    return session;
}

static PyObject *get_slow(Core *c, PyObject *token, PyObject *entry)
{
    if (enter(c) < 0)
        return NULL;
    PyObject *session = NULL;
    Py_XINCREF(entry);
    if (PyUnicode_GET_LENGTH(token) > 0) {
        uint8_t tag[TAG_SIZE];
        uint64_t home;
        if (tag_of(c, token, tag, &home) < 0)
            goto fail;
        session = load(c, token, tag, home, entry);
        if (session == NULL) {
            /* a damaged or racing slot, or a codec error: a miss */
            if (!PyErr_ExceptionMatches(PyExc_Exception))
                goto fail;
            PyErr_Clear();
        } else if (session == Py_None) {
            Py_CLEAR(session);
        }
    }
    if (session != NULL) {
        c->hits++;
        if (publish(c) < 0) {
            Py_CLEAR(session);
            goto fail;
        }
        Py_XDECREF(entry);
        leave(c);
        return session;
    }
    if (entry != NULL && discard(c->local, token) < 0)
        goto fail;
    if (PyUnicode_GET_LENGTH(token) > 0) {
        /* A lease: the first lock generation that may not be finished now. acquire()
           raises W_WRITING before it raises the generation: read the generation first. */
        uint64_t gen = ld(c, W_GEN);
        uint64_t stamp = ld(c, W_WRITING) ? gen : gen + 1;
        if (lease_grant(c, token, stamp) < 0)
            goto fail;
    }
    c->misses++;
    if (publish(c) < 0)
        goto fail;
    Py_XDECREF(entry);
    leave(c);
    Py_RETURN_NONE;
fail:
    Py_XDECREF(entry);
    leave(c);
    return NULL;
}

/* SharedMemorySessionCache.get: a dict lookup, one 8-byte load, a clock read. */
static PyObject *Core_get(Core *c, PyObject *token)
{
    if (!PyUnicode_Check(token))
        return invalid_type(c, "token", token);
    if (c->closed)
        return get_slow(c, token, NULL);
    PyObject *entry = PyDict_GetItemWithError(c->local, token);
    if (entry == NULL) {
        if (PyErr_Occurred())
            return NULL;
        return get_slow(c, token, NULL);
    }
    Py_INCREF(entry); /* an injected clock runs Python code, which may drop it from the map */
    PyObject *result = NULL;
    if (PyTuple_CheckExact(entry) && PyTuple_GET_SIZE(entry) == 5) {
        Py_ssize_t word = PyLong_AsSsize_t(PyTuple_GET_ITEM(entry, 1));
        unsigned long long check = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(entry, 2));
        PyObject *exp = PyTuple_GET_ITEM(entry, 3);
        double expires = PyFloat_CheckExact(exp) ? PyFloat_AS_DOUBLE(exp) : PyFloat_AsDouble(exp);
        if (PyErr_Occurred())
            goto out;
        if (word >= 0 && (uint64_t)word < c->nwords && ld(c, (uint64_t)word) == check) {
            double now;
            if (now_seconds(c, &now) < 0)
                goto out;
            if (now < expires && !c->closed) {
                c->hits++;
                result = Py_NewRef(PyTuple_GET_ITEM(entry, 0));
                goto out;
            }
        }
    }
    result = get_slow(c, token, entry);
out:
    Py_DECREF(entry);
    return result;
}

/* ---- set (cache.py: set; local.py: _encode) --------------------------------------- */

static PyObject *call_encode(Core *c, PyObject *session)
{
    if (c->encode_arg == NULL)
        return PyObject_CallOneArg(c->encode, session);
    PyObject *args[2] = {session, c->encode_arg};
    return PyObject_Vectorcall(c->encode, args, 2, NULL);
}

/* LocalCopies._encode: (value or NULL, fingerprint, oversize). */
static int encode(Core *c, PyObject *session, PyObject **value, uint64_t *fp, int *oversize)
{
    *value = NULL;
    *fp = 0;
    *oversize = 0;
    PyObject *data;
    if (!c->value_mode) {
        if (c->encode != NULL)
            data = call_encode(c, session);
        else if (PyDict_CheckExact(session)) { /* _canonical: a dict has no model_dump_json */
            PyObject *args[2] = {session, i_protocol5};
            data = PyObject_Vectorcall(c->dumps, args, 2, NULL);
        } else
            data = PyObject_CallOneArg(c->canonical, session);
        if (data == NULL) {
            if (!PyErr_ExceptionMatches(PyExc_Exception))
                return -1;
            PyErr_Clear(); /* not encodable: no fingerprint */
            return 0;
        }
        PyObject *b = PyBytes_CheckExact(data) ? Py_NewRef(data) : PyBytes_FromObject(data);
        Py_DECREF(data);
        if (b == NULL) {
            if (!PyErr_ExceptionMatches(PyExc_Exception))
                return -1;
            PyErr_Clear();
            return 0;
        }
        int rc = hash64(c, c->fp_seed, b, fp);
        Py_DECREF(b);
        if (rc == 0 && *fp == 0)
            *fp = 1;
        return rc;
    }
    data = call_encode(c, session);
    if (data == NULL)
        return -1;
    if (!PyBytes_Check(data) && !PyByteArray_Check(data) && !PyMemoryView_Check(data)) {
        PyErr_Format(c->e_type, "codec.encode returned %s, not bytes", Py_TYPE(data)->tp_name);
        Py_DECREF(data);
        return -1;
    }
    PyObject *b = PyBytes_CheckExact(data) ? Py_NewRef(data) : PyBytes_FromObject(data);
    Py_DECREF(data);
    if (b == NULL)
        return -1;
    if (hash64(c, c->fp_seed, b, fp) < 0) {
        Py_DECREF(b);
        return -1;
    }
    if (*fp == 0)
        *fp = 1;
    if ((uint64_t)PyBytes_GET_SIZE(b) > c->value_size) {
        PyObject *n = PyLong_FromSsize_t(PyBytes_GET_SIZE(b));
        int rc = n ? PyObject_SetAttr(c->owner, s_oversize_len, n) : -1;
        Py_XDECREF(n);
        Py_DECREF(b);
        *oversize = 1;
        return rc;
    }
    *value = b;
    return 0;
}

/* set(token, session, ttl_seconds, *, user_id=None): the arguments, as Python binds them. */
static int set_args(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames, PyObject **out)
{
    static const char *names[4] = {"token", "session", "ttl_seconds", "user_id"};
    out[0] = out[1] = out[2] = NULL;
    out[3] = Py_None;
    if (nargs > 3) {
        PyErr_Format(PyExc_TypeError, "set() takes 4 positional arguments but %zd were given",
                     nargs + 1);
        return -1;
    }
    for (Py_ssize_t i = 0; i < nargs; i++)
        out[i] = args[i];
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    for (Py_ssize_t k = 0; k < nkw; k++) {
        PyObject *key = PyTuple_GET_ITEM(kwnames, k);
        int idx = -1;
        for (int j = 0; j < 4; j++) {
            if (PyUnicode_CompareWithASCIIString(key, names[j]) == 0)
                idx = j;
        }
        if (idx < 0) {
            PyErr_Format(PyExc_TypeError, "set() got an unexpected keyword argument '%U'", key);
            return -1;
        }
        if (idx < nargs || (idx < 3 && out[idx] != NULL)) {
            PyErr_Format(PyExc_TypeError, "set() got multiple values for argument '%s'",
                         names[idx]);
            return -1;
        }
        out[idx] = args[nargs + k];
    }
    for (int j = 0; j < 3; j++) {
        if (out[j] == NULL) {
            PyErr_Format(PyExc_TypeError, "set() missing required argument: '%s'", names[j]);
            return -1;
        }
    }
    return 0;
}

static int ttl_value(Core *c, PyObject *ttl, double *out)
{
    if (PyFloat_CheckExact(ttl)) {
        double d = PyFloat_AS_DOUBLE(ttl);
        if (d > 0 && d <= MAX_TTL) {
            *out = d;
            return 0;
        }
    } else if (PyLong_CheckExact(ttl)) {
        int overflow;
        long long v = PyLong_AsLongLongAndOverflow(ttl, &overflow);
        if (!overflow && v > 0 && v <= (long long)MAX_TTL) {
            *out = (double)v;
            return 0;
        }
        PyErr_Clear();
    }
    PyObject *r = PyObject_CallOneArg(c->ttl_arg, ttl); /* the general (and the error) path */
    if (r == NULL)
        return -1;
    *out = PyFloat_AsDouble(r);
    Py_DECREF(r);
    return (*out == -1.0 && PyErr_Occurred()) ? -1 : 0;
}

static PyObject *Core_set(Core *c, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *a[4];
    if (set_args(args, nargs, kwnames, a) < 0)
        return NULL;
    PyObject *token = a[0], *session = a[1], *user_id = a[3];
    if (c->owner == NULL) { /* cleared by the garbage collector */
        enter(c); /* raises CacheClosed */
        return NULL;
    }
    if (!PyUnicode_Check(token))
        return invalid_type(c, "token", token);
    if (PyUnicode_GET_LENGTH(token) == 0) {
        PyErr_SetString(c->e_arg, "token must not be empty");
        return NULL;
    }
    double ttl;
    if (ttl_value(c, a[2], &ttl) < 0)
        return NULL;
    PyObject *uid = NULL;
    if (user_id == Py_None && c->user_id_of != NULL) {
        uid = PyObject_CallOneArg(c->user_id_of, session);
        if (uid == NULL)
            return NULL;
        user_id = uid;
    }
    uint64_t user = 0;
    if (user_id != Py_None && user_tag(c, user_id, &user) < 0) {
        Py_XDECREF(uid);
        return NULL;
    }
    Py_XDECREF(uid);
    PyObject *value;
    uint64_t fp;
    int oversize;
    if (encode(c, session, &value, &fp, &oversize) < 0)
        return NULL;
    if (enter(c) < 0) {
        Py_XDECREF(value);
        return NULL;
    }
    PyObject *result = NULL;
    uint64_t lease = 0, slot = 0, check = 0, gen;
    int has_slot = 0;
    int lease_kind = lease_take(c, token, &lease);
    uint8_t tag[TAG_SIZE];
    uint64_t home;
    double now;
    long long now_ms_trunc;
    if (lease_kind < 0 || tag_of(c, token, tag, &home) < 0 || now_seconds(c, &now) < 0 ||
        float_to_ll(now * 1000, 0, &now_ms_trunc) < 0)
        goto out;
    double end = (now + ttl) * 1000;
    uint64_t expiry_ms;
    if (0 <= end && end <= (double)MAX_EXPIRY_MS)
        expiry_ms = (uint64_t)nearbyint(end);
    else
        expiry_ms = end > 0 ? MAX_EXPIRY_MS : 0;

    if (acquire(c, &gen) < 0)
        goto out;
    /* The lock is held from here to release(): no bytecode of ours runs in between but
       the rare paths named at the top of this file (repair, the arena's slow path). */
    if (lease_kind == EXPIRED ||
        (lease_kind == STAMPED &&
         (logout_mark(c, c->leases_w + (tag_hi(tag) & c->lease_mask), gen) >= lease ||
          logout_mark(c, W_CLEARED_AT, gen) >= lease ||
          (user && logout_mark(c, c->leases_w + ((user >> 17) & c->lease_mask), gen) >= lease)))) {
        /* A logout not finished when this thread missed: its validation raced it, and its
           session is not stored (nor an older copy: the token stays a miss). */
        st_header(c, W_LEASE_DROPS, ld(c, W_LEASE_DROPS) + 1);
        remove_locked(c, tag, home);
    } else {
        uint64_t meta = (expiry_ms << NONCE_BITS) | (gen & NONCE_MASK);
        const char *vbuf = value ? PyBytes_AS_STRING(value) : NULL;
        Py_ssize_t vlen = value ? PyBytes_GET_SIZE(value) : -1;
        if (store_locked(c, tag, home, meta, vbuf, vlen, now_ms_trunc, gen >> NONCE_BITS, user,
                         fp, &slot, &check) < 0) {
            abandon_write(c);
            goto out;
        }
        has_slot = 1;
        if (oversize)
            st_header(c, W_OVERSIZE, ld(c, W_OVERSIZE) + 1);
    }
    st_header(c, W_WRITING, 0); /* done: nothing for the next holder to repair */
    release(c);

    if (!has_slot) {
        if (discard(c->local, token) < 0)
            goto out;
        c->lease_drops++;
        result = Py_NewRef(Py_None);
        goto out;
    }
    if (oversize) {
        PyObject *r = PyObject_CallMethod(c->owner, "_warn_oversize", "i", -1);
        if (r == NULL)
            goto out;
        Py_DECREF(r);
    }
    if (remember(c, token, session, slot, check, expiry_ms, fp) < 0)
        goto out;
    result = Py_NewRef(Py_None);
out:
    Py_XDECREF(value);
    leave(c);
    return result;
}

/* ---- invalidate, invalidate_by_user (cache.py) --------------------------------------- */

static PyObject *Core_invalidate(Core *c, PyObject *token)
{
    if (!PyUnicode_Check(token))
        return invalid_type(c, "token", token);
    if (c->closed) { /* close() emptied the map already */
        enter(c); /* raises CacheClosed */
        return NULL;
    }
    if (discard(c->local, token) < 0)
        return NULL;
    if (enter(c) < 0)
        return NULL;
    PyObject *result = NULL;
    if (PyUnicode_GET_LENGTH(token) == 0) {
        result = Py_NewRef(Py_None);
        goto out;
    }
    uint8_t tag[TAG_SIZE];
    uint64_t home, gen;
    if (tag_of(c, token, tag, &home) < 0 || acquire(c, &gen) < 0)
        goto out;
    st_header(c, c->leases_w + (tag_hi(tag) & c->lease_mask), gen); /* voids racing leases */
    int found = remove_locked(c, tag, home);
    st_header(c, W_WRITING, 0);
    release(c);
    if (!found && half_tag_in_window(c, tag, home)) {
        /* Maybe a damaged copy a process still trusts: the Python code checks, drops. */
        PyObject *r = PyObject_CallMethod(c->owner, "_drop_damaged_copies", "y#K",
                                          (const char *)tag, (Py_ssize_t)TAG_SIZE,
                                          (unsigned long long)home);
        if (r == NULL)
            goto out;
        Py_DECREF(r);
    }
    if (publish(c) < 0)
        goto out;
    result = Py_NewRef(Py_None);
out:
    leave(c);
    return result;
}

static PyObject *Core_invalidate_by_user(Core *c, PyObject *user_id)
{
    uint64_t user, gen;
    long long now;
    if (user_tag(c, user_id, &user) < 0 || enter(c) < 0)
        return NULL;
    PyObject *result = NULL;
    if (now_ms(c, &now) < 0 || acquire(c, &gen) < 0)
        goto out;
    st_header(c, c->leases_w + ((user >> 17) & c->lease_mask), gen); /* voids leases */
    Py_ssize_t dropped = remove_user_locked(c, user, now);
    st_header(c, W_WRITING, 0);
    release(c);
    result = PyLong_FromSsize_t(dropped);
out:
    leave(c);
    return result;
}

/* ---- administration of the core itself ------------------------------------------- */

static PyObject *Core_close(Core *c, PyObject *Py_UNUSED(ignored))
{
    c->closed = 1;
    if (c->in_flight == 0)
        drop_view(c);
    Py_RETURN_NONE;
}

static PyObject *Core_reset_counts(Core *c, PyObject *Py_UNUSED(ignored))
{
    /* In a forked child: another process, whose figures start at zero (cache.py). */
    c->hits = c->misses = 0;
    c->counter_rec = -2;
    Py_RETURN_NONE;
}

static PyObject *Core_test_hooks(Core *c, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"budget", "torn", "hold", "wait_hook", NULL};
    long long budget = -1, torn = -1;
    int hold = 0;
    PyObject *hook = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|LLpO", kwlist, &budget, &torn, &hold, &hook))
        return NULL;
    c->test_budget = budget;
    c->test_torn = torn;
    c->test_hold = hold;
    Py_CLEAR(c->wait_hook);
    if (hook != Py_None)
        c->wait_hook = Py_NewRef(hook);
    Py_RETURN_NONE;
}

/* Core(owner, buffer, geometry, seeds, helpers, errors, shared, options) -- see fast.py */
static int Core_init(Core *c, PyObject *args, PyObject *kwds)
{
    PyObject *owner, *buffer, *geo, *seeds, *helpers, *errors, *shared, *options;
    if (!PyArg_ParseTuple(args, "OOO!O!O!O!O!O!", &owner, &buffer, &PyTuple_Type, &geo,
                          &PyTuple_Type, &seeds, &PyTuple_Type, &helpers, &PyTuple_Type,
                          &errors, &PyTuple_Type, &shared, &PyTuple_Type, &options))
        return -1;
    if (c->owner != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Core is initialised once");
        return -1;
    }
    unsigned long long tags_off, checks_off, users_off, records_off, leases_off, rstride,
        lease_buckets, tag_seed, check_seed, ctl_off, arena_off;
    if (!PyArg_ParseTuple(geo, "KKKKKKKKKKKKKKK", &c->nslots, &c->window, &c->phys,
                          &c->value_size, &c->max_units, &rstride, &tags_off, &checks_off,
                          &users_off, &records_off, &leases_off, &lease_buckets, &ctl_off,
                          &arena_off, &c->arena_size))
        return -1;
    if (!PyArg_ParseTuple(seeds, "KK", &tag_seed, &check_seed))
        return -1;
    PyObject *arena_alloc_fn;
    if (!PyArg_ParseTuple(helpers, "OOOOOOOO", &c->xxh128, &c->xxh64, &c->dumps, &c->canonical,
                          &c->ttl_arg, &c->user_key, &c->on_recover, &arena_alloc_fn))
        return -1;
    if (!PyArg_ParseTuple(errors, "OOOOOO", &c->e_type, &c->e_arg, &c->e_closed, &c->e_shm,
                          &c->e_timeout, &c->e_corrupted))
        return -1;
    PyObject *clock, *encode, *encode_arg, *decode, *user_id_of;
    if (!PyArg_ParseTuple(shared, "O!OOOOOO", &PyDict_Type, &c->local, &clock, &encode,
                          &encode_arg, &decode, &user_id_of, &c->lease_tls))
        return -1;
    if (!PyArg_ParseTuple(options, "Odnn", &c->lock_timeout_obj, &c->lease_timeout,
                          &c->max_local, &c->max_leases))
        return -1;
    c->lock_timeout = PyFloat_AsDouble(c->lock_timeout_obj);
    if (c->lock_timeout == -1.0 && PyErr_Occurred())
        return -1;
    Py_INCREF(c->lock_timeout_obj);
    PyObject *all[] = {c->xxh128, c->xxh64, c->dumps, c->canonical, c->ttl_arg, c->user_key,
                       c->on_recover, c->e_type, c->e_arg, c->e_closed, c->e_shm, c->e_timeout,
                       c->e_corrupted, c->local, c->lease_tls};
    for (size_t i = 0; i < sizeof all / sizeof *all; i++)
        Py_INCREF(all[i]);
    c->clock = clock == Py_None ? NULL : Py_NewRef(clock);
    c->encode = encode == Py_None ? NULL : Py_NewRef(encode);
    c->encode_arg = encode_arg == Py_None ? NULL : Py_NewRef(encode_arg);
    c->decode = decode == Py_None ? NULL : Py_NewRef(decode);
    c->user_id_of = user_id_of == Py_None ? NULL : Py_NewRef(user_id_of);
    c->arena_alloc = arena_alloc_fn == Py_None ? NULL : Py_NewRef(arena_alloc_fn);
    c->owner = Py_NewRef(owner);
    c->value_mode = c->value_size > 0;
    if (c->value_mode && (c->encode == NULL || c->decode == NULL || c->arena_alloc == NULL)) {
        PyErr_SetString(PyExc_ValueError, "value mode needs a codec and an arena");
        return -1;
    }
    c->tag_seed_u = tag_seed;
    c->check_seed_u = check_seed;
    c->user_seed_u = tag_seed ^ USER_SALT;
    c->fp_seed_u = check_seed ^ FP_SALT;
    c->tag_seed = PyLong_FromUnsignedLongLong(tag_seed);
    c->check_seed = PyLong_FromUnsignedLongLong(check_seed);
    c->user_seed = PyLong_FromUnsignedLongLong(tag_seed ^ USER_SALT);
    c->fp_seed = PyLong_FromUnsignedLongLong(check_seed ^ FP_SALT);
    if (!c->tag_seed || !c->check_seed || !c->user_seed || !c->fp_seed)
        return -1;
    if (PyObject_GetBuffer(buffer, &c->view, PyBUF_WRITABLE | PyBUF_SIMPLE) < 0)
        return -1;
    c->have_view = 1;
    c->base = c->view.buf;
    c->words = c->view.buf;
    c->nwords = (uint64_t)c->view.len / 8;
    /* Every offset below was validated against the segment's size by layout.read_header;
       check once more that the arrays end inside the mapping. */
    uint64_t size = (uint64_t)c->view.len;
    if (((uintptr_t)c->base & 63) || tags_off % 16 || checks_off % 8 || users_off % 8 ||
        records_off % 8 || leases_off % 8 || rstride % 8 || c->nslots == 0 ||
        c->window == 0 || c->phys != c->nslots + c->window - 1 ||
        tags_off + TAG_SIZE * c->phys > size || checks_off + 8 * c->phys > size ||
        users_off + 8 * c->phys > size || records_off + rstride * c->phys > size ||
        leases_off + 8 * lease_buckets > size || (lease_buckets & (lease_buckets - 1)) ||
        MUTEX_OFFSET + 64 > size ||
        (c->value_mode &&
         (rstride < 24 || ctl_off % 8 || arena_off % 8 || c->max_units == 0 ||
          c->max_units * UNIT < c->value_size || ctl_off < leases_off + 8 * lease_buckets ||
          ctl_off + 8 * (ARENA_CTL_WORDS + c->max_units + 1) > arena_off ||
          arena_off > size || c->arena_size > size - arena_off || c->arena_size % UNIT))) {
        PyErr_SetString(PyExc_ValueError, "segment geometry does not fit the mapping");
        return -1;
    }
    c->tags_off = tags_off;
    c->checks_w = checks_off / 8;
    c->users_w = users_off / 8;
    c->rec_w = records_off / 8;
    c->rwords = rstride / 8;
    c->leases_w = leases_off / 8;
    c->lease_mask = lease_buckets - 1;
    c->ctl_w = ctl_off / 8;
    c->heads_w = c->ctl_w + ARENA_CTL_WORDS;
    c->arena_off = arena_off;
    c->arena_w = arena_off / 8;
    c->mutex = (pthread_mutex_t *)(c->base + MUTEX_OFFSET);
    c->counter_rec = -2;
    c->test_budget = c->test_torn = -1;
    c->serial = next_serial++; /* under the GIL */
    return 0;
}

static int Core_traverse(Core *c, visitproc visit, void *arg)
{
    Py_VISIT(c->owner);
    Py_VISIT(c->local);
    Py_VISIT(c->clock);
    Py_VISIT(c->encode);
    Py_VISIT(c->encode_arg);
    Py_VISIT(c->decode);
    Py_VISIT(c->user_id_of);
    Py_VISIT(c->lease_tls);
    Py_VISIT(c->on_recover);
    Py_VISIT(c->arena_alloc);
    Py_VISIT(c->wait_hook);
    return 0;
}

static int Core_clear(Core *c)
{
    c->closed = 1; /* every method checks it before touching what is cleared here */
    Py_CLEAR(c->owner);
    Py_CLEAR(c->local);
    Py_CLEAR(c->clock);
    Py_CLEAR(c->encode);
    Py_CLEAR(c->encode_arg);
    Py_CLEAR(c->decode);
    Py_CLEAR(c->user_id_of);
    Py_CLEAR(c->lease_tls);
    Py_CLEAR(c->on_recover);
    Py_CLEAR(c->arena_alloc);
    Py_CLEAR(c->wait_hook);
    return 0;
}

static void Core_dealloc(Core *c)
{
    PyObject_GC_UnTrack(c);
    Core_clear(c);
    c->in_flight = 0;
    c->closed = 1;
    drop_view(c);
    Py_CLEAR(c->xxh128);
    Py_CLEAR(c->xxh64);
    Py_CLEAR(c->dumps);
    Py_CLEAR(c->canonical);
    Py_CLEAR(c->ttl_arg);
    Py_CLEAR(c->user_key);
    Py_CLEAR(c->e_type);
    Py_CLEAR(c->e_arg);
    Py_CLEAR(c->e_closed);
    Py_CLEAR(c->e_shm);
    Py_CLEAR(c->e_timeout);
    Py_CLEAR(c->e_corrupted);
    Py_CLEAR(c->tag_seed);
    Py_CLEAR(c->check_seed);
    Py_CLEAR(c->user_seed);
    Py_CLEAR(c->fp_seed);
    Py_CLEAR(c->lock_timeout_obj);
    Py_TYPE(c)->tp_free((PyObject *)c);
}

static PyMethodDef Core_methods[] = {
    {"get", (PyCFunction)Core_get, METH_O, "SharedMemorySessionCache.get, compiled"},
    {"set", (PyCFunction)(void (*)(void))Core_set, METH_FASTCALL | METH_KEYWORDS,
     "SharedMemorySessionCache.set, compiled"},
    {"invalidate", (PyCFunction)Core_invalidate, METH_O,
     "SharedMemorySessionCache.invalidate, compiled"},
    {"invalidate_by_user", (PyCFunction)Core_invalidate_by_user, METH_O,
     "SharedMemorySessionCache.invalidate_by_user, compiled"},
    {"close", (PyCFunction)Core_close, METH_NOARGS, "release the mapping (the cache closes)"},
    {"reset_counts", (PyCFunction)Core_reset_counts, METH_NOARGS, "after fork, in the child"},
    {"test_hooks", (PyCFunction)(void (*)(void))Core_test_hooks, METH_VARARGS | METH_KEYWORDS,
     "tests only: die at the n-th store, tear a store, never release, call back per wait"},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef Core_members[] = {
    {"hits", T_ULONGLONG, offsetof(Core, hits), 0, "this object's hits"},
    {"misses", T_ULONGLONG, offsetof(Core, misses), 0, "this object's misses"},
    {"decode_errors", T_ULONGLONG, offsetof(Core, decode_errors), 0, "values not decoded"},
    {"lease_drops", T_ULONGLONG, offsetof(Core, lease_drops), 0, "sets not stored (leases)"},
    {"counter_rec", T_PYSSIZET, offsetof(Core, counter_rec), 0, "this object's record"},
    {"closed", T_INT, offsetof(Core, closed), READONLY, "closed"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject CoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmcache.shm._fast.Core",
    .tp_basicsize = sizeof(Core),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The compiled hot paths of one SharedMemorySessionCache (see fast.py).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Core_init,
    .tp_dealloc = (destructor)Core_dealloc,
    .tp_traverse = (traverseproc)Core_traverse,
    .tp_clear = (inquiry)Core_clear,
    .tp_methods = Core_methods,
    .tp_members = Core_members,
};

static struct PyModuleDef fast_module = {
    PyModuleDef_HEAD_INIT, "shmcache.shm._fast",
    "The compiled hot paths of SharedMemorySessionCache (optional; see shm/fast.py).", -1, NULL,
};

PyMODINIT_FUNC PyInit__fast(void)
{
    if (PyType_Ready(&CoreType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&fast_module);
    if (m == NULL)
        return NULL;
#define INTERN(var, text)                                                                      \
    if ((var = PyUnicode_InternFromString(text)) == NULL)                                      \
        return NULL;
    INTERN(s_leases, "leases");
    INTERN(s_dict, "__dict__");
    INTERN(s_claim, "_claim_counter_locked");
    INTERN(s_prune_local, "_prune_local");
    INTERN(s_warn_oversize, "_warn_oversize");
    INTERN(s_drop_damaged, "_drop_damaged_copies");
    INTERN(s_oversize_len, "_oversize_len");
    INTERN(s_prune, "_prune");
    INTERN(s_leases_attr, "_leases");
#undef INTERN
    if ((i_protocol5 = PyLong_FromLong(5)) == NULL)
        return NULL;
    Py_INCREF(&CoreType);
    if (PyModule_AddObject(m, "Core", (PyObject *)&CoreType) < 0)
        return NULL;
    struct {
        const char *name;
        long long value;
    } consts[] = {
        {"LAYOUT_VERSION", LAYOUT_VERSION}, {"W_WRITING", W_WRITING}, {"W_GEN", W_GEN},
        {"W_JOURNAL", W_JOURNAL}, {"W_EVICTIONS", W_EVICTIONS}, {"W_RECOVERIES", W_RECOVERIES},
        {"W_OVERSIZE", W_OVERSIZE}, {"W_CLEARED_AT", W_CLEARED_AT},
        {"W_LEASE_DROPS", W_LEASE_DROPS}, {"MUTEX_OFFSET", MUTEX_OFFSET},
        {"TAG_SIZE", TAG_SIZE}, {"NONCE_BITS", NONCE_BITS}, {"CHECK_HASH_BITS", CHECK_HASH_BITS},
        {"MAX_EXPIRY_MS", (long long)MAX_EXPIRY_MS}, {"UNIT", (long long)UNIT},
        {"OP_SLOT", (long long)OP_SLOT}, {"USER_SALT", (long long)USER_SALT},
        {"FP_SALT", (long long)FP_SALT}, {"SPINS", SPINS},
#ifdef SHMCACHE_XXHASH_INLINE
        {"XXH3_INLINE", 1},
#else
        {"XXH3_INLINE", 0},
#endif
    };
    for (size_t i = 0; i < sizeof consts / sizeof *consts; i++) {
        if (PyModule_AddObject(m, consts[i].name, PyLong_FromLongLong(consts[i].value)) < 0)
            return NULL;
    }
    return m;
}
