/* Matrix-vector products for decoding on CPU: y (M, N) = x (M, K) . W^T, W (N, K) row-major, M small.
 *
 * Batch-1 decoding reads every weight once per token, so it runs at memory speed only if converting a
 * weight to float costs less than reading it. torch's own paths on AVX2 processors (no AVX-512) fall short on
 * two cores; these loops stream 1.1-1.8x as many bytes per second on the GLM-6B shapes (bf16 ~17-24 GB/s,
 * int8 ~8-18, int4 ~5-9 against 20-30 GB/s of bandwidth: bf16 keeps up, int8/int4 stay compute-bound;
 * benchmarks/cpu_kernels.py). Built once per machine by visualglm/kernels/cpu.py.
 *
 * Weight kinds: 0 float32, 1 bfloat16, 2 float16, 3 int8 with one float scale per row, 4 int4 in the
 * storage layout (byte i of a row = q[2i] << 4 | (q[2i+1] & 0xF), signed nibbles) with one scale per row;
 * for int4, each row of x comes de-interleaved: its K/2 even columns, then its K/2 odd ones.
 * Accumulation is float32. Rows of W are split over `threads` POSIX threads in blocks of 4 rows; each block
 * is read from memory once and reused from cache for every row of x.
 */
#include <pthread.h>
#include <stdint.h>
#include <string.h>

enum { W_F32 = 0, W_BF16 = 1, W_F16 = 2, W_I8 = 3, W_I4 = 4 };
#define BLOCK 4
#define MAX_THREADS 256

typedef struct {
    int kind;
    const float *x;
    long m;
    const void *w;
    const float *scale;
    float *y;
    long n, k, r0, r1;
} job_t;

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
typedef __m256 vf;
#define VZERO() _mm256_setzero_ps()
#define VLOAD(p) _mm256_loadu_ps(p)
#define VFMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define VADD(a, b) _mm256_add_ps(a, b)
static inline float vsum(vf a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
static inline vf ld_f32(const void *p, long j) { return _mm256_loadu_ps((const float *)p + j); }
static inline vf ld_bf16(const void *p, long j) {
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)p + j));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
#ifdef __F16C__
#define HAVE_F16 1
static inline vf ld_f16(const void *p, long j) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + j)));
}
#endif
static inline vf ld_i8(const void *p, long j) {
    __m128i b = _mm_loadl_epi64((const __m128i *)((const int8_t *)p + j));
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
}
/* 8 bytes -> the 8 high nibbles (even columns) and the 8 low nibbles (odd columns), sign-extended */
static inline void ld_i4(const void *p, long j, vf *even, vf *odd) {
    __m256i b = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)((const int8_t *)p + j)));
    *even = _mm256_cvtepi32_ps(_mm256_srai_epi32(b, 4));
    *odd = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(b, 28), 28));
}
#else /* portable: GCC/Clang vector extensions (NEON on arm64, SSE elsewhere) */
typedef float vf __attribute__((vector_size(32)));
typedef uint16_t vu16 __attribute__((vector_size(16)));
typedef uint32_t vu32 __attribute__((vector_size(32)));
typedef int8_t vi8 __attribute__((vector_size(8)));
#define VZERO() ((vf){0})
static inline vf VLOAD(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
#define VFMA(a, b, c) ((a) * (b) + (c))
#define VADD(a, b) ((a) + (b))
static inline float vsum(vf a) { float s = 0; for (int i = 0; i < 8; i++) s += a[i]; return s; }
static inline vf ld_f32(const void *p, long j) { return VLOAD((const float *)p + j); }
static inline vf ld_bf16(const void *p, long j) {
    vu16 h; memcpy(&h, (const uint16_t *)p + j, sizeof h);
    vu32 w = __builtin_convertvector(h, vu32) << 16;
    vf f; memcpy(&f, &w, sizeof f); return f;
}
static inline vf ld_i8(const void *p, long j) {
    vi8 b; memcpy(&b, (const int8_t *)p + j, sizeof b); return __builtin_convertvector(b, vf);
}
static inline void ld_i4(const void *p, long j, vf *even, vf *odd) {
    vi8 b; memcpy(&b, (const int8_t *)p + j, sizeof b);
    *even = __builtin_convertvector(b >> 4, vf);
    *odd = __builtin_convertvector((vi8)(b << 4) >> 4, vf);
}
#endif

/* Dot products of `rows` (1..4) consecutive weight rows with one row of x; two accumulators per row hide
 * the FMA latency. K % 16 == 0 (float kinds) and (K/2) % 16 == 0 (int4) are checked by the caller. */
#define DOT_ROWS(NAME, LOAD, ESIZE)                                                                          \
    static void NAME(const float *x, const char *w, long k, long rows, float *out) {                       \
        vf a[BLOCK] = {VZERO(), VZERO(), VZERO(), VZERO()}, b[BLOCK] = {VZERO(), VZERO(), VZERO(), VZERO()}; \
        const long stride = k * (ESIZE);                                                                    \
        if (rows == BLOCK) {                                                                                \
            for (long j = 0; j < k; j += 16) {                                                              \
                vf x0 = VLOAD(x + j), x1 = VLOAD(x + j + 8);                                                \
                for (int r = 0; r < BLOCK; r++) {                                                           \
                    a[r] = VFMA(LOAD(w + r * stride, j), x0, a[r]);                                         \
                    b[r] = VFMA(LOAD(w + r * stride, j + 8), x1, b[r]);                                     \
                }                                                                                           \
            }                                                                                               \
        } else {                                                                                            \
            for (long r = 0; r < rows; r++)                                                                 \
                for (long j = 0; j < k; j += 16) {                                                          \
                    a[r] = VFMA(LOAD(w + r * stride, j), VLOAD(x + j), a[r]);                               \
                    b[r] = VFMA(LOAD(w + r * stride, j + 8), VLOAD(x + j + 8), b[r]);                       \
                }                                                                                           \
        }                                                                                                   \
        for (long r = 0; r < rows; r++) out[r] = vsum(VADD(a[r], b[r]));                                   \
    }
DOT_ROWS(dot_f32, ld_f32, 4)
DOT_ROWS(dot_bf16, ld_bf16, 2)
DOT_ROWS(dot_i8, ld_i8, 1)
#ifdef HAVE_F16
DOT_ROWS(dot_f16, ld_f16, 2)
#endif

static void dot_i4(const float *x, const char *w, long k, long rows, float *out) {
    const long half = k / 2;
    const float *xe = x, *xo = x + half;
    vf a[BLOCK] = {VZERO(), VZERO(), VZERO(), VZERO()}, b[BLOCK] = {VZERO(), VZERO(), VZERO(), VZERO()};
    for (long j = 0; j < half; j += 8) {
        vf e = VLOAD(xe + j), o = VLOAD(xo + j);
        for (long r = 0; r < rows; r++) {
            vf we, wo;
            ld_i4(w + r * half, j, &we, &wo);
            a[r] = VFMA(we, e, a[r]);
            b[r] = VFMA(wo, o, b[r]);
        }
    }
    for (long r = 0; r < rows; r++) out[r] = vsum(VADD(a[r], b[r]));
}

typedef void (*dot_fn)(const float *, const char *, long, long, float *);

static dot_fn pick(int kind, long *esize_num, long *esize_den) {
    *esize_den = 1;
    switch (kind) {
    case W_F32: *esize_num = 4; return dot_f32;
    case W_BF16: *esize_num = 2; return dot_bf16;
#ifdef HAVE_F16
    case W_F16: *esize_num = 2; return dot_f16;
#endif
    case W_I8: *esize_num = 1; return dot_i8;
    case W_I4: *esize_num = 1; *esize_den = 2; return dot_i4;
    default: return 0;
    }
}

static void *run(void *arg) {
    const job_t *jb = (const job_t *)arg;
    long num = 0, den = 1;
    dot_fn dot = pick(jb->kind, &num, &den);
    const long row_bytes = jb->k * num / den;
    float out[BLOCK];
    for (long r = jb->r0; r < jb->r1; r += BLOCK) {
        long rows = jb->r1 - r < BLOCK ? jb->r1 - r : BLOCK;
        const char *w = (const char *)jb->w + r * row_bytes;
        for (long i = 0; i < jb->m; i++) { /* the block stays in cache for rows 1.. of x */
            dot(jb->x + i * jb->k, w, jb->k, rows, out);
            float *y = jb->y + i * jb->n + r;
            for (long q = 0; q < rows; q++) y[q] = jb->scale ? out[q] * jb->scale[r + q] : out[q];
        }
    }
    return 0;
}

/* INT4 storage rows -> float32 values (no scale), rows [r0, r1) of a job: the many-rows path's GEMM input */
static void *unpack_rows(void *arg) {
    const job_t *jb = (const job_t *)arg;
    const long half = jb->k / 2;
    for (long r = jb->r0; r < jb->r1; r++) {
        const int8_t *src = (const int8_t *)jb->w + r * half;
        float *dst = jb->y + r * jb->k;
        for (long i = 0; i < half; i++) {
            int8_t b = src[i];
            dst[2 * i] = (float)(b >> 4);
            dst[2 * i + 1] = (float)((int8_t)(b << 4) >> 4);
        }
    }
    return 0;
}

/* Runs fn over rows [0, n) split into `threads` contiguous ranges (whole blocks of `align` rows). */
static void parallel_rows(void *(*fn)(void *), job_t proto, long n, long align, int threads) {
    long blocks = (n + align - 1) / align;
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > blocks) threads = (int)blocks;
    job_t jobs[MAX_THREADS];
    pthread_t tids[MAX_THREADS];
    int started[MAX_THREADS];
    for (int t = 0; t < threads; t++) {
        long b0 = blocks * t / threads, b1 = blocks * (t + 1) / threads;
        jobs[t] = proto;
        jobs[t].r0 = b0 * align;
        jobs[t].r1 = b1 * align < n ? b1 * align : n;
    }
    for (int t = 1; t < threads; t++) started[t] = pthread_create(&tids[t], 0, fn, &jobs[t]) == 0;
    fn(&jobs[0]);
    for (int t = 1; t < threads; t++) {
        if (started[t]) pthread_join(tids[t], 0);
        else fn(&jobs[t]); /* no thread to be had: do its share here */
    }
}

/* INT4 storage layout (n, k/2) -> float32 (n, k) values in [-8, 7]. */
void vg_unpack_i4(const void *w, float *out, long n, long k, int threads) {
    job_t proto = {W_I4, 0, 0, w, 0, out, n, k, 0, 0};
    parallel_rows(unpack_rows, proto, n, 1, threads);
}

/* 1 when this build has a loop for `kind` (float16 needs F16C on x86). */
int vg_supports(int kind) {
    long num = 0, den = 1;
    return pick(kind, &num, &den) != 0;
}

/* Returns 0 on success, -1 for an unsupported kind or shape (the caller falls back to torch). */
int vg_gemv(int kind, const float *x, long m, const void *w, const float *scale, float *y, long n, long k,
            int threads) {
    long num = 0, den = 1;
    if (!pick(kind, &num, &den) || k % (kind == W_I4 ? 32 : 16) || m < 1 || n < 1) return -1;
    if ((kind == W_I8 || kind == W_I4) && !scale) return -1;
    job_t proto = {kind, x, m, w, scale, y, n, k, 0, 0};
    parallel_rows(run, proto, n, BLOCK, threads);
    return 0;
}
