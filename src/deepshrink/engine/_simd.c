/* SIMD kernels of the inference engine: AVX-512 with runtime dispatch, portable C beside them.
 *
 * Products of a weight-shared matrix W (rows x cols; each weight an index into a table of
 * at most 32 float32 values, or 256 for rows_matmul) with activations x (tokens x cols),
 * out = x W^T + bias, each kernel reading its own layout (built and documented in
 * deepshrink/engine/layouts.py):
 *
 *   panels_matmul  W in 16-row panels of one-byte codes, each panel a list of column blocks
 *                  (every column for a dense layout; only the non-zero 16 x 1 blocks for a
 *                  block-sparse one). The table sits in two registers and one permute
 *                  (vpermt2ps) decodes 16 weights; each decoded vector is used by every
 *                  token of a block held in registers (up to 24 tokens), or, at batch 1,
 *                  by one activation, several panels in flight.
 *   tiled_matvec   batch 1, unstructured sparse W: SELL-16 (16 rows in the lanes, rows
 *                  sorted by length) cut into tiles of 31 columns; a tile's activations
 *                  sit in two registers, so an entry (5-bit column, 5-bit code) is two
 *                  permutes and an FMA: no gather (vgatherdps runs at ~1 element a cycle
 *                  on Zen 4; this at 3-5 weights).
 *   rows_matmul    batches, unstructured sparse W: CSR rows cut into 128-column chunks, the
 *                  tokens in the lanes (16 or 32 per pass), each weight one broadcast FMA
 *                  over them, a chunk's activations staying in L1.
 *
 * Every kernel exists twice: an AVX-512 version compiled for that target alone (function
 * attributes, so the build never needs -march=native) and a portable one in plain C; which
 * runs is decided at import from the CPU (__builtin_cpu_supports). Threads: OpenMP where the
 * build has it (the runtime torch runs on, so the two share one team of threads), else a
 * small pool of POSIX threads whose caller works too and never waits for a helper that has
 * not started (see parallel_chunks). The GIL is released while a kernel runs.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <float.h>
#include <math.h>
#include <string.h>

#if defined(_OPENMP)
#include <omp.h>
#include <stdatomic.h>
#define HAVE_POOL 0
#elif defined(__unix__) || defined(__APPLE__)
#define HAVE_POOL 1
#include <pthread.h>
#include <stdatomic.h>
#else
#define HAVE_POOL 0
#endif

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define HAVE_X86 1
#include <immintrin.h>
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
#else
#define HAVE_X86 0
#endif

/* Loops over the tokens or accumulators of a register-blocked kernel must unroll whole, or the
 * accumulators live in memory: gcc peels at most 16 iterations unless told. */
#define UNROLL _Pragma("GCC unroll 32")

#define LANES 16         /* rows of a panel, a slice, a vector */
#define TABLE 32         /* values a permute-decoded table holds */
#define TOKENS_MAX 24    /* tokens held in registers by panels_matmul */
#define SUPER 4          /* panels interleaved column by column in a dense layout (one 64-byte line) */
#define TILE_COLS 31     /* columns of a tiled_matvec tile; lane 31 of its activations is the padding's zero */
#define ROWS_TILE_MAX 32 /* tokens per pass of rows_matmul */

static int use_avx512 = 0;

static int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* A buffer on a cache-line boundary, for kernels that load whole 64-byte vectors from it: malloc's 16-byte
 * alignment makes each such load straddle two lines (measured: the float32 row kernel ran 1.7x faster on
 * Alex-6 at batch 16 once aligned, the int8 row kernel 5-7%). */
#if defined(_MSC_VER)
#include <malloc.h>
static void *alloc_lines(size_t bytes) { return _aligned_malloc(bytes ? bytes : 64, 64); }
static void free_lines(void *p) { _aligned_free(p); }
#else
static void *alloc_lines(size_t bytes) {
    void *p = NULL;
    return posix_memalign(&p, 64, bytes ? bytes : 64) ? NULL : p;
}
static void free_lines(void *p) { free(p); }
#endif

/* ------------------------------------------------------------------------------------------ */
/* The thread pool. A product is cut into chunks; the caller posts them, wakes the helpers
 * and claims chunks itself, one at a time, as do the helpers that are running. When none is
 * left the caller waits only for the chunks a helper has claimed and not finished: a helper
 * that the scheduler has not run yet (the other cores busy with other jobs) costs nothing,
 * it finds the job gone when it wakes. OpenMP's end-of-region barrier waits for every
 * thread instead, which on a loaded 2-core machine measured 10-15 ms (a scheduler quantum)
 * for products of 0.1 ms. Chunks are claimed by a compare-and-swap on one 64-bit word, the
 * job's generation above the next chunk's number, so a helper that read a job which has
 * since been replaced can never claim a chunk of the new one with the old job's pointers. */

typedef void (*ChunkFn)(const void *ctx, int64_t chunk);

#if HAVE_POOL
#define MAX_HELPERS 63
#define SPIN 2000 /* pause-loops (~50 us) a helper watches for the next job before it sleeps */

static struct {
    pthread_mutex_t lock;
    pthread_cond_t wake;
    int helpers;        /* threads started */
    int wanted;         /* helpers the current job may use */
    ChunkFn fn;         /* the current job, written before `next` publishes it */
    const void *ctx;
    int64_t n, grain;
    _Atomic uint64_t next;  /* generation << 32 | next chunk to claim */
    _Atomic int64_t done;   /* chunks of the current job finished */
    _Atomic int sleepers;   /* helpers waiting on `wake` */
    _Atomic int busy;       /* a job is posted: a second caller (another Python thread) runs serially */
} pool = {.lock = PTHREAD_MUTEX_INITIALIZER, .wake = PTHREAD_COND_INITIALIZER};

static inline void relax(void) {
#if HAVE_X86
    _mm_pause();
#endif
}

/* Claim and run chunks of job `gen` until none is left; whoever calls it read fn, ctx, n and
 * grain after seeing `gen` in `next`, and a claim succeeds only while `next` still holds `gen`.
 * A claim takes `grain` consecutive chunks: a few claims per thread, not one per chunk, so
 * the two cores do not pass the claim word's cache line back and forth for microsecond chunks. */
static void work(uint64_t gen, ChunkFn fn, const void *ctx, int64_t n, int64_t grain) {
    for (;;) {
        uint64_t v = atomic_load_explicit(&pool.next, memory_order_acquire);
        int64_t first = (int64_t)(v & 0xffffffffu) * grain;
        if (v >> 32 != gen || first >= n) return;
        if (!atomic_compare_exchange_weak(&pool.next, &v, v + 1)) continue;
        int64_t last = first + grain < n ? first + grain : n;
        for (int64_t chunk = first; chunk < last; chunk++) fn(ctx, chunk);
        atomic_fetch_add_explicit(&pool.done, last - first, memory_order_release);
    }
}

static void *helper(void *arg) {
    int id = (int)(intptr_t)arg;
    uint64_t seen = atomic_load(&pool.next) >> 32;
    for (;;) {
        uint64_t gen = atomic_load_explicit(&pool.next, memory_order_acquire) >> 32;
        for (int i = 0; gen == seen && i < SPIN; i++) {
            relax();
            gen = atomic_load_explicit(&pool.next, memory_order_acquire) >> 32;
        }
        if (gen == seen) {
            pthread_mutex_lock(&pool.lock);
            atomic_fetch_add(&pool.sleepers, 1);
            while ((gen = atomic_load(&pool.next) >> 32) == seen) pthread_cond_wait(&pool.wake, &pool.lock);
            atomic_fetch_sub(&pool.sleepers, 1);
            pthread_mutex_unlock(&pool.lock);
        }
        seen = gen;
        if (id < pool.wanted) work(gen, pool.fn, pool.ctx, pool.n, pool.grain);
    }
    return NULL;
}

static void forget_helpers(void) { pool.helpers = 0; } /* a forked child has none of its parent's threads */

static int start_helpers(int wanted) {
    pthread_mutex_lock(&pool.lock);
    if (pool.helpers == 0) pthread_atfork(NULL, NULL, forget_helpers);
    while (pool.helpers < wanted) {
        pthread_t thread;
        if (pthread_create(&thread, NULL, helper, (void *)(intptr_t)(pool.helpers + 1)) != 0) break;
        pthread_detach(thread);
        pool.helpers++;
    }
    int started = pool.helpers;
    pthread_mutex_unlock(&pool.lock);
    return started;
}
#endif

/* Run fn(ctx, 0 .. n - 1) on up to `threads` threads, the caller among them. */
static void parallel_chunks(ChunkFn fn, const void *ctx, int64_t n, int threads) {
#if defined(_OPENMP)
    /* torch's CPU ops run on this same OpenMP runtime: its threads, still spinning after
     * torch's last op, take these chunks at once. A pool of our own had to fight them for the
     * cores: in a transformer, where the products alternate with torch's attention and
     * normalisation, they took 2.5x the time they take back to back. */
    if (threads > 1 && n > 1 && !omp_in_parallel()) {
        int team = threads < n ? threads : (int)n;
        int64_t grain = (n + 4 * (int64_t)team - 1) / (4 * (int64_t)team); /* ~4 claims per thread */
        _Atomic int64_t next = 0;
#pragma omp parallel num_threads(team)
        for (;;) {
            int64_t first = atomic_fetch_add_explicit(&next, grain, memory_order_relaxed);
            if (first >= n) break;
            int64_t last = first + grain < n ? first + grain : n;
            for (int64_t chunk = first; chunk < last; chunk++) fn(ctx, chunk);
        }
        return;
    }
#elif HAVE_POOL
    int helpers = threads - 1 < MAX_HELPERS ? threads - 1 : MAX_HELPERS;
    if (helpers > 0 && n > 1 && !atomic_exchange(&pool.busy, 1)) {
        helpers = start_helpers(helpers);
        pool.fn = fn;
        pool.ctx = ctx;
        pool.n = n;
        pool.grain = (n + 4 * (helpers + 1) - 1) / (4 * (helpers + 1)); /* ~4 claims per thread */
        pool.wanted = helpers + 1;
        atomic_store(&pool.done, 0);
        uint64_t gen = (atomic_load(&pool.next) >> 32) + 1;
        atomic_store(&pool.next, gen << 32); /* publishes the job (sequentially consistent, as is the load below) */
        if (atomic_load(&pool.sleepers) > 0) {
            pthread_mutex_lock(&pool.lock);
            pthread_cond_broadcast(&pool.wake);
            pthread_mutex_unlock(&pool.lock);
        }
        work(gen, fn, ctx, n, pool.grain);
        while (atomic_load_explicit(&pool.done, memory_order_acquire) < n) relax(); /* claimed chunks only */
        atomic_store(&pool.busy, 0);
        return;
    }
#else
    (void)threads;
#endif
    for (int64_t i = 0; i < n; i++) fn(ctx, i);
}

/* ------------------------------------------------------------------------------------------ */
/* panels_matmul.
 *
 * Panel p covers rows 16p .. 16p + 15; a block is a panel's 16 codes for one column. Blocks
 * are stored in fours, interleaved byte by byte: in a 64-byte quad, byte 4i + q is lane i of
 * the quad's q-th block, so one load puts lane i's four codes in dword i, and block q is
 * decoded by a shift right of 8q and a permute (vpermt2ps reads only index bits 0-4): no
 * zero-extending shuffle.
 * Dense layout (blk_ptr == NULL): every column is a block; quad (g, k) holds column k of
 * panels 4g .. 4g + 3 (rows are padded to 64), at codes + 64 (g n_cols + k): at batch 1 an
 * active column is one cache line for four panels.
 * Block layout: panel p's blocks are blk_ptr[p] .. blk_ptr[p + 1], a multiple of 4 (padded
 * with blocks of column n_cols, whose activations the kernel packs as zeros), block b at
 * column cols[b], in quad b / 4 at byte b % 4. */

typedef struct {
    const uint8_t *codes;
    const int64_t *blk_ptr; /* NULL: dense */
    const int32_t *cols;
    int64_t n_cols, rows, panels;
} Panels;

/* Activations of a block of tokens, packed column by column (x[k * n + t]) so that a panel
 * kernel broadcasts them from one pointer, then a zero column (k = n_cols, the padding
 * blocks'), and the columns where some token is non-zero. */
typedef struct {
    int64_t first, n;
    float *x;
    int32_t *active;
    int64_t n_active;
} Tokens;

static void pack_tokens(const float *x, int64_t ldx, int64_t n_cols, Tokens *b) {
    int64_t n = 0;
    for (int64_t k = 0; k < n_cols; k++) {
        int any = 0;
        for (int64_t t = 0; t < b->n; t++) {
            float v = x[(b->first + t) * ldx + k];
            b->x[k * b->n + t] = v;
            any |= v != 0.0f;
        }
        b->active[n] = (int32_t)k;
        n += any;
    }
    for (int64_t t = 0; t < b->n; t++) b->x[n_cols * b->n + t] = 0.0f;
    b->n_active = n;
}

static uint8_t block_code(const uint8_t *quad, int q, int lane) { return quad[4 * lane + q] & (TABLE - 1); }

/* One panel for a block of tokens, portable: acc[t * 16 + i] = sum over blocks. */
static void panel_portable(const Panels *P, const float *table, const Tokens *b, int64_t p, float *acc) {
    int64_t nt = b->n;
    memset(acc, 0, sizeof(float) * LANES * nt);
    int dense = P->blk_ptr == NULL;
    int64_t first = dense ? 0 : P->blk_ptr[p], last = dense ? b->n_active : P->blk_ptr[p + 1];
    for (int64_t j = first; j < last; j++) {
        int64_t k = dense ? b->active[j] : P->cols[j];
        const uint8_t *quad = dense ? P->codes + 64 * ((p / SUPER) * P->n_cols + k) : P->codes + 64 * (j / 4);
        int q = dense ? (int)(p % SUPER) : (int)(j % 4);
        const float *xk = b->x + k * nt;
        for (int64_t t = 0; t < nt; t++)
            for (int i = 0; i < LANES; i++) acc[t * LANES + i] += table[block_code(quad, q, i)] * xk[t];
    }
}

#if HAVE_X86
#define DECODE(v, shift) _mm512_permutex2var_ps(lo, (shift) ? _mm512_srli_epi32((v), (shift)) : (v), hi)
#define QUAD(ptr) _mm512_loadu_si512((const void *)(ptr))

/* One panel for NT tokens (NT accumulators); KU sets of them when NT is small, so the FMA
 * chains stay independent. */
#define DEFINE_PANEL_KERNEL(NT, KU)                                                                              \
    AVX512 static void panel_##NT(const Panels *P, const float *table, const Tokens *b, int64_t p, float *acc) { \
        __m512 lo = _mm512_loadu_ps(table), hi = _mm512_loadu_ps(table + 16);                                    \
        __m512 a[KU][NT];                                                                                        \
        UNROLL for (int u = 0; u < KU; u++)                                                                             \
            UNROLL for (int t = 0; t < NT; t++) a[u][t] = _mm512_setzero_ps();                                          \
        const float *xs = b->x;                                                                                  \
        if (P->blk_ptr == NULL) {                                                                                \
            const int32_t *act = b->active;                                                                      \
            const uint8_t *base = P->codes + 64 * (p / SUPER) * P->n_cols;                                       \
            const int shift = 8 * (int)(p % SUPER);                                                              \
            int64_t n = b->n_active, j = 0;                                                                      \
            for (; j + KU <= n; j += KU)                                                                         \
                UNROLL for (int u = 0; u < KU; u++) {                                                                   \
                    int64_t k = act[j + u];                                                                      \
                    __m512 w = DECODE(QUAD(base + 64 * k), shift);                                               \
                    UNROLL for (int t = 0; t < NT; t++)                                                                 \
                        a[u][t] = _mm512_fmadd_ps(w, _mm512_set1_ps(xs[k * NT + t]), a[u][t]);                   \
                }                                                                                                \
            for (; j < n; j++) {                                                                                 \
                int64_t k = act[j];                                                                              \
                __m512 w = DECODE(QUAD(base + 64 * k), shift);                                                   \
                UNROLL for (int t = 0; t < NT; t++) a[0][t] = _mm512_fmadd_ps(w, _mm512_set1_ps(xs[k * NT + t]), a[0][t]); \
            }                                                                                                    \
        } else {                                                                                                 \
            const int32_t *cols = P->cols;                                                                       \
            int64_t j = P->blk_ptr[p], end = P->blk_ptr[p + 1];                                                  \
            for (; j < end; j += 4) { /* whole quads: padding blocks read the zero column */                    \
                __m512i v = QUAD(P->codes + 16 * j);                                                             \
                __m512 w0 = DECODE(v, 0), w1 = DECODE(v, 8), w2 = DECODE(v, 16), w3 = DECODE(v, 24);             \
                const float *x0 = xs + cols[j] * NT, *x1 = xs + cols[j + 1] * NT;                                \
                const float *x2 = xs + cols[j + 2] * NT, *x3 = xs + cols[j + 3] * NT;                            \
                UNROLL for (int t = 0; t < NT; t++) {                                                                   \
                    a[0][t] = _mm512_fmadd_ps(w0, _mm512_set1_ps(x0[t]), a[0][t]);                               \
                    a[1 % KU][t] = _mm512_fmadd_ps(w1, _mm512_set1_ps(x1[t]), a[1 % KU][t]);                     \
                    a[2 % KU][t] = _mm512_fmadd_ps(w2, _mm512_set1_ps(x2[t]), a[2 % KU][t]);                     \
                    a[3 % KU][t] = _mm512_fmadd_ps(w3, _mm512_set1_ps(x3[t]), a[3 % KU][t]);                     \
                }                                                                                                \
            }                                                                                                    \
        }                                                                                                        \
        UNROLL for (int u = 1; u < KU; u++)                                                                             \
            UNROLL for (int t = 0; t < NT; t++) a[0][t] = _mm512_add_ps(a[0][t], a[u][t]);                              \
        UNROLL for (int t = 0; t < NT; t++) _mm512_storeu_ps(acc + t * LANES, a[0][t]);                                 \
    }

DEFINE_PANEL_KERNEL(1, 4)
DEFINE_PANEL_KERNEL(2, 2)
DEFINE_PANEL_KERNEL(3, 2)
DEFINE_PANEL_KERNEL(4, 1)
DEFINE_PANEL_KERNEL(5, 1)
DEFINE_PANEL_KERNEL(6, 1)
DEFINE_PANEL_KERNEL(7, 1)
DEFINE_PANEL_KERNEL(8, 1)
DEFINE_PANEL_KERNEL(9, 1)
DEFINE_PANEL_KERNEL(10, 1)
DEFINE_PANEL_KERNEL(11, 1)
DEFINE_PANEL_KERNEL(12, 1)
DEFINE_PANEL_KERNEL(13, 1)
DEFINE_PANEL_KERNEL(14, 1)
DEFINE_PANEL_KERNEL(15, 1)
DEFINE_PANEL_KERNEL(16, 1)
DEFINE_PANEL_KERNEL(17, 1)
DEFINE_PANEL_KERNEL(18, 1)
DEFINE_PANEL_KERNEL(19, 1)
DEFINE_PANEL_KERNEL(20, 1)
DEFINE_PANEL_KERNEL(21, 1)
DEFINE_PANEL_KERNEL(22, 1)
DEFINE_PANEL_KERNEL(23, 1)
DEFINE_PANEL_KERNEL(24, 1)

typedef void (*PanelKernel)(const Panels *, const float *, const Tokens *, int64_t, float *);
static const PanelKernel panel_kernels[TOKENS_MAX + 1] = {
    NULL,     panel_1,  panel_2,  panel_3,  panel_4,  panel_5,  panel_6,  panel_7,  panel_8,
    panel_9,  panel_10, panel_11, panel_12, panel_13, panel_14, panel_15, panel_16, panel_17,
    panel_18, panel_19, panel_20, panel_21, panel_22, panel_23, panel_24};

#define PANEL_PREFETCH 16 /* active columns ahead whose cache lines the batch-1 panel kernel prefetches */

/* Batch 1 on the dense layout: a group of SUPER panels per pass (one cache line per active
 * column), two columns in flight: 8 independent FMA chains. */
AVX512 static void group_matvec(const Panels *P, const float *table, const Tokens *b, int64_t g, float *acc) {
    __m512 lo = _mm512_loadu_ps(table), hi = _mm512_loadu_ps(table + 16);
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    __m512 b0 = _mm512_setzero_ps(), b1 = _mm512_setzero_ps(), b2 = _mm512_setzero_ps(), b3 = _mm512_setzero_ps();
    const uint8_t *base = P->codes + 64 * g * P->n_cols;
    const int32_t *act = b->active;
    const float *x = b->x;
    int64_t n = b->n_active, j = 0;
    for (; j + 2 <= n; j += 2) {
        int64_t k = act[j], m = act[j + 1];
        /* skipped columns make the lines' addresses jump where the hardware prefetcher cannot follow */
        if (j + PANEL_PREFETCH + 1 < n) {
            __builtin_prefetch(base + 64 * act[j + PANEL_PREFETCH]);
            __builtin_prefetch(base + 64 * act[j + PANEL_PREFETCH + 1]);
        }
        __m512i v = QUAD(base + 64 * k), u = QUAD(base + 64 * m);
        __m512 xk = _mm512_set1_ps(x[k]), xm = _mm512_set1_ps(x[m]);
        a0 = _mm512_fmadd_ps(DECODE(v, 0), xk, a0);
        a1 = _mm512_fmadd_ps(DECODE(v, 8), xk, a1);
        a2 = _mm512_fmadd_ps(DECODE(v, 16), xk, a2);
        a3 = _mm512_fmadd_ps(DECODE(v, 24), xk, a3);
        b0 = _mm512_fmadd_ps(DECODE(u, 0), xm, b0);
        b1 = _mm512_fmadd_ps(DECODE(u, 8), xm, b1);
        b2 = _mm512_fmadd_ps(DECODE(u, 16), xm, b2);
        b3 = _mm512_fmadd_ps(DECODE(u, 24), xm, b3);
    }
    if (j < n) {
        int64_t k = act[j];
        __m512i v = QUAD(base + 64 * k);
        __m512 xk = _mm512_set1_ps(x[k]);
        a0 = _mm512_fmadd_ps(DECODE(v, 0), xk, a0);
        a1 = _mm512_fmadd_ps(DECODE(v, 8), xk, a1);
        a2 = _mm512_fmadd_ps(DECODE(v, 16), xk, a2);
        a3 = _mm512_fmadd_ps(DECODE(v, 24), xk, a3);
    }
    _mm512_storeu_ps(acc, _mm512_add_ps(a0, b0));
    _mm512_storeu_ps(acc + 16, _mm512_add_ps(a1, b1));
    _mm512_storeu_ps(acc + 32, _mm512_add_ps(a2, b2));
    _mm512_storeu_ps(acc + 48, _mm512_add_ps(a3, b3));
}
#endif

static void store_rows(const float *acc, int64_t n_tokens, int64_t first_token, int64_t row0, int64_t n_rows,
                       int64_t rows, const float *bias, float *out, int64_t ldo) {
    int64_t n = min64(rows - row0, n_rows);
    for (int64_t t = 0; t < n_tokens; t++) {
        float *o = out + (first_token + t) * ldo + row0;
        for (int64_t i = 0; i < n; i++) o[i] = acc[t * n_rows + i] + bias[row0 + i];
    }
}

typedef struct {
    const Panels *P;
    const float *table, *bias;
    const Tokens *blocks;
    float *out;
    int64_t ldo, n_blocks;
} PanelJob;

#if HAVE_X86
/* Batch 1, dense layout: chunk g is a group of SUPER panels. */
static void group_chunk(const void *ctx, int64_t g) {
    const PanelJob *j = ctx;
    float acc[LANES * SUPER] __attribute__((aligned(64)));
    group_matvec(j->P, j->table, &j->blocks[0], g, acc);
    store_rows(acc, 1, 0, g * LANES * SUPER, LANES * SUPER, j->P->rows, j->bias, j->out, j->ldo);
}
#endif

static void panel_block(const PanelJob *j, int64_t p, int64_t bi) {
    float acc[LANES * TOKENS_MAX] __attribute__((aligned(64)));
    const Tokens *b = &j->blocks[bi];
#if HAVE_X86
    if (use_avx512)
        panel_kernels[b->n](j->P, j->table, b, p, acc);
    else
#endif
        panel_portable(j->P, j->table, b, p, acc);
    store_rows(acc, b->n, b->first, p * LANES, LANES, j->P->rows, j->bias, j->out, j->ldo);
}

/* Few token blocks: chunk p is panel p for every block (a thread streams its panels' codes
 * once); many: chunk b is token block b for every panel (its packed activations stay in cache). */
static void panel_chunk(const void *ctx, int64_t p) {
    const PanelJob *j = ctx;
    for (int64_t bi = 0; bi < j->n_blocks; bi++) panel_block(j, p, bi);
}

static void token_block_chunk(const void *ctx, int64_t bi) {
    const PanelJob *j = ctx;
    for (int64_t p = 0; p < j->P->panels; p++) panel_block(j, p, bi);
}

/* Tokens per block when `tokens` are cut into blocks of at most `most`, their number in *n_blocks; even
 * blocks: 30 tokens at most 24 a block are 15 + 15, not 24 + 6. */
static int64_t even_blocks(int64_t tokens, int64_t most, int64_t *n_blocks) {
    *n_blocks = (tokens + most - 1) / most;
    return (tokens + *n_blocks - 1) / *n_blocks;
}

static void panels_matmul_run(const Panels *P, const float *table, const float *x, int64_t ldx, float *out,
                              int64_t ldo, const float *bias, int64_t tokens, int threads) {
    int64_t n_blocks, per_block = even_blocks(tokens, TOKENS_MAX, &n_blocks);
    Tokens *blocks = malloc(sizeof(Tokens) * n_blocks);
    float *xs = malloc(sizeof(float) * (P->n_cols + 1) * tokens);
    int32_t *act = malloc(sizeof(int32_t) * (P->n_cols * n_blocks + 1));
    for (int64_t bi = 0; bi < n_blocks; bi++) {
        Tokens *b = &blocks[bi];
        b->first = bi * per_block;
        b->n = min64(tokens - b->first, per_block);
        b->x = xs + b->first * (P->n_cols + 1);
        b->active = act + bi * P->n_cols;
        pack_tokens(x, ldx, P->n_cols, b);
    }
    PanelJob job = {P, table, bias, blocks, out, ldo, n_blocks};
#if HAVE_X86
    if (use_avx512 && tokens == 1 && P->blk_ptr == NULL)
        parallel_chunks(group_chunk, &job, (P->panels + SUPER - 1) / SUPER, threads);
    else
#endif
        if (n_blocks >= 2 * threads)
        parallel_chunks(token_block_chunk, &job, n_blocks, threads);
    else
        parallel_chunks(panel_chunk, &job, P->panels, threads);
    free(blocks);
    free(xs);
    free(act);
}

/* ------------------------------------------------------------------------------------------ */
/* int8_matmul: products in int8 on VNNI, for arithmetic="int8".
 *
 * W in 16-row panels of codes grouped by four columns: in the 64 codes of panel p, group c, code
 * 4i + q is that of row 16p + i, column 4c + q (rows and columns padded with a code whose value is
 * 0), one byte each, or, where every code is below 16, two to a byte (32 bytes: half the memory
 * traffic, which bounds small batches). One vpermb through the layer's table (its codebook as int8,
 * at most 64 values, one scale for the layer) decodes 64 weights straight into the order vpdpbusd
 * reads (table NULL: the bytes are the int8 weights themselves, for codebooks of more values).
 * Each token is quantized on its own, q = rint(x * 127 / max|x|), and stored as q + 128 (an
 * unsigned byte: vpdpbusd multiplies unsigned by signed), four columns to a dword, so one
 * broadcast and one vpdpbusd make 64 multiply-adds into exact int32 sums (|sum| <= cols * 255 *
 * 127 < 2^31 below 65,536 columns). Then out = float(sum - 128 rowsum) * (scale_t * wscale) +
 * bias, and the layer's outliers, the few weights whose centroid is far beyond the others (their
 * code is 0 in the table, so they do not coarsen everyone's scale), added in float32 from a CSR
 * list: out += x[col] * value, row by row in order. Every multiply and add rounded apart:
 * bit-exact against the NumPy reference (deepshrink.arithmetic.int8_matmul_reference) on
 * every instruction set.
 *
 * The block layout (matrices pruned in 16 x 1 blocks) keeps only the blocks holding a weight, four
 * to a group as their int8 weights (byte 4i + q: row i of block q), and turns the loops around:
 * the tokens in the lanes. A block of 16 tokens is quantized as above, then each group of four
 * columns transposed in place (column c's 16 tokens at byte 16c), so a group's activations are
 * four 16-byte loads from anywhere and one vpermb, and each row's four weights one broadcast:
 * 16 vpdpbusd, one per row of the panel, per group of four blocks. The 16 x 16 sums are then
 * transposed in registers into the dense kernels' order, and stored as theirs.
 *
 * The row layout (unstructured sparsity) keeps, row by row, each group of four columns holding a
 * kept weight (its number, and its four int8 weights, zeros included), and the activations as
 * quantized (not transposed): a group's 16 tokens are one 64-byte load, so one load and one
 * vpdpbusd make a row's 64 multiply-adds (the zeros' among them): one instruction per group a row
 * touches (31% of them at 9% density), against one per group of every row in the dense layout.
 * The groups are cut into chunks of INT8_ROW_CHUNK, and a unit of work runs chunk by chunk over
 * its rows, their sums kept in memory between chunks: the chunk's activations stay in L1 (over a
 * whole width of 1,024 groups the same loop ran 1.6x slower, measured in isolation). */

#define INT8_TABLE 64       /* values one vpermb decodes from */
#define INT8_ROW_CHUNK 256  /* groups of four columns a chunk of the row layout spans: 16 tokens' activations, 16 KiB */
#define ROW_ACC 4           /* the row layout's chains: a row's groups come in multiples of 4 */
#define INT8_ROW_PANELS 8   /* panels a unit of the row layout's work covers: their sums stay in L1 between chunks */
enum { INT8_DENSE, INT8_BLOCKS, INT8_ROWS };
#define INT8_PAIR_TOKENS 12 /* tokens of a block run two panels at a time (2 x 12 accumulators) */
#define INT8_PAIR_MIN 8     /* fewest tokens that run the pair kernels */

typedef struct {
    const uint8_t *codes;
    const int8_t *table; /* NULL: codes are the weights */
    int64_t vec;         /* bytes of a group's 64 codes: 64, or 32 packed two to a byte (4-bit codes) */
    int kind;            /* INT8_DENSE, INT8_BLOCKS or INT8_ROWS */
    const int64_t *ptr;  /* blocks: panel p's 16 x 1 blocks are ptr[p] .. ptr[p + 1]; rows: row r's groups in chunk
                          * c are ptr[c * rows + r] .. ptr[c * rows + r + 1] */
    int64_t chunks;      /* rows: chunks of INT8_ROW_CHUNK groups */
    const uint16_t *cols; /* blocks: each block's column; rows: each group's number; codes: their int8 weights */
    const int32_t *rowsum;
    const int64_t *outlier_ptr; /* rows + 1 */
    const int32_t *outlier_cols;
    const float *outlier_values;
    float wscale;
    int64_t groups, rows, panels;
} Int8Panels;

/* A block of tokens quantized: x[c * n + t] holds token t's four bytes of column group c. */
typedef struct {
    int64_t first, n;
    uint32_t *x;
    float *scale; /* per token: max|x| / 127 */
} Int8Tokens;

static float int8_inverse(float peak) { return peak > 0.0f ? 127.0f / peak : 0.0f; }
static float int8_scale(float peak) { return peak > 0.0f ? peak / 127.0f : 0.0f; }

/* A token holding a NaN or an infinity: its outputs are NaN (as a float product's would be), its bytes all zeros. */
static void quantize_nonfinite(int64_t groups, int64_t stride, uint8_t *q, float *scale) {
    *scale = NAN;
    for (int64_t c = 0; c < groups; c++) memset(q + c * stride, 128, 4);
}

static void quantize_portable(const float *x, int64_t n_cols, int64_t groups, int64_t stride, uint8_t *q, float *scale) {
    float peak = 0.0f;
    for (int64_t k = 0; k < n_cols; k++) {
        float a = fabsf(x[k]);
        if (!(a <= FLT_MAX)) return quantize_nonfinite(groups, stride, q, scale);
        peak = a > peak ? a : peak;
    }
    float inv = int8_inverse(peak);
    *scale = int8_scale(peak);
    for (int64_t c = 0; c < groups; c++)
        for (int r = 0; r < 4; r++) {
            int64_t k = 4 * c + r;
            float v = k < n_cols ? nearbyintf(x[k] * inv) : 0.0f;
            v = v > 127.0f ? 127.0f : v < -127.0f ? -127.0f : v;
            q[c * stride + r] = (uint8_t)((int)v + 128);
        }
}

/* Byte `lane` of a group's 64 weights; packed, code j < 32 is the low nibble of byte j, code j >= 32
 * the high nibble of byte j - 32 (so two masks and a shift unpack 64 codes in order). */
static int64_t int8_weight(const Int8Panels *P, const uint8_t *vec, int lane) {
    if (P->vec == 32) return P->table[lane < 32 ? vec[lane] & 15 : vec[lane - 32] >> 4];
    return P->table ? P->table[vec[lane] & (INT8_TABLE - 1)] : (int8_t)vec[lane];
}

static void int8_panel_portable(const Int8Panels *P, const Int8Tokens *b, int64_t p, int32_t *acc) {
    memset(acc, 0, sizeof(int32_t) * LANES * b->n);
    const uint8_t *codes = P->codes + P->vec * p * P->groups;
    for (int64_t c = 0; c < P->groups; c++)
        for (int64_t t = 0; t < b->n; t++) {
            const uint8_t *xb = (const uint8_t *)&b->x[c * b->n + t];
            for (int i = 0; i < LANES; i++)
                for (int r = 0; r < 4; r++) acc[t * LANES + i] += (int32_t)xb[r] * (int32_t)int8_weight(P, codes + P->vec * c, 4 * i + r);
        }
}

/* The block layout, tokens in the lanes: acc as the dense kernels leave it (acc[t * 16 + i], row i, token t). */
static void int8_blocks_portable(const Int8Panels *P, const Int8Tokens *b, int64_t p, int32_t *acc) {
    memset(acc, 0, sizeof(int32_t) * LANES * b->n);
    const uint8_t *xt = (const uint8_t *)b->x;
    for (int i = 0; i < LANES; i++)
        for (int64_t k = P->ptr[p]; k < P->ptr[p + 1]; k++) {
            int8_t w = (int8_t)P->codes[16 * (k & ~3) + 4 * i + (k & 3)];
            for (int64_t t = 0; t < b->n; t++) acc[t * LANES + i] += (int32_t)xt[P->cols[k] * LANES + t] * (int32_t)w;
        }
}

/* The row layout's rows first .. last - 1 (those of a unit of panels): sums[16 (r - first) + t], token t in lane t. */
static void int8_rows_portable(const Int8Panels *P, const Int8Tokens *b, int64_t first, int64_t last, int32_t *sums) {
    memset(sums, 0, sizeof(int32_t) * LANES * (last - first));
    const uint8_t *x = (const uint8_t *)b->x;
    for (int64_t c = 0; c < P->chunks; c++)
        for (int64_t r = first; r < last; r++)
            for (int64_t k = P->ptr[c * P->rows + r]; k < P->ptr[c * P->rows + r + 1]; k++)
                for (int64_t t = 0; t < b->n; t++)
                    for (int q = 0; q < 4; q++)
                        sums[LANES * (r - first) + t] += (int32_t)x[4 * (P->cols[k] * LANES + t) + q] * (int32_t)(int8_t)P->codes[4 * k + q];
}

#if HAVE_X86
#define AVX512VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512vbmi")))
static int use_vnni = 0;

AVX512VNNI static void quantize_avx512(const float *x, int64_t n_cols, int64_t groups, int64_t stride, uint8_t *q,
                                       float *scale) {
    __m512 peak = _mm512_setzero_ps(), largest = _mm512_set1_ps(FLT_MAX);
    __mmask16 bad = 0;
    for (int64_t k = 0; k < n_cols; k += 16) {
        __mmask16 m = n_cols - k >= 16 ? 0xFFFF : (__mmask16)((1u << (n_cols - k)) - 1);
        __m512 a = _mm512_abs_ps(_mm512_maskz_loadu_ps(m, x + k));
        bad |= _mm512_cmp_ps_mask(a, largest, _CMP_NLE_UQ); /* NaN (unordered) or infinite */
        peak = _mm512_max_ps(peak, a);
    }
    if (bad) return quantize_nonfinite(groups, stride, q, scale);
    float top = _mm512_reduce_max_ps(peak);
    __m512 inv = _mm512_set1_ps(int8_inverse(top));
    *scale = int8_scale(top);
    const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127), zero = _mm512_set1_epi32(128);
    for (int64_t c = 0; c < groups; c += 4) { /* 16 columns: four groups */
        int64_t k = 4 * c;
        __mmask16 m = n_cols - k >= 16 ? 0xFFFF : n_cols > k ? (__mmask16)((1u << (n_cols - k)) - 1) : 0;
        __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + k), inv));
        v = _mm512_add_epi32(_mm512_min_epi32(_mm512_max_epi32(v, lo), hi), zero);
        uint32_t words[4];
        _mm_storeu_si128((__m128i *)words, _mm512_cvtepi32_epi8(v));
        for (int64_t g = 0; g < 4 && c + g < groups; g++) memcpy(q + (c + g) * stride, &words[g], 4);
    }
}

AVX512VNNI static inline __m512i unpack_nibbles(const uint8_t *ptr) {
    __m256i v = _mm256_loadu_si256((const __m256i *)ptr), low = _mm256_set1_epi8(15);
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(v, low)),
                              _mm256_and_si256(_mm256_srli_epi16(v, 4), low), 1);
}

AVX512VNNI static void transpose_group_avx512(uint8_t *v) {
    const __m512i order = _mm512_set_epi32(0x3f3b3733, 0x2f2b2723, 0x1f1b1713, 0x0f0b0703, 0x3e3a3632, 0x2e2a2622,
                                           0x1e1a1612, 0x0e0a0602, 0x3d393531, 0x2d292521, 0x1d191511, 0x0d090501,
                                           0x3c383430, 0x2c282420, 0x1c181410, 0x0c080400);
    _mm512_storeu_si512((void *)v, _mm512_permutexvar_epi8(order, _mm512_loadu_si512((const void *)v)));
}

/* A group's 64 int8 weights: 4-bit codes unpacked, or one-byte codes, through the table (or the bytes themselves). */
#define WEIGHTS(ptr)                                                     \
    (P->vec == 32 ? _mm512_permutexvar_epi8(unpack_nibbles(ptr), table) \
     : P->table   ? _mm512_permutexvar_epi8(QUAD(ptr), table)           \
                  : QUAD(ptr))

/* One panel for NT tokens; KU sets of accumulators when NT is small, so the chains stay independent. */
#define DEFINE_INT8_KERNEL(NT, KU)                                                                           \
    AVX512VNNI static void int8_panel_##NT(const Int8Panels *P, const Int8Tokens *b, int64_t p, int32_t *acc) { \
        __m512i table = P->table ? _mm512_loadu_si512((const void *)P->table) : _mm512_setzero_si512();       \
        __m512i a[KU][NT];                                                                                   \
        UNROLL for (int u = 0; u < KU; u++) UNROLL for (int t = 0; t < NT; t++) a[u][t] = _mm512_setzero_si512(); \
        const uint8_t *codes = P->codes + P->vec * p * P->groups;                                            \
        const int32_t *x = (const int32_t *)b->x;                                                            \
        int64_t n = P->groups, c = 0;                                                                        \
        for (; c + KU <= n; c += KU)                                                                         \
            UNROLL for (int u = 0; u < KU; u++) {                                                            \
                __m512i w = WEIGHTS(codes + P->vec * (c + u));                                               \
                UNROLL for (int t = 0; t < NT; t++)                                                          \
                    a[u][t] = _mm512_dpbusd_epi32(a[u][t], _mm512_set1_epi32(x[(c + u) * NT + t]), w);       \
            }                                                                                                \
        for (; c < n; c++) {                                                                                 \
            __m512i w = WEIGHTS(codes + P->vec * c);                                                         \
            UNROLL for (int t = 0; t < NT; t++) a[0][t] = _mm512_dpbusd_epi32(a[0][t], _mm512_set1_epi32(x[c * NT + t]), w); \
        }                                                                                                    \
        UNROLL for (int u = 1; u < KU; u++) UNROLL for (int t = 0; t < NT; t++) a[0][t] = _mm512_add_epi32(a[0][t], a[u][t]); \
        UNROLL for (int t = 0; t < NT; t++) _mm512_storeu_si512((void *)(acc + t * LANES), a[0][t]);        \
    }

DEFINE_INT8_KERNEL(1, 4)
DEFINE_INT8_KERNEL(2, 2)
DEFINE_INT8_KERNEL(3, 2)
DEFINE_INT8_KERNEL(4, 1)
DEFINE_INT8_KERNEL(5, 1)
DEFINE_INT8_KERNEL(6, 1)
DEFINE_INT8_KERNEL(7, 1)
DEFINE_INT8_KERNEL(8, 1)
DEFINE_INT8_KERNEL(9, 1)
DEFINE_INT8_KERNEL(10, 1)
DEFINE_INT8_KERNEL(11, 1)
DEFINE_INT8_KERNEL(12, 1)
DEFINE_INT8_KERNEL(13, 1)
DEFINE_INT8_KERNEL(14, 1)
DEFINE_INT8_KERNEL(15, 1)
DEFINE_INT8_KERNEL(16, 1)
DEFINE_INT8_KERNEL(17, 1)
DEFINE_INT8_KERNEL(18, 1)
DEFINE_INT8_KERNEL(19, 1)
DEFINE_INT8_KERNEL(20, 1)
DEFINE_INT8_KERNEL(21, 1)
DEFINE_INT8_KERNEL(22, 1)
DEFINE_INT8_KERNEL(23, 1)
DEFINE_INT8_KERNEL(24, 1)

typedef void (*Int8Kernel)(const Int8Panels *, const Int8Tokens *, int64_t, int32_t *);
static const Int8Kernel int8_kernels[TOKENS_MAX + 1] = {
    NULL,    int8_panel_1,  int8_panel_2,  int8_panel_3,  int8_panel_4,  int8_panel_5,  int8_panel_6,
    int8_panel_7,  int8_panel_8,  int8_panel_9,  int8_panel_10, int8_panel_11, int8_panel_12, int8_panel_13,
    int8_panel_14, int8_panel_15, int8_panel_16, int8_panel_17, int8_panel_18, int8_panel_19, int8_panel_20,
    int8_panel_21, int8_panel_22, int8_panel_23, int8_panel_24};

/* Two panels for NT tokens (batches): each broadcast activation feeds both panels' vpdpbusd,
 * half the loads of one panel at a time. acc: panel p's NT x 16 sums, then panel p + 1's. */
#define DEFINE_INT8_PAIR(NT)                                                                                  \
    AVX512VNNI static void int8_pair_##NT(const Int8Panels *P, const Int8Tokens *b, int64_t p, int32_t *acc) { \
        __m512i table = P->table ? _mm512_loadu_si512((const void *)P->table) : _mm512_setzero_si512();       \
        __m512i a0[NT], a1[NT];                                                                              \
        UNROLL for (int t = 0; t < NT; t++) a0[t] = a1[t] = _mm512_setzero_si512();                          \
        const uint8_t *c0 = P->codes + P->vec * p * P->groups, *c1 = c0 + P->vec * P->groups;               \
        const int32_t *x = (const int32_t *)b->x;                                                            \
        for (int64_t c = 0; c < P->groups; c++) {                                                            \
            __m512i w0 = WEIGHTS(c0 + P->vec * c), w1 = WEIGHTS(c1 + P->vec * c);                            \
            UNROLL for (int t = 0; t < NT; t++) {                                                            \
                __m512i v = _mm512_set1_epi32(x[c * NT + t]);                                                \
                a0[t] = _mm512_dpbusd_epi32(a0[t], v, w0);                                                   \
                a1[t] = _mm512_dpbusd_epi32(a1[t], v, w1);                                                   \
            }                                                                                                \
        }                                                                                                    \
        UNROLL for (int t = 0; t < NT; t++) {                                                                \
            _mm512_storeu_si512((void *)(acc + t * LANES), a0[t]);                                           \
            _mm512_storeu_si512((void *)(acc + (NT + t) * LANES), a1[t]);                                    \
        }                                                                                                    \
    }

DEFINE_INT8_PAIR(1)
DEFINE_INT8_PAIR(2)
DEFINE_INT8_PAIR(3)
DEFINE_INT8_PAIR(4)
DEFINE_INT8_PAIR(5)
DEFINE_INT8_PAIR(6)
DEFINE_INT8_PAIR(7)
DEFINE_INT8_PAIR(8)
DEFINE_INT8_PAIR(9)
DEFINE_INT8_PAIR(10)
DEFINE_INT8_PAIR(11)
DEFINE_INT8_PAIR(12)

/* Byte 4t + q: token t's activation in column c[q], from the transposed block (column c's 16 tokens at byte 16c). */
AVX512VNNI static inline __m512i group_activations(const uint8_t *xt, const uint16_t *c) {
    const __m512i gather = _mm512_set_epi32(0x3f2f1f0f, 0x3e2e1e0e, 0x3d2d1d0d, 0x3c2c1c0c, 0x3b2b1b0b, 0x3a2a1a0a,
                                            0x39291909, 0x38281808, 0x37271707, 0x36261606, 0x35251505, 0x34241404,
                                            0x33231303, 0x32221202, 0x31211101, 0x30201000);
    __m512i v = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)(xt + LANES * c[0])));
    v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(xt + LANES * c[1])), 1);
    v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(xt + LANES * c[2])), 2);
    v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(xt + LANES * c[3])), 3);
    return _mm512_permutexvar_epi8(gather, v);
}

/* 16 x 16 sums (a[i]: row i, token t in lane t) into acc[t * 16 + i]: pairs, quads of rows, then 128-bit quarters. */
AVX512VNNI static void transpose_sums(const __m512i *a, int32_t *acc) {
    __m512 t[LANES], u[LANES];
    UNROLL for (int k = 0; k < 8; k++) {
        t[2 * k] = _mm512_unpacklo_ps(_mm512_castsi512_ps(a[2 * k]), _mm512_castsi512_ps(a[2 * k + 1]));
        t[2 * k + 1] = _mm512_unpackhi_ps(_mm512_castsi512_ps(a[2 * k]), _mm512_castsi512_ps(a[2 * k + 1]));
    }
    UNROLL for (int m = 0; m < 4; m++) { /* u[4m + c]: rows 4m .. 4m + 3 of token 4L + c in quarter L */
        u[4 * m] = _mm512_shuffle_ps(t[4 * m], t[4 * m + 2], 0x44);
        u[4 * m + 1] = _mm512_shuffle_ps(t[4 * m], t[4 * m + 2], 0xEE);
        u[4 * m + 2] = _mm512_shuffle_ps(t[4 * m + 1], t[4 * m + 3], 0x44);
        u[4 * m + 3] = _mm512_shuffle_ps(t[4 * m + 1], t[4 * m + 3], 0xEE);
    }
    UNROLL for (int c = 0; c < 4; c++) {
        __m512 lo01 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x44), hi01 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xEE);
        __m512 lo23 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x44), hi23 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xEE);
        _mm512_storeu_ps((float *)(acc + c * LANES), _mm512_shuffle_f32x4(lo01, lo23, 0x88));
        _mm512_storeu_ps((float *)(acc + (4 + c) * LANES), _mm512_shuffle_f32x4(lo01, lo23, 0xDD));
        _mm512_storeu_ps((float *)(acc + (8 + c) * LANES), _mm512_shuffle_f32x4(hi01, hi23, 0x88));
        _mm512_storeu_ps((float *)(acc + (12 + c) * LANES), _mm512_shuffle_f32x4(hi01, hi23, 0xDD));
    }
}

/* The block layout's panel p for a block of up to 16 tokens (the lanes): one accumulator per row. */
AVX512VNNI static void int8_blocks_avx512(const Int8Panels *P, const Int8Tokens *b, int64_t p, int32_t *acc) {
    __m512i a[LANES];
    UNROLL for (int i = 0; i < LANES; i++) a[i] = _mm512_setzero_si512();
    const uint8_t *xt = (const uint8_t *)b->x;
    for (int64_t k = P->ptr[p]; k < P->ptr[p + 1]; k += 4) {
        __m512i v = group_activations(xt, P->cols + k);
        const int32_t *w = (const int32_t *)(P->codes + 16 * k);
        UNROLL for (int i = 0; i < LANES; i++) a[i] = _mm512_dpbusd_epi32(a[i], v, _mm512_set1_epi32(w[i]));
    }
    transpose_sums(a, acc);
}

/* The row layout's rows first .. last - 1, as int8_rows_portable: chunk by chunk, each row's groups in turn (four
 * accumulators, so the vpdpbusd chains overlap), its sums kept in sums between chunks. */
AVX512VNNI static void int8_rows_avx512(const Int8Panels *P, const Int8Tokens *b, int64_t first, int64_t last, int32_t *sums) {
    const uint32_t *x = b->x;
    const int32_t *w = (const int32_t *)P->codes;
    for (int64_t r = first; r < last; r++) _mm512_store_si512((void *)(sums + LANES * (r - first)), _mm512_setzero_si512());
    for (int64_t c = 0; c < P->chunks; c++) {
        const int64_t *ptr = P->ptr + c * P->rows;
        for (int64_t r = first; r < last; r++) {
            int64_t k = ptr[r], end = ptr[r + 1];
            if (k == end) continue;
            int32_t *row = sums + LANES * (r - first);
            __m512i s[ROW_ACC];
            UNROLL for (int u = 0; u < ROW_ACC; u++) s[u] = _mm512_setzero_si512();
            s[0] = _mm512_load_si512((const void *)row);
            for (; k < end; k += ROW_ACC) /* a multiple of ROW_ACC: the layout pads each row with zeros */
                UNROLL for (int u = 0; u < ROW_ACC; u++) s[u] = _mm512_dpbusd_epi32(
                    s[u], _mm512_load_si512((const void *)(x + LANES * P->cols[k + u])), _mm512_set1_epi32(w[k + u]));
            UNROLL for (int h = ROW_ACC / 2; h > 0; h /= 2) UNROLL for (int u = 0; u < h; u++) s[u] = _mm512_add_epi32(s[u], s[u + h]);
            _mm512_store_si512((void *)row, s[0]);
        }
    }
}

static const Int8Kernel int8_pairs[INT8_PAIR_TOKENS + 1] = {
    NULL, int8_pair_1, int8_pair_2, int8_pair_3, int8_pair_4,  int8_pair_5, int8_pair_6,
    int8_pair_7, int8_pair_8, int8_pair_9, int8_pair_10, int8_pair_11, int8_pair_12};
#endif

typedef struct {
    const Int8Panels *P;
    const Int8Tokens *blocks;
    const float *bias, *x;
    float *out;
    int64_t ldx, ldo, n_blocks, step; /* step: panels a unit of work covers (2: the pair kernels) */
} Int8Job;

/* The outliers of panel p's rows, in float32, after the int8 sums are stored. */
static void int8_outliers(const Int8Job *j, const Int8Tokens *b, int64_t p) {
    const Int8Panels *P = j->P;
    for (int64_t r = p * LANES; r < min64(P->rows, (p + 1) * LANES); r++)
        for (int64_t e = P->outlier_ptr[r]; e < P->outlier_ptr[r + 1]; e++) {
            const float *x = j->x + b->first * j->ldx + P->outlier_cols[e];
            float value = P->outlier_values[e], *o = j->out + b->first * j->ldo + r;
            for (int64_t t = 0; t < b->n; t++) o[t * j->ldo] = o[t * j->ldo] + x[t * j->ldx] * value;
        }
}

/* Sums to outputs, one multiply and one add each in float32 (the reference's operations). */
static void int8_store(const Int8Job *j, const int32_t *acc, const Int8Tokens *b, int64_t p) {
    const Int8Panels *P = j->P;
    int64_t row0 = p * LANES, n = min64(P->rows - row0, LANES);
    for (int64_t t = 0; t < b->n; t++) {
        float s = b->scale[t] * P->wscale;
        float *o = j->out + (b->first + t) * j->ldo + row0;
        for (int64_t i = 0; i < n; i++) {
            float v = (float)(acc[t * LANES + i] - 128 * P->rowsum[row0 + i]) * s;
            o[i] = v + j->bias[row0 + i];
        }
    }
}

#if HAVE_X86
AVX512VNNI static void int8_store_avx512(const Int8Job *j, const int32_t *acc, const Int8Tokens *b, int64_t p) {
    const Int8Panels *P = j->P;
    int64_t row0 = p * LANES, n = min64(P->rows - row0, LANES);
    __mmask16 m = n == LANES ? 0xFFFF : (__mmask16)((1u << n) - 1);
    __m512i zero_point = _mm512_slli_epi32(_mm512_loadu_si512((const void *)(P->rowsum + row0)), 7);
    __m512 bias = _mm512_maskz_loadu_ps(m, j->bias + row0);
    for (int64_t t = 0; t < b->n; t++) {
        __m512i sums = _mm512_sub_epi32(_mm512_loadu_si512((const void *)(acc + t * LANES)), zero_point);
        __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(sums), _mm512_set1_ps(b->scale[t] * P->wscale));
        _mm512_mask_storeu_ps(j->out + (b->first + t) * j->ldo + row0, m, _mm512_add_ps(v, bias));
    }
}
#endif

/* Panel p's sums (acc[t * 16 + i], row i, token t) to outputs, then its rows' outliers. */
static void int8_finish(const Int8Job *j, const int32_t *acc, const Int8Tokens *b, int64_t p) {
#if HAVE_X86
    if (use_vnni)
        int8_store_avx512(j, acc, b, p);
    else
#endif
        int8_store(j, acc, b, p);
    int8_outliers(j, b, p);
}

/* A panel's sums in the row layout's order (row i's 16 tokens at sums[16 i]) into the dense kernels' (acc[t * 16 + i]). */
static void sums_to_acc(const int32_t *sums, int64_t tokens, int32_t *acc) {
#if HAVE_X86
    if (use_vnni) {
        transpose_sums((const __m512i *)sums, acc);
        return;
    }
#endif
    for (int64_t t = 0; t < tokens; t++)
        for (int i = 0; i < LANES; i++) acc[t * LANES + i] = sums[LANES * i + t];
}

/* Unit u of token block bi: panels step u .. step u + step - 1. */
static void int8_block(const Int8Job *j, int64_t u, int64_t bi) {
    int32_t acc[LANES * TOKENS_MAX] __attribute__((aligned(64)));
    const Int8Tokens *b = &j->blocks[bi];
    int64_t first = u * j->step, last = min64(first + j->step, j->P->panels);
    if (j->P->kind == INT8_BLOCKS) {
#if HAVE_X86
        if (use_vnni)
            int8_blocks_avx512(j->P, b, first, acc);
        else
#endif
            int8_blocks_portable(j->P, b, first, acc);
        int8_finish(j, acc, b, first);
        return;
    }
    if (j->P->kind == INT8_ROWS) {
        int32_t sums[LANES * LANES * INT8_ROW_PANELS] __attribute__((aligned(64)));
        int64_t r1 = min64(last * LANES, j->P->rows);
        memset(sums + LANES * (r1 - first * LANES), 0, sizeof(int32_t) * LANES * (last * LANES - r1)); /* padding rows */
#if HAVE_X86
        if (use_vnni)
            int8_rows_avx512(j->P, b, first * LANES, r1, sums);
        else
#endif
            int8_rows_portable(j->P, b, first * LANES, r1, sums);
        for (int64_t p = first; p < last; p++) {
            sums_to_acc(sums + LANES * LANES * (p - first), b->n, acc);
            int8_finish(j, acc, b, p);
        }
        return;
    }
#if HAVE_X86
    if (use_vnni) {
        if (last - first == 2) {
            int8_pairs[b->n](j->P, b, first, acc);
            int8_finish(j, acc, b, first);
            int8_finish(j, acc + b->n * LANES, b, first + 1);
            return;
        }
        int8_kernels[b->n](j->P, b, first, acc);
        int8_finish(j, acc, b, first);
        return;
    }
#endif
    for (int64_t p = first; p < last; p++) {
        int8_panel_portable(j->P, b, p, acc);
        int8_finish(j, acc, b, p);
    }
}

static void int8_panel_chunk(const void *ctx, int64_t u) {
    const Int8Job *j = ctx;
    for (int64_t bi = 0; bi < j->n_blocks; bi++) int8_block(j, u, bi);
}

static void int8_token_chunk(const void *ctx, int64_t bi) {
    const Int8Job *j = ctx;
    for (int64_t u = 0; u * j->step < j->P->panels; u++) int8_block(j, u, bi);
}

typedef struct {
    const float *x;
    int64_t ldx, n_cols, groups;
    Int8Tokens *blocks;
    int64_t per_block, stride; /* stride: bytes from a token's group of four columns to the next */
} QuantizeJob;

static void quantize_chunk(const void *ctx, int64_t token) {
    const QuantizeJob *q = ctx;
    const Int8Tokens *b = &q->blocks[token / q->per_block];
    int64_t t = token - b->first;
    uint8_t *dst = (uint8_t *)(b->x + t);
    const float *x = q->x + token * q->ldx;
    int64_t stride = q->stride ? q->stride : 4 * b->n;
#if HAVE_X86
    if (use_vnni)
        quantize_avx512(x, q->n_cols, q->groups, stride, dst, &b->scale[t]);
    else
#endif
        quantize_portable(x, q->n_cols, q->groups, stride, dst, &b->scale[t]);
}

/* The block layout's activations: each group of four columns of 16 tokens (byte 4t + q) transposed in
 * place to column by column (byte 16q + t), so column c's 16 tokens are the 16 bytes at 16c. */
static void transpose_groups(uint8_t *x, int64_t groups) {
    for (int64_t g = 0; g < groups; g++) {
        uint8_t *v = x + 64 * g, tmp[64];
#if HAVE_X86
        if (use_vnni) {
            transpose_group_avx512(v);
            continue;
        }
#endif
        for (int t = 0; t < LANES; t++)
            for (int q = 0; q < 4; q++) tmp[LANES * q + t] = v[4 * t + q];
        memcpy(v, tmp, 64);
    }
}

static void int8_matmul_run(const Int8Panels *P, const float *x, int64_t ldx, int64_t n_cols, float *out, int64_t ldo,
                            const float *bias, int64_t tokens, int threads) {
    /* the block and row layouts: blocks of 16 tokens (the lanes), each with a group more, of zeros, for the
     * padding blocks' column n_cols; batches: blocks of at most 12 tokens, two panels at a time; else every token,
     * one panel at a time */
    int blocked = P->kind != INT8_DENSE;
    int64_t step = P->kind == INT8_ROWS ? INT8_ROW_PANELS : !blocked && tokens >= INT8_PAIR_MIN ? 2 : 1;
    int64_t n_blocks, per_block;
    if (blocked) {
        per_block = LANES;
        n_blocks = (tokens + LANES - 1) / LANES;
    } else
        per_block = even_blocks(tokens, step == 2 ? INT8_PAIR_TOKENS : TOKENS_MAX, &n_blocks);
    int64_t block_words = blocked ? LANES * (P->groups + 1) : 0; /* blocked: each block's own 16-token stride */
    Int8Tokens *blocks = malloc(sizeof(Int8Tokens) * n_blocks);
    uint32_t *xs = alloc_lines(sizeof(uint32_t) * (blocked ? block_words * n_blocks : P->groups * tokens));
    float *scales = malloc(sizeof(float) * tokens);
    if (blocked) memset(xs, 128, sizeof(uint32_t) * block_words * n_blocks); /* q = 0: padding tokens, column */
    for (int64_t bi = 0; bi < n_blocks; bi++) {
        Int8Tokens *b = &blocks[bi];
        b->first = bi * per_block;
        b->n = min64(tokens - b->first, per_block);
        b->x = xs + (blocked ? bi * block_words : b->first * P->groups);
        b->scale = scales + b->first;
    }
    QuantizeJob qj = {x, ldx, n_cols, P->groups, blocks, per_block, blocked ? 4 * LANES : 0};
    parallel_chunks(quantize_chunk, &qj, tokens, tokens * n_cols >= 65536 ? threads : 1);
    for (int64_t bi = 0; P->kind == INT8_BLOCKS && bi < n_blocks; bi++) transpose_groups((uint8_t *)blocks[bi].x, P->groups);
    Int8Job job = {P, blocks, bias, x, out, ldx, ldo, n_blocks, step};
    if (n_blocks >= 2 * threads)
        parallel_chunks(int8_token_chunk, &job, n_blocks, threads);
    else
        parallel_chunks(int8_panel_chunk, &job, (P->panels + step - 1) / step, threads);
    free(blocks);
    free_lines(xs);
    free(scales);
}

/* ------------------------------------------------------------------------------------------ */
/* tiled_matvec. Slice s (rows slice_rows[16 s .. 16 s + 15], sorted by length) covers every
 * tile of TILE_COLS columns in order; tile c of slice s takes n = steps[s * tiles + c] steps
 * of 16 entries, one per lane, an entry code << 5 | local column. Steps go in pairs, lane by
 * lane (entry 2i + h of a pair is lane i of its step h), so one load puts a lane's two
 * entries in one dword and shifts decode them (the permutes read index bits 0-4 only); an
 * odd last step is stored plain. Padding entries use local column 31, whose activation is a
 * zero. Slice s's entries start at ptr[s]. */

typedef struct {
    const int64_t *ptr;
    const uint8_t *steps;
    const uint16_t *entries;
    const int32_t *slice_rows;
    int64_t slices, tiles, n_cols, rows;
} Tiles;

static void tiled_portable(const Tiles *T, const float *table, const float *x, float *acc, int64_t s) {
    const uint16_t *e = T->entries + T->ptr[s];
    const uint8_t *steps = T->steps + s * T->tiles;
    for (int i = 0; i < LANES; i++) acc[i] = 0.0f;
    for (int64_t c = 0; c < T->tiles; c++) {
        int64_t base = c * TILE_COLS, n = steps[c], paired = n - n % 2;
        for (int64_t j = 0; j < n; j++)
            for (int i = 0; i < LANES; i++) {
                uint16_t entry = j < paired ? e[32 * (j / 2) + 2 * i + j % 2] : e[16 * j + i];
                int col = entry & 31;
                if (col < TILE_COLS) acc[i] += table[entry >> 5] * x[base + col];
            }
        e += LANES * n;
    }
}

#if HAVE_X86
AVX512 static void tiled_avx512(const Tiles *T, const float *table, const float *x, float *acc, int64_t s) {
    __m512 lo = _mm512_loadu_ps(table), hi = _mm512_loadu_ps(table + 16);
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    const uint16_t *e = T->entries + T->ptr[s];
    const uint8_t *steps = T->steps + s * T->tiles;
    for (int64_t c = 0; c < T->tiles; c++) {
        int n = steps[c];
        if (!n) continue;
        int64_t base = c * TILE_COLS, left = T->n_cols - base;
        __mmask16 m0 = left >= 16 ? 0xFFFF : (__mmask16)((1u << left) - 1);
        int64_t left1 = min64(left - 16, TILE_COLS - 16);
        __mmask16 m1 = left1 <= 0 ? 0 : (__mmask16)((1u << left1) - 1);
        __m512 x0 = _mm512_maskz_loadu_ps(m0, x + base), x1 = _mm512_maskz_loadu_ps(m1, x + base + 16);
        int j = 0;
        for (; j + 2 <= n; j += 2, e += 2 * LANES) {
            __m512i v = _mm512_loadu_si512((const void *)e);
            a0 = _mm512_fmadd_ps(_mm512_permutex2var_ps(lo, _mm512_srli_epi32(v, 5), hi),
                                 _mm512_permutex2var_ps(x0, v, x1), a0);
            a1 = _mm512_fmadd_ps(_mm512_permutex2var_ps(lo, _mm512_srli_epi32(v, 21), hi),
                                 _mm512_permutex2var_ps(x0, _mm512_srli_epi32(v, 16), x1), a1);
        }
        if (j < n) {
            __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)e));
            a0 = _mm512_fmadd_ps(_mm512_permutex2var_ps(lo, _mm512_srli_epi32(v, 5), hi),
                                 _mm512_permutex2var_ps(x0, v, x1), a0);
            e += LANES;
        }
    }
    _mm512_storeu_ps(acc, _mm512_add_ps(a0, a1));
}
#endif

typedef struct {
    const Tiles *T;
    const float *table, *x, *bias;
    float *out;
} TileJob;

static void slice_chunk(const void *ctx, int64_t s) {
    const TileJob *j = ctx;
    float acc[LANES] __attribute__((aligned(64)));
#if HAVE_X86
    if (use_avx512)
        tiled_avx512(j->T, j->table, j->x, acc, s);
    else
#endif
        tiled_portable(j->T, j->table, j->x, acc, s);
    for (int i = 0; i < LANES; i++) {
        int64_t r = j->T->slice_rows[s * LANES + i];
        if (r < j->T->rows) j->out[r] = acc[i] + j->bias[r];
    }
}

static void tiled_matvec_run(const Tiles *T, const float *table, const float *x, float *out, const float *bias,
                             int threads) {
    TileJob job = {T, table, x, bias, out};
    parallel_chunks(slice_chunk, &job, T->slices, threads); /* slices sorted longest first: the long ones go first */
}

/* ------------------------------------------------------------------------------------------ */
/* rows_matmul: rows sorted by length in groups of ROW_GROUP, the columns cut into chunks of
 * CHUNK_COLS. Segment (c, g), entries seg_ptr[c * groups + g] .. seg_ptr[c * groups + g + 1],
 * holds group g's weights in chunk c in steps of ROW_GROUP entries (entry j of lane l at
 * 4 j + l), each a uint16 code << 8 | column - CHUNK_COLS c; a lane with fewer weights in
 * the chunk is padded with column CHUNK_COLS, which reads a zero. Codes index a table of up
 * to 256 values. A pass takes up to 32 tokens: their activations transposed chunk by chunk
 * (CHUNK_COLS + 1 rows of 32 floats, 16 KB, in L1 while every group's segment in it runs),
 * each weight one broadcast FMA over a vector of tokens, four rows' chains side by side;
 * the rows' sums wait in acc between chunks. */

#define CHUNK_COLS 128
#define ROW_GROUP 4

typedef struct {
    const int64_t *seg_ptr;
    const uint16_t *entries;
    const int32_t *group_rows;
    int64_t groups, chunks, rows, n_cols;
} RowChunks;

static void rows_segment_portable(const uint16_t *e, int64_t steps, const float *table, const float *xt, int64_t tt,
                                  float *acc /* ROW_GROUP x tt */) {
    for (int64_t j = 0; j < steps; j++)
        for (int l = 0; l < ROW_GROUP; l++) {
            uint16_t v = e[ROW_GROUP * j + l];
            float w = table[v >> 8];
            const float *xk = xt + (v & 0xFF) * tt;
            for (int64_t t = 0; t < tt; t++) acc[l * tt + t] += w * xk[t];
        }
}

#if HAVE_X86
/* Groups g0 .. g1 - 1 of column chunk c, TT tokens (16 or 32) a pass: each group's TT / 16 x 4 sums in
 * registers while its segment runs. One call per chunk and thread, not per segment: at 10% density a
 * segment is a dozen steps, and a call for each cost 5-10% of a batch-16 product. */
#define DEFINE_ROWS_RANGE(TT)                                                                                    \
    AVX512 static void rows_range_##TT(const RowChunks *R, int64_t c, int64_t g0, int64_t g1, const float *table, \
                                       const float *xt, float *acc) {                                         \
        const int64_t *ptr = R->seg_ptr + c * R->groups;                                                      \
        for (int64_t g = g0; g < g1; g++) {                                                                   \
            const uint16_t *e = R->entries + ptr[g], *end = R->entries + ptr[g + 1];                          \
            if (e == end) continue;                                                                           \
            float *a_g = acc + g * ROW_GROUP * TT;                                                            \
            __m512 a[ROW_GROUP][TT / 16];                                                                     \
            UNROLL for (int l = 0; l < ROW_GROUP; l++)                                                        \
                UNROLL for (int h = 0; h < TT / 16; h++) a[l][h] = _mm512_loadu_ps(a_g + TT * l + 16 * h);    \
            for (; e + ROW_GROUP <= end; e += ROW_GROUP) /* a whole step (a malformed last one is skipped) */  \
                UNROLL for (int l = 0; l < ROW_GROUP; l++) {                                                  \
                    __m512 w = _mm512_set1_ps(table[e[l] >> 8]);                                              \
                    const float *xk = xt + (e[l] & 0xFF) * TT;                                                \
                    UNROLL for (int h = 0; h < TT / 16; h++)                                                  \
                        a[l][h] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xk + 16 * h), a[l][h]);                  \
                }                                                                                             \
            UNROLL for (int l = 0; l < ROW_GROUP; l++)                                                        \
                UNROLL for (int h = 0; h < TT / 16; h++) _mm512_storeu_ps(a_g + TT * l + 16 * h, a[l][h]);    \
        }                                                                                                     \
    }

DEFINE_ROWS_RANGE(16)
DEFINE_ROWS_RANGE(32)
#endif

typedef struct {
    const RowChunks *R;
    const float *table, *xt, *bias;
    const int32_t *slot; /* slot[r]: the lane (g * ROW_GROUP + l) that holds row r */
    float *acc, *out;
    int64_t tt, span, first, nt, ldo, per_chunk;
} RowJob;

/* Chunk i: groups i * per_chunk .. (i + 1) * per_chunk - 1 (their accumulators), over every column chunk. */
static void group_range_chunk(const void *ctx, int64_t i) {
    const RowJob *j = ctx;
    const RowChunks *R = j->R;
    int64_t g0 = i * j->per_chunk, g1 = min64(g0 + j->per_chunk, R->groups);
    for (int64_t c = 0; c < R->chunks; c++) {
#if HAVE_X86
        if (use_avx512) {
            if (j->tt == 16)
                rows_range_16(R, c, g0, g1, j->table, j->xt + c * j->span, j->acc);
            else
                rows_range_32(R, c, g0, g1, j->table, j->xt + c * j->span, j->acc);
            continue;
        }
#endif
        for (int64_t g = g0; g < g1; g++) {
            int64_t s = R->seg_ptr[c * R->groups + g], n = R->seg_ptr[c * R->groups + g + 1] - s;
            rows_segment_portable(R->entries + s, n / ROW_GROUP, j->table, j->xt + c * j->span, j->tt,
                                  j->acc + g * ROW_GROUP * j->tt);
        }
    }
}

#define STORE_ROWS 256 /* rows a store chunk writes */

/* Chunk i: rows STORE_ROWS i .. in order, every token of the pass, 16 rows (a cache line of a token's
 * output) at a time. The groups hold the rows sorted by length, so storing group by group would write
 * each token's output at random rows; and one row's tokens are a row of `out` apart (a multiple of 4 KB
 * for many layers), lines that compete for the same L1 set. */
static void rows_store_chunk(const void *ctx, int64_t i) {
    const RowJob *j = ctx;
    int64_t r1 = min64((i + 1) * STORE_ROWS, j->R->rows);
    for (int64_t r0 = i * STORE_ROWS; r0 < r1; r0 += LANES) {
        int64_t n = min64(LANES, r1 - r0);
        const float *acc[LANES];
        for (int64_t r = 0; r < n; r++) acc[r] = j->acc + j->slot[r0 + r] * j->tt;
        for (int64_t t = 0; t < j->nt; t++) {
            float *o = j->out + (j->first + t) * j->ldo + r0;
            for (int64_t r = 0; r < n; r++) o[r] = acc[r][t] + j->bias[r0 + r];
        }
    }
}

static void rows_matmul_run(const RowChunks *R, const float *table, const float *x, int64_t ldx, float *out,
                            int64_t ldo, const float *bias, int64_t tokens, int threads) {
    int64_t tt = tokens > 16 ? 32 : 16, span = (CHUNK_COLS + 1) * tt;
    float *xt = alloc_lines(sizeof(float) * R->chunks * span);
    float *acc = malloc(sizeof(float) * R->groups * ROW_GROUP * tt);
    int32_t *slot = calloc(R->rows, sizeof(int32_t)); /* zeros: a group_rows that is no permutation reads in bounds */
    for (int64_t s = 0; s < R->groups * ROW_GROUP; s++)
        if (R->group_rows[s] >= 0 && R->group_rows[s] < R->rows) slot[R->group_rows[s]] = (int32_t)s;
    int64_t n_chunks = min64(R->groups, 8 * (int64_t)threads); /* a few per thread, so a late helper evens out */
    RowJob job = {R, table, xt, bias, slot, acc, out, tt, span, 0, 0, ldo, (R->groups + n_chunks - 1) / n_chunks};
    for (int64_t first = 0; first < tokens; first += tt) {
        int64_t nt = min64(tokens - first, tt);
        for (int64_t c = 0; c < R->chunks; c++)
            for (int64_t k = 0; k <= CHUNK_COLS; k++)
                for (int64_t t = 0; t < tt; t++) {
                    int64_t col = c * CHUNK_COLS + k;
                    xt[c * span + k * tt + t] =
                        k < CHUNK_COLS && col < R->n_cols && t < nt ? x[(first + t) * ldx + col] : 0.0f;
                }
        memset(acc, 0, sizeof(float) * R->groups * ROW_GROUP * tt);
        job.first = first;
        job.nt = nt;
        parallel_chunks(group_range_chunk, &job, (R->groups + job.per_chunk - 1) / job.per_chunk, threads);
        parallel_chunks(rows_store_chunk, &job, (R->rows + STORE_ROWS - 1) / STORE_ROWS, threads);
    }
    free_lines(xt);
    free(acc);
    free(slot);
}

/* ------------------------------------------------------------------------------------------ */
/* EIE's batch-1 kernel and the direct sparse convolution, as the numba kernels compute them
 * (deepshrink/engine/kernels.py documents the layouts: segments of 8-bit gaps, each weight's
 * codebook index beside its gap, padding entries pointing at a zero at the codebook's end),
 * here so that a model of Linear and Conv layers compiles nothing at its first call. */

typedef struct {
    const int64_t *col_ptr; /* (workers, cols + 1) */
    const uint8_t *gaps;
    const void *codes; /* uint8, or uint16 when wide */
    int wide;
    const float *codebook; /* extended: centroids, then the padding's zero */
    int64_t n_codes, n_cols, rows, workers;
    const float *x, *bias;
    const int64_t *active;
    int64_t n_active;
    float *out;
} CscJob;

#define PREFETCH_COLUMNS 4 /* a segment start this many active columns ahead is prefetched (see kernels.py) */

/* Worker w's rows (w, w + workers, ...): for each active column, the codebook times x[j] once,
 * then each entry a lookup and an add into the worker's own accumulators. */
static void csc_chunk(const void *ctx, int64_t w) {
    const CscJob *j = ctx;
    int64_t local = (j->rows - w + j->workers - 1) / j->workers;
    float *acc = calloc(local + 256, sizeof(float)), *products = malloc(sizeof(float) * j->n_codes);
    const int64_t *ptr = j->col_ptr + w * (j->n_cols + 1);
    for (int64_t t = 0; t < j->n_active; t++) {
        int64_t col = j->active[t];
        if (t + PREFETCH_COLUMNS < j->n_active) {
            int64_t ahead = ptr[j->active[t + PREFETCH_COLUMNS]];
            __builtin_prefetch(j->gaps + ahead);
            __builtin_prefetch((const uint8_t *)j->codes + (j->wide ? 2 : 1) * ahead);
        }
        float xj = j->x[col];
        for (int64_t c = 0; c < j->n_codes; c++) products[c] = j->codebook[c] * xj;
        int64_t row = 0;
        if (j->wide) {
            const uint16_t *codes = j->codes;
            for (int64_t k = ptr[col]; k < ptr[col + 1]; k++) {
                row += j->gaps[k];
                acc[row++] += products[codes[k]];
            }
        } else {
            const uint8_t *codes = j->codes;
            for (int64_t k = ptr[col]; k < ptr[col + 1]; k++) {
                row += j->gaps[k];
                acc[row++] += products[codes[k]];
            }
        }
    }
    for (int64_t i = 0; i < local; i++) j->out[w + i * j->workers] = acc[i] + j->bias[w + i * j->workers];
    free(acc);
    free(products);
}

static void csc_matvec_run(CscJob *job, int threads) {
    int64_t *active = malloc(sizeof(int64_t) * (job->n_cols + 1));
    int64_t n = 0;
    for (int64_t k = 0; k < job->n_cols; k++) {
        active[n] = k;
        n += job->x[k] != 0.0f; /* branch-free: at 20-40 % activations a branch mispredicts half the time */
    }
    job->active = active;
    job->n_active = n;
    parallel_chunks(csc_chunk, job, job->workers, threads);
    free(active);
}

/* out[i] += a * x[i], i < n */
static void axpy_portable(float *out, const float *x, float a, int64_t n) {
    for (int64_t i = 0; i < n; i++) out[i] += a * x[i];
}

#if HAVE_X86
AVX512 static void axpy_avx512(float *out, const float *x, float a, int64_t n) {
    __m512 av = _mm512_set1_ps(a);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(out + i, _mm512_fmadd_ps(av, _mm512_loadu_ps(x + i), _mm512_loadu_ps(out + i)));
    if (i < n) {
        __mmask16 m = (__mmask16)((1u << (n - i)) - 1);
        _mm512_mask_storeu_ps(out + i, m, _mm512_fmadd_ps(av, _mm512_maskz_loadu_ps(m, x + i),
                                                         _mm512_maskz_loadu_ps(m, out + i)));
    }
}
#endif

typedef struct {
    const int64_t *row_ptr;
    const uint8_t *gaps;
    const void *codes;
    int wide;
    const float *codebook;
    const float *x; /* (batch, in, H, W), zero-padded */
    float *acc;     /* (batch, out, out_h, width) zeroed; width = W at stride 1 (the flat path), else out_w */
    float *out;     /* (batch, out, out_h, out_w) */
    const float *bias;
    int64_t batch, in, h, w, out_ch, out_h, out_w, width, kh, kw, sh, sw, dh, dw, groups;
} ConvJob;

/* Output channel o: each weight of filter o over every image and position (kernels._conv_channel). */
static void conv_chunk(const void *ctx, int64_t o) {
    const ConvJob *j = ctx;
    int64_t group_size = j->in / j->groups, first_channel = o / (j->out_ch / j->groups) * group_size;
    int64_t area = j->kh * j->kw, plane = j->h * j->w, out_plane = j->out_h * j->width;
    int flat = j->sh == 1 && j->sw == 1 && j->width == j->w;
    int64_t span = j->out_h * j->w - (j->kw - 1) * j->dw; /* flat positions up to the last valid output */
    int64_t col = 0;
    for (int64_t k = j->row_ptr[o]; k < j->row_ptr[o + 1]; k++) {
        col += j->gaps[k];
        float value = j->codebook[j->wide ? ((const uint16_t *)j->codes)[k] : ((const uint8_t *)j->codes)[k]];
        if (value != 0.0f) { /* padding entries (and zero centroids) would cost a whole plane each */
            int64_t c = first_channel + col / area, tap = col % area, ky = tap / j->kw, kx = tap % j->kw;
            for (int64_t b = 0; b < j->batch; b++) {
                float *acc = j->acc + (b * j->out_ch + o) * out_plane;
                const float *x = j->x + (b * j->in + c) * plane;
                if (flat) {
                    const float *shifted = x + ky * j->dh * j->w + kx * j->dw;
#if HAVE_X86
                    if (use_avx512)
                        axpy_avx512(acc, shifted, value, span);
                    else
#endif
                        axpy_portable(acc, shifted, value, span);
                } else {
                    for (int64_t oy = 0; oy < j->out_h; oy++) {
                        const float *row = x + (oy * j->sh + ky * j->dh) * j->w + kx * j->dw;
                        for (int64_t ox = 0; ox < j->out_w; ox++) acc[oy * j->width + ox] += value * row[ox * j->sw];
                    }
                }
            }
        }
        col++;
    }
    for (int64_t b = 0; b < j->batch; b++)
        for (int64_t oy = 0; oy < j->out_h; oy++)
            for (int64_t ox = 0; ox < j->out_w; ox++)
                j->out[((b * j->out_ch + o) * j->out_h + oy) * j->out_w + ox] =
                    j->acc[(b * j->out_ch + o) * out_plane + oy * j->width + ox] + j->bias[o];
}

/* ------------------------------------------------------------------------------------------ */
/* Channels-last convolutions: an image (batch, h, w, c), one parallel chunk per output row of one
 * image. The patches of a product (im2col) and the depthwise convolution, as kernels.nhwc_patches and
 * kernels.depthwise_nhwc do them (tested against those): here, nothing compiles at a model's first
 * call (numba took a second for the gather). Taps falling in the padding (top, left) read zeros. */

typedef struct {
    const float *x, *taps, *bias;
    float *out;
    int64_t batch, h, w, c, kh, kw, sh, sw, dh, dw, top, left, out_h, out_w;
} NhwcJob;

static void patches_row(const void *ctx, int64_t row) {
    const NhwcJob *j = ctx;
    int64_t b = row / j->out_h, oy = row % j->out_h;
    float *dst = j->out + row * j->out_w * j->kh * j->kw * j->c;
    for (int64_t ox = 0; ox < j->out_w; ox++)
        for (int64_t i = 0; i < j->kh; i++) {
            int64_t y = oy * j->sh + i * j->dh - j->top;
            for (int64_t k = 0; k < j->kw; k++, dst += j->c) {
                int64_t col = ox * j->sw + k * j->dw - j->left;
                if (y >= 0 && y < j->h && col >= 0 && col < j->w)
                    memcpy(dst, j->x + ((b * j->h + y) * j->w + col) * j->c, sizeof(float) * j->c);
                else
                    memset(dst, 0, sizeof(float) * j->c);
            }
        }
}

static void depthwise_row(const void *ctx, int64_t row) {
    const NhwcJob *j = ctx;
    int64_t b = row / j->out_h, oy = row % j->out_h, c = j->c;
    for (int64_t ox = 0; ox < j->out_w; ox++) {
        float *acc = j->out + (row * j->out_w + ox) * c;
        memcpy(acc, j->bias, sizeof(float) * c);
        for (int64_t i = 0; i < j->kh; i++) {
            int64_t y = oy * j->sh + i * j->dh - j->top;
            if (y < 0 || y >= j->h) continue;
            for (int64_t k = 0; k < j->kw; k++) {
                int64_t col = ox * j->sw + k * j->dw - j->left;
                if (col < 0 || col >= j->w) continue;
                const float *tap = j->taps + (i * j->kw + k) * c, *src = j->x + ((b * j->h + y) * j->w + col) * c;
                for (int64_t ch = 0; ch < c; ch++) acc[ch] += tap[ch] * src[ch];
            }
        }
    }
}

/* ------------------------------------------------------------------------------------------ */
/* count_nonzero: each row's non-zero activations, for the cost model. NumPy's count of a float
 * array takes ~0.6 ns an element (40 us for 16 x 4,096, more than some products it decides);
 * one compare to a mask and one popcount per 16 do it in ~0.05. NaN counts, as x != 0 says. */

static int64_t count_row_portable(const float *x, int64_t n) {
    int64_t count = 0;
    for (int64_t k = 0; k < n; k++) count += x[k] != 0.0f;
    return count;
}

#if HAVE_X86
AVX512 static int64_t count_row_avx512(const float *x, int64_t n) {
    int64_t count = 0, k = 0;
    const __m512 zero = _mm512_setzero_ps();
    for (; k + 16 <= n; k += 16) count += __builtin_popcount(_mm512_cmp_ps_mask(_mm512_loadu_ps(x + k), zero, _CMP_NEQ_UQ));
    __mmask16 m = (__mmask16)((1u << (n - k)) - 1);
    return count + __builtin_popcount(_mm512_mask_cmp_ps_mask(m, _mm512_maskz_loadu_ps(m, x + k), zero, _CMP_NEQ_UQ));
}
#endif

static int64_t count_row(const float *x, int64_t n) {
#if HAVE_X86
    if (use_avx512) return count_row_avx512(x, n);
#endif
    return count_row_portable(x, n);
}

/* ------------------------------------------------------------------------------------------ */
/* Python bindings: contiguous buffers in (NumPy arrays), sizes checked against what the
 * kernel will read, nothing allocated on the Python side. */

typedef struct {
    Py_buffer views[12];
    int n;
} Buffers;

static const void *get_buffer(Buffers *b, PyObject *obj, int writable, Py_ssize_t min_bytes, const char *name) {
    Py_buffer *v = &b->views[b->n];
    if (PyObject_GetBuffer(obj, v, PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0)) < 0) return NULL;
    b->n++;
    if (v->len < min_bytes) {
        PyErr_Format(PyExc_ValueError, "%s holds %zd bytes, the kernel reads %zd", name, v->len, min_bytes);
        return NULL;
    }
    return v->buf ? v->buf : (const void *)"";
}

static void release(Buffers *b) {
    for (int i = 0; i < b->n; i++) PyBuffer_Release(&b->views[i]);
}

static Py_ssize_t matrix_bytes(Py_ssize_t n, Py_ssize_t ld, Py_ssize_t width) { return n ? ((n - 1) * ld + width) * 4 : 0; }

static PyObject *py_panels_matmul(PyObject *self, PyObject *args) {
    PyObject *codes, *blk_ptr, *cols, *table, *x, *out, *bias;
    Py_ssize_t rows, n_cols, tokens, ldx, ldo;
    int threads;
    if (!PyArg_ParseTuple(args, "OOOOOOOnnnnni", &codes, &blk_ptr, &cols, &table, &x, &out, &bias, &rows, &n_cols,
                          &tokens, &ldx, &ldo, &threads))
        return NULL;
    Buffers b = {.n = 0};
    Panels P = {.n_cols = n_cols, .rows = rows, .panels = (rows + LANES - 1) / LANES};
    const float *t, *xp, *bp;
    float *op;
    int ok = 1;
    if (blk_ptr == Py_None) {
        Py_ssize_t padded = (P.panels + SUPER - 1) / SUPER * SUPER;
        ok = (P.codes = get_buffer(&b, codes, 0, padded * n_cols * 16, "codes")) != NULL;
    } else {
        ok = (P.blk_ptr = get_buffer(&b, blk_ptr, 0, (P.panels + 1) * 8, "blk_ptr")) != NULL;
        Py_ssize_t blocks = ok ? P.blk_ptr[P.panels] : 0;
        ok = ok && (P.cols = get_buffer(&b, cols, 0, blocks * 4, "cols")) != NULL &&
             (P.codes = get_buffer(&b, codes, 0, blocks * 16, "codes")) != NULL;
    }
    ok = ok && (t = get_buffer(&b, table, 0, TABLE * 4, "table")) != NULL &&
         (xp = get_buffer(&b, x, 0, matrix_bytes(tokens, ldx, n_cols), "x")) != NULL &&
         (op = (float *)get_buffer(&b, out, 1, matrix_bytes(tokens, ldo, rows), "out")) != NULL &&
         (bp = get_buffer(&b, bias, 0, rows * 4, "bias")) != NULL;
    if (ok && tokens > 0 && rows > 0) {
        Py_BEGIN_ALLOW_THREADS panels_matmul_run(&P, t, xp, ldx, op, ldo, bp, tokens, threads);
        Py_END_ALLOW_THREADS
    }
    release(&b);
    if (!ok) return NULL;
    Py_RETURN_NONE;
}

static PyObject *py_int8_matmul(PyObject *self, PyObject *args) {
    PyObject *codes, *table, *rowsum, *optr, *ocols, *ovals, *x, *out, *bias, *sparse = Py_None, *sptr, *scols;
    Py_ssize_t rows, n_cols, tokens, ldx, ldo;
    float wscale;
    int packed, threads;
    if (!PyArg_ParseTuple(args, "OpOO(OOO)fOOOnnnnni|O", &codes, &packed, &table, &rowsum, &optr, &ocols, &ovals,
                          &wscale, &x, &out, &bias, &rows, &n_cols, &tokens, &ldx, &ldo, &threads, &sparse))
        return NULL;
    int by_rows = 0;
    if (sparse != Py_None && (!PyArg_ParseTuple(sparse, "OOp", &sptr, &scols, &by_rows) || packed || table != Py_None)) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "the sparse layouts hold int8 weights: no table, not packed");
        return NULL;
    }
    if (n_cols >= 65536) {
        PyErr_Format(PyExc_ValueError, "int8 products take fewer than 65,536 columns (int32 sums), got %zd", n_cols);
        return NULL;
    }
    Buffers b = {.n = 0};
    Int8Panels P = {.wscale = wscale, .groups = (n_cols + 3) / 4, .rows = rows, .panels = (rows + LANES - 1) / LANES};
    const float *xp, *bp;
    float *op;
    P.vec = packed ? 32 : 64;
    if (packed && table == Py_None) {
        PyErr_SetString(PyExc_ValueError, "4-bit codes need a table");
        return NULL;
    }
    int ok = 1;
    if (sparse != Py_None) {
        P.kind = by_rows ? INT8_ROWS : INT8_BLOCKS;
        P.chunks = (P.groups + INT8_ROW_CHUNK - 1) / INT8_ROW_CHUNK;
        Py_ssize_t n_ptr = by_rows ? P.chunks * rows : P.panels, top = by_rows ? P.groups - 1 : n_cols;
        ok = (P.ptr = get_buffer(&b, sptr, 0, (n_ptr + 1) * 8, "ptr")) != NULL;
        int bad = ok && (P.ptr[0] != 0 || P.ptr[n_ptr] % 4); /* branch-free over the offsets, as the columns below */
        for (Py_ssize_t i = 1; ok && i <= n_ptr; i++) bad |= (P.ptr[i - 1] > P.ptr[i]) | (P.ptr[i] % 4 != 0);
        if (bad) {
            PyErr_SetString(PyExc_ValueError, "ptr is not a non-decreasing list of offsets, multiples of 4, from 0");
            ok = 0;
        }
        Py_ssize_t n = ok ? P.ptr[n_ptr] : 0;
        ok = ok && (P.cols = get_buffer(&b, scols, 0, n * 2, "cols")) != NULL;
        uint16_t largest = 0; /* a branch-free maximum: the compiler vectorises it (a branch per entry cost 0.5 ns) */
        for (Py_ssize_t k = 0; k < n; k++) largest = P.cols[k] > largest ? P.cols[k] : largest;
        if (ok && n && largest > top) {
            PyErr_Format(PyExc_ValueError, "%s %d is outside the matrix", by_rows ? "group" : "column", largest);
            ok = 0;
        }
        ok = ok && (P.codes = get_buffer(&b, codes, 0, by_rows ? 4 * n : LANES * n, "codes")) != NULL;
    } else
        ok = (P.codes = get_buffer(&b, codes, 0, P.panels * P.groups * P.vec, "codes")) != NULL;
    ok = ok && (table == Py_None || (P.table = get_buffer(&b, table, 0, INT8_TABLE, "table")) != NULL) &&
             (P.rowsum = get_buffer(&b, rowsum, 0, P.panels * LANES * 4, "rowsum")) != NULL &&
             (P.outlier_ptr = get_buffer(&b, optr, 0, (rows + 1) * 8, "outlier_ptr")) != NULL;
    Py_ssize_t n_out = ok ? P.outlier_ptr[rows] : 0;
    for (Py_ssize_t r = 0; ok && r < rows; r++)
        if (P.outlier_ptr[r] < 0 || P.outlier_ptr[r] > P.outlier_ptr[r + 1] || P.outlier_ptr[r + 1] > n_out) {
            PyErr_SetString(PyExc_ValueError, "outlier_ptr is not a non-decreasing list of offsets");
            ok = 0;
        }
    ok = ok && (P.outlier_cols = get_buffer(&b, ocols, 0, n_out * 4, "outlier_cols")) != NULL &&
             (P.outlier_values = get_buffer(&b, ovals, 0, n_out * 4, "outlier_values")) != NULL;
    for (Py_ssize_t e = 0; ok && e < n_out; e++)
        if (P.outlier_cols[e] < 0 || P.outlier_cols[e] >= n_cols) {
            PyErr_Format(PyExc_ValueError, "outlier column %d is outside the %zd columns", P.outlier_cols[e], n_cols);
            ok = 0;
        }
    ok = ok && (xp = get_buffer(&b, x, 0, matrix_bytes(tokens, ldx, n_cols), "x")) != NULL &&
             (op = (float *)get_buffer(&b, out, 1, matrix_bytes(tokens, ldo, rows), "out")) != NULL &&
             (bp = get_buffer(&b, bias, 0, rows * 4, "bias")) != NULL;
    if (ok && tokens > 0 && rows > 0) {
        Py_BEGIN_ALLOW_THREADS int8_matmul_run(&P, xp, ldx, n_cols, op, ldo, bp, tokens, threads);
        Py_END_ALLOW_THREADS
    }
    release(&b);
    if (!ok) return NULL;
    Py_RETURN_NONE;
}

static PyObject *py_tiled_matvec(PyObject *self, PyObject *args) {
    PyObject *ptr, *steps, *entries, *slice_rows, *table, *x, *out, *bias;
    Py_ssize_t rows, n_cols;
    int threads;
    if (!PyArg_ParseTuple(args, "OOOOOOOOnni", &ptr, &steps, &entries, &slice_rows, &table, &x, &out, &bias, &rows,
                          &n_cols, &threads))
        return NULL;
    Buffers b = {.n = 0};
    Tiles T = {.n_cols = n_cols, .rows = rows, .slices = (rows + LANES - 1) / LANES,
               .tiles = (n_cols + TILE_COLS - 1) / TILE_COLS};
    const float *t, *xp, *bp;
    float *op;
    int ok = (T.ptr = get_buffer(&b, ptr, 0, (T.slices + 1) * 8, "ptr")) != NULL;
    ok = ok && (T.steps = get_buffer(&b, steps, 0, T.slices * T.tiles, "steps")) != NULL &&
         (T.entries = get_buffer(&b, entries, 0, T.ptr[T.slices] * 2, "entries")) != NULL &&
         (T.slice_rows = get_buffer(&b, slice_rows, 0, T.slices * LANES * 4, "slice_rows")) != NULL &&
         (t = get_buffer(&b, table, 0, TABLE * 4, "table")) != NULL &&
         (xp = get_buffer(&b, x, 0, n_cols * 4, "x")) != NULL &&
         (op = (float *)get_buffer(&b, out, 1, rows * 4, "out")) != NULL &&
         (bp = get_buffer(&b, bias, 0, rows * 4, "bias")) != NULL;
    if (ok && rows > 0) {
        Py_BEGIN_ALLOW_THREADS tiled_matvec_run(&T, t, xp, op, bp, threads);
        Py_END_ALLOW_THREADS
    }
    release(&b);
    if (!ok) return NULL;
    Py_RETURN_NONE;
}

static PyObject *py_rows_matmul(PyObject *self, PyObject *args) {
    PyObject *seg_ptr, *entries, *group_rows, *table, *x, *out, *bias;
    Py_ssize_t rows, n_cols, tokens, ldx, ldo;
    int threads;
    if (!PyArg_ParseTuple(args, "OOOOOOOnnnnni", &seg_ptr, &entries, &group_rows, &table, &x, &out, &bias, &rows,
                          &n_cols, &tokens, &ldx, &ldo, &threads))
        return NULL;
    Buffers b = {.n = 0};
    RowChunks R = {.rows = rows, .n_cols = n_cols, .groups = (rows + ROW_GROUP - 1) / ROW_GROUP,
                   .chunks = (n_cols + CHUNK_COLS - 1) / CHUNK_COLS};
    Py_ssize_t segments = R.chunks * R.groups;
    const float *t, *xp, *bp;
    float *op;
    int ok = (R.seg_ptr = get_buffer(&b, seg_ptr, 0, (segments + 1) * 8, "seg_ptr")) != NULL;
    ok = ok && (R.entries = get_buffer(&b, entries, 0, R.seg_ptr[segments] * 2, "entries")) != NULL &&
         (R.group_rows = get_buffer(&b, group_rows, 0, R.groups * ROW_GROUP * 4, "group_rows")) != NULL &&
         (t = get_buffer(&b, table, 0, 256 * 4, "table")) != NULL &&
         (xp = get_buffer(&b, x, 0, matrix_bytes(tokens, ldx, n_cols), "x")) != NULL &&
         (op = (float *)get_buffer(&b, out, 1, matrix_bytes(tokens, ldo, rows), "out")) != NULL &&
         (bp = get_buffer(&b, bias, 0, rows * 4, "bias")) != NULL;
    if (ok && tokens > 0 && rows > 0) {
        Py_BEGIN_ALLOW_THREADS rows_matmul_run(&R, t, xp, ldx, op, ldo, bp, tokens, threads);
        Py_END_ALLOW_THREADS
    }
    release(&b);
    if (!ok) return NULL;
    Py_RETURN_NONE;
}

static PyObject *py_csc_matvec(PyObject *self, PyObject *args) {
    PyObject *col_ptr, *gaps, *codes, *codebook, *x, *out, *bias;
    Py_ssize_t rows, n_cols, workers;
    int wide, threads;
    if (!PyArg_ParseTuple(args, "OOOOOOOnnnpi", &col_ptr, &gaps, &codes, &codebook, &x, &out, &bias, &rows, &n_cols,
                          &workers, &wide, &threads))
        return NULL;
    Buffers b = {.n = 0};
    CscJob job = {.wide = wide, .n_cols = n_cols, .rows = rows, .workers = workers};
    int ok = workers > 0 && (job.col_ptr = get_buffer(&b, col_ptr, 0, workers * (n_cols + 1) * 8, "col_ptr")) != NULL;
    if (workers <= 0) PyErr_SetString(PyExc_ValueError, "workers must be positive");
    Py_ssize_t entries = 0;
    for (Py_ssize_t w = 0; ok && w < workers; w++)
        if (job.col_ptr[w * (n_cols + 1) + n_cols] > entries) entries = job.col_ptr[w * (n_cols + 1) + n_cols];
    ok = ok && (job.gaps = get_buffer(&b, gaps, 0, entries, "gaps")) != NULL &&
         (job.codes = get_buffer(&b, codes, 0, entries * (wide ? 2 : 1), "codes")) != NULL &&
         (job.codebook = get_buffer(&b, codebook, 0, 4, "codebook")) != NULL &&
         (job.x = get_buffer(&b, x, 0, n_cols * 4, "x")) != NULL &&
         (job.out = (float *)get_buffer(&b, out, 1, rows * 4, "out")) != NULL &&
         (job.bias = get_buffer(&b, bias, 0, rows * 4, "bias")) != NULL;
    if (ok) {
        job.n_codes = b.views[3].len / 4;
        Py_BEGIN_ALLOW_THREADS csc_matvec_run(&job, threads);
        Py_END_ALLOW_THREADS
    }
    release(&b);
    if (!ok) return NULL;
    Py_RETURN_NONE;
}

static PyObject *py_conv2d(PyObject *self, PyObject *args) {
    PyObject *row_ptr, *gaps, *codes, *codebook, *x, *acc, *out, *bias;
    ConvJob j;
    int wide, threads;
    if (!PyArg_ParseTuple(args, "OOOOOOOO(nnnnnnnnnn)(nnnnn)pi", &row_ptr, &gaps, &codes, &codebook, &x, &acc, &out,
                          &bias, &j.batch, &j.in, &j.h, &j.w, &j.out_ch, &j.out_h, &j.out_w, &j.width, &j.kh, &j.kw,
                          &j.sh, &j.sw, &j.dh, &j.dw, &j.groups, &wide, &threads))
        return NULL;
    Buffers b = {.n = 0};
    j.wide = wide;
    int ok = (j.row_ptr = get_buffer(&b, row_ptr, 0, (j.out_ch + 1) * 8, "row_ptr")) != NULL;
    Py_ssize_t entries = ok ? j.row_ptr[j.out_ch] : 0;
    ok = ok && (j.gaps = get_buffer(&b, gaps, 0, entries, "gaps")) != NULL &&
         (j.codes = get_buffer(&b, codes, 0, entries * (wide ? 2 : 1), "codes")) != NULL &&
         (j.codebook = get_buffer(&b, codebook, 0, 4, "codebook")) != NULL &&
         (j.x = get_buffer(&b, x, 0, j.batch * j.in * j.h * j.w * 4, "x")) != NULL &&
         (j.acc = (float *)get_buffer(&b, acc, 1, j.batch * j.out_ch * j.out_h * j.width * 4, "acc")) != NULL &&
         (j.out = (float *)get_buffer(&b, out, 1, j.batch * j.out_ch * j.out_h * j.out_w * 4, "out")) != NULL &&
         (j.bias = get_buffer(&b, bias, 0, j.out_ch * 4, "bias")) != NULL;
    if (ok && j.out_ch > 0) {
        Py_BEGIN_ALLOW_THREADS parallel_chunks(conv_chunk, &j, j.out_ch, threads);
        Py_END_ALLOW_THREADS
    }
    release(&b);
    if (!ok) return NULL;
    Py_RETURN_NONE;
}

static PyObject *py_count_nonzero(PyObject *self, PyObject *args) {
    PyObject *x, *counts;
    Py_ssize_t n, n_cols;
    if (!PyArg_ParseTuple(args, "OOnn", &x, &counts, &n, &n_cols)) return NULL;
    Buffers b = {.n = 0};
    const float *xp;
    int64_t *cp, total = 0;
    int ok = (xp = get_buffer(&b, x, 0, n * n_cols * 4, "x")) != NULL &&
             (cp = (int64_t *)get_buffer(&b, counts, 1, n * 8, "counts")) != NULL;
    if (ok) {
        Py_BEGIN_ALLOW_THREADS for (Py_ssize_t i = 0; i < n; i++) total += cp[i] = count_row(xp + i * n_cols, n_cols);
        Py_END_ALLOW_THREADS
    }
    release(&b);
    if (!ok) return NULL;
    return PyLong_FromLongLong(total);
}

/* decode_rows: out[i] = table[codes[ids[i]]], an embedding lookup from one-byte codes (as kernels.decode_rows).
 * The table holds 256 values, so every byte is a code in range; every id is checked first. */
static PyObject *py_decode_rows(PyObject *self, PyObject *args) {
    PyObject *codes, *table, *ids, *out;
    Py_ssize_t rows, dim, n;
    if (!PyArg_ParseTuple(args, "OOOOnnn", &codes, &table, &ids, &out, &rows, &dim, &n)) return NULL;
    Buffers b = {.n = 0};
    const uint8_t *cp;
    const float *tp;
    const int64_t *ip;
    float *op;
    int ok = (cp = get_buffer(&b, codes, 0, rows * dim, "codes")) != NULL &&
             (tp = get_buffer(&b, table, 0, 256 * 4, "table")) != NULL &&
             (ip = get_buffer(&b, ids, 0, n * 8, "ids")) != NULL &&
             (op = (float *)get_buffer(&b, out, 1, n * dim * 4, "out")) != NULL;
    for (Py_ssize_t i = 0; ok && i < n; i++)
        if (ip[i] < 0 || ip[i] >= rows) {
            PyErr_Format(PyExc_IndexError, "index %lld is out of range for %zd rows", (long long)ip[i], rows);
            ok = 0;
        }
    if (ok) {
        Py_BEGIN_ALLOW_THREADS for (Py_ssize_t i = 0; i < n; i++) {
            const uint8_t *row = cp + ip[i] * dim;
            for (Py_ssize_t j = 0; j < dim; j++) op[i * dim + j] = tp[row[j]];
        }
        Py_END_ALLOW_THREADS
    }
    release(&b);
    if (!ok) return NULL;
    Py_RETURN_NONE;
}

/* The geometry tuple of nhwc_patches and depthwise_nhwc, checked: sizes the kernels index by. */
static int parse_nhwc(PyObject *geometry, NhwcJob *j) {
    if (!PyArg_ParseTuple(geometry, "nnnnnnnnnnnnnn", &j->batch, &j->h, &j->w, &j->c, &j->kh, &j->kw, &j->sh, &j->sw,
                          &j->dh, &j->dw, &j->top, &j->left, &j->out_h, &j->out_w))
        return 0;
    if (j->batch < 0 || j->h < 0 || j->w < 0 || j->c < 0 || j->kh < 1 || j->kw < 1 || j->out_h < 1 || j->out_w < 1) {
        PyErr_SetString(PyExc_ValueError, "geometry: negative sizes, or an empty kernel or output plane");
        return 0;
    }
    return 1;
}

/* Run fn over the job's output rows, one image's row each, if its buffers were had; release them: the bindings' result. */
static PyObject *run_nhwc(ChunkFn fn, const NhwcJob *j, Buffers *b, int ok, int threads) {
    if (ok) {
        Py_BEGIN_ALLOW_THREADS parallel_chunks(fn, j, j->batch * j->out_h, threads);
        Py_END_ALLOW_THREADS
    }
    release(b);
    if (!ok) return NULL;
    Py_RETURN_NONE;
}

static PyObject *py_nhwc_patches(PyObject *self, PyObject *args) {
    PyObject *x, *out, *geometry;
    NhwcJob j = {0};
    int threads;
    if (!PyArg_ParseTuple(args, "OOOi", &x, &out, &geometry, &threads) || !parse_nhwc(geometry, &j)) return NULL;
    Buffers b = {.n = 0};
    int ok = (j.x = get_buffer(&b, x, 0, j.batch * j.h * j.w * j.c * 4, "x")) != NULL &&
             (j.out = (float *)get_buffer(&b, out, 1, j.batch * j.out_h * j.out_w * j.kh * j.kw * j.c * 4, "out")) != NULL;
    return run_nhwc(patches_row, &j, &b, ok, threads);
}

static PyObject *py_depthwise_nhwc(PyObject *self, PyObject *args) {
    PyObject *x, *taps, *bias, *out, *geometry;
    NhwcJob j = {0};
    int threads;
    if (!PyArg_ParseTuple(args, "OOOOOi", &x, &taps, &bias, &out, &geometry, &threads) || !parse_nhwc(geometry, &j))
        return NULL;
    Buffers b = {.n = 0};
    int ok = (j.x = get_buffer(&b, x, 0, j.batch * j.h * j.w * j.c * 4, "x")) != NULL &&
             (j.taps = get_buffer(&b, taps, 0, j.kh * j.kw * j.c * 4, "taps")) != NULL &&
             (j.bias = get_buffer(&b, bias, 0, j.c * 4, "bias")) != NULL &&
             (j.out = (float *)get_buffer(&b, out, 1, j.batch * j.out_h * j.out_w * j.c * 4, "out")) != NULL;
    return run_nhwc(depthwise_row, &j, &b, ok, threads);
}

static int cpu_has_avx512(void) {
#if HAVE_X86
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else
    return 0;
#endif
}

static int cpu_has_vnni(void) {
#if HAVE_X86
    return cpu_has_avx512() && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vbmi");
#else
    return 0;
#endif
}

static void set_vnni(int on) {
#if HAVE_X86
    use_vnni = on;
#else
    (void)on;
#endif
}

static PyObject *py_isa(PyObject *self, PyObject *args) {
    return PyUnicode_FromString(use_avx512 ? "avx512" : "portable");
}

static PyObject *py_set_isa(PyObject *self, PyObject *args) {
    const char *name;
    if (!PyArg_ParseTuple(args, "s", &name)) return NULL;
    if (strcmp(name, "portable") == 0) {
        use_avx512 = 0;
        set_vnni(0);
    } else if (strcmp(name, "avx512") == 0) {
        if (!cpu_has_avx512()) {
            PyErr_SetString(PyExc_ValueError, "this CPU (or build) has no AVX-512 F/BW/VL/DQ kernels");
            return NULL;
        }
        use_avx512 = 1;
        set_vnni(cpu_has_vnni());
    } else {
        PyErr_Format(PyExc_ValueError, "unknown instruction set '%s'; use 'avx512' or 'portable'", name);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *py_threaded(PyObject *self, PyObject *args) {
#if HAVE_POOL || defined(_OPENMP)
    Py_RETURN_TRUE;
#else
    Py_RETURN_FALSE;
#endif
}

static PyMethodDef methods[] = {
    {"panels_matmul", py_panels_matmul, METH_VARARGS,
     "panels_matmul(codes, blk_ptr, cols, table, x, out, bias, rows, n_cols, tokens, ldx, ldo, threads)"},
    {"int8_matmul", py_int8_matmul, METH_VARARGS,
     "int8_matmul(codes, packed, table, rowsum, (outlier_ptr, outlier_cols, outlier_values), wscale, x, out, bias, rows, "
     "n_cols, tokens, ldx, ldo, threads[, (ptr, cols, by_rows)])"},
    {"tiled_matvec", py_tiled_matvec, METH_VARARGS,
     "tiled_matvec(ptr, steps, entries, slice_rows, table, x, out, bias, rows, n_cols, threads)"},
    {"rows_matmul", py_rows_matmul, METH_VARARGS,
     "rows_matmul(seg_ptr, entries, group_rows, table, x, out, bias, rows, n_cols, tokens, ldx, ldo, threads)"},
    {"csc_matvec", py_csc_matvec, METH_VARARGS,
     "csc_matvec(col_ptr, gaps, codes, codebook, x, out, bias, rows, n_cols, workers, wide, threads)"},
    {"conv2d", py_conv2d, METH_VARARGS,
     "conv2d(row_ptr, gaps, codes, codebook, x, acc, out, bias, (batch, in, h, w, out, out_h, out_w, width, kh, kw), "
     "(sh, sw, dh, dw, groups), wide, threads)"},
    {"decode_rows", py_decode_rows, METH_VARARGS,
     "decode_rows(codes, table, ids, out, rows, dim, n): out[i] = table[codes[ids[i]]] (uint8 codes (rows, dim), "
     "256 float32 values, int64 ids)"},
    {"nhwc_patches", py_nhwc_patches, METH_VARARGS,
     "nhwc_patches(x, out, (batch, h, w, c, kh, kw, sh, sw, dh, dw, top, left, out_h, out_w), threads): im2col "
     "from a channels-last image, a patch's taps in (i, j, channel) order"},
    {"depthwise_nhwc", py_depthwise_nhwc, METH_VARARGS,
     "depthwise_nhwc(x, taps, bias, out, geometry, threads): a depthwise convolution, channels-last in and out; "
     "taps (kh * kw, c)"},
    {"count_nonzero", py_count_nonzero, METH_VARARGS,
     "count_nonzero(x, counts, n, n_cols): each row's non-zero count of the (n, n_cols) float32 x into the int64 "
     "counts; returns the total"},
    {"isa", py_isa, METH_NOARGS, "the instruction set the kernels run: 'avx512' or 'portable'"},
    {"set_isa", py_set_isa, METH_VARARGS, "set_isa(name): run the 'avx512' (if the CPU has it) or 'portable' kernels"},
    {"threaded", py_threaded, METH_NOARGS, "whether the kernels run on several threads (OpenMP or POSIX threads)"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_simd", "SIMD kernels of the inference engine.", -1,
                                    methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__simd(void) {
    use_avx512 = cpu_has_avx512();
    set_vnni(cpu_has_vnni());
    return PyModule_Create(&module);
}
