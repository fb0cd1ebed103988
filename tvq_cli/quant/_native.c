/* The hot loops of pack and merge, in C: each has a bit-exact torch or numpy reference.
 *
 * Pack: a block of raw inputs (bf16, fp16 or fp32 fine-tuned weights, minus the pretrained
 * ones) is widened one chunk of groups at a time into an L1-sized buffer, range-searched and
 * quantized there, and its codes bit-packed into the part's stored bytes: one call per block,
 * no full-size intermediate. `range_search.py` holds the reference in torch ops; this is the
 * same arithmetic, op for op and in the same float32 order, so archives are byte-identical
 * whichever one runs (the tests compare them). Rules that keep the two identical:
 *   - no FMA contraction (-ffp-contract=off): every product and sum is rounded on its own;
 *   - rounding is half-to-even via the 1.5 * 2^23 trick, after clamping to [0, levels]
 *     (clamp then round equals round then clamp for integer bounds);
 *   - a group's squared error is summed in LANES interleaved lanes, in element order, folded
 *     as ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)): a fixed order that vectorizes.
 *     With AVX-512 two candidates are tried at once, one per half of a 16-wide register: each
 *     half does exactly the 8-lane arithmetic, so the sums are the same to the bit.
 *
 * Merge: codes are dequantized through a per-group table of its 2^bits values (the same
 * `(code - zero) / scale` division, done once per value instead of once per element), summed
 * across tasks in task order (task arithmetic) or trimmed, elected and averaged (TIES), and
 * counted into top-k histograms, without a full-size fp32 copy of any task vector.
 *
 * The GIL is released in every kernel, so the pipelines' threads run them in parallel.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define LANES 8
#define MAX_CANDIDATES 64
#define MAX_TABLE 256 /* step codes of 8-bit compact scales */
#define MAX_HISTOGRAM_LEVELS 31 /* codes of up to 5 bits are counted by value */
#define CHUNK 4096          /* elements widened at a time: 16 KiB of fp32, stays in L1 */
#define ROUNDER 12582912.0f /* 1.5 * 2^23: adding it rounds [0, 2^22] to integers */
#define ROUNDER_BITS 0x4b400000u /* its bit pattern */

#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__)
/* One build for every x86-64 CPU; the AVX2 copy is picked at load time where it runs. */
#define MULTIVERSION __attribute__((target_clones("avx2", "default")))
#else
#define MULTIVERSION
#endif

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define HAVE_AVX512 1
#define AVX512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl")))
#else
#define HAVE_AVX512 0
#endif

#if defined(__GNUC__)
#define INLINE static inline __attribute__((always_inline))
#else
#define INLINE static inline
#endif

static int use_avx512 = 0; /* set at import where the CPU has it; tests can turn it off */

/* ---------------------------------------------------------------------------------------- */
/* Reading raw inputs                                                                        */

/* Input value kinds: how the raw bytes of a block are read as float32. */
enum { KIND_F32 = 0, KIND_BF16 = 1, KIND_F16 = 2, KIND_NONE = 3 };
static const Py_ssize_t KIND_SIZE[] = {4, 2, 2, 0};

/* IEEE half to float32, exact: the bits moved into float32's place and rebiased by a
 * multiplication (exact for normal and subnormal halves); inf and NaN keep an all-ones
 * exponent. Branch-free, so the loops around it vectorize. */
INLINE float half_to_float(uint16_t h) {
    uint32_t em = h & 0x7fffu;
    uint32_t bits = em << 13;
    float f;
    memcpy(&f, &bits, 4);
    f *= 0x1.0p112f;
    memcpy(&bits, &f, 4);
    bits = em >= 0x7c00u ? 0x7f800000u | (em & 0x3ffu) << 13 : bits;
    bits |= (uint32_t)(h & 0x8000u) << 16;
    memcpy(&f, &bits, 4);
    return f;
}

INLINE float load_value(const void *src, int kind, Py_ssize_t at) {
    if (kind == KIND_BF16) {
        uint32_t bits = (uint32_t)((const uint16_t *)src)[at] << 16;
        float v;
        memcpy(&v, &bits, 4);
        return v;
    }
    if (kind == KIND_F16)
        return half_to_float(((const uint16_t *)src)[at]);
    return ((const float *)src)[at];
}

INLINE uint32_t not_finite(float v) {
    uint32_t bits;
    memcpy(&bits, &v, 4);
    return (bits & 0x7f800000u) == 0x7f800000u; /* all-ones exponent: NaN or inf */
}

/* out = float32(src) [- float32(minus)]; returns nonzero if any value of out is NaN or
 * infinite. Called with constant kinds, so each combination compiles to its own loop. */
INLINE uint32_t widen_values(const void *src, int kind, const void *minus, int mkind, float *out,
                             Py_ssize_t n) {
    uint32_t bad = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        float v = load_value(src, kind, i);
        if (mkind != KIND_NONE)
            v = v - load_value(minus, mkind, i);
        out[i] = v;
        bad |= not_finite(v);
    }
    return bad;
}

#define WIDEN_CASE(K, M)                                                                       \
    case (K) * 4 + (M):                                                                        \
        return widen_values(src, K, minus, M, out, n);

MULTIVERSION
static uint32_t widen_block(const void *src, int kind, const void *minus, int mkind, float *out,
                            Py_ssize_t n) {
    switch (kind * 4 + mkind) {
        WIDEN_CASE(KIND_F32, KIND_F32)
        WIDEN_CASE(KIND_F32, KIND_BF16)
        WIDEN_CASE(KIND_F32, KIND_F16)
        WIDEN_CASE(KIND_F32, KIND_NONE)
        WIDEN_CASE(KIND_BF16, KIND_F32)
        WIDEN_CASE(KIND_BF16, KIND_BF16)
        WIDEN_CASE(KIND_BF16, KIND_F16)
        WIDEN_CASE(KIND_BF16, KIND_NONE)
        WIDEN_CASE(KIND_F16, KIND_F32)
        WIDEN_CASE(KIND_F16, KIND_BF16)
        WIDEN_CASE(KIND_F16, KIND_F16)
        WIDEN_CASE(KIND_F16, KIND_NONE)
    }
    return 1;
}

MULTIVERSION
static uint32_t any_not_finite(const float *x, Py_ssize_t n) {
    uint32_t bad = 0;
    for (Py_ssize_t i = 0; i < n; i++)
        bad |= not_finite(x[i]);
    return bad;
}

/* A block of raw inputs: values src[i] (minus minus[i] when mkind is not KIND_NONE). */
typedef struct {
    const char *src;
    int kind;
    const char *minus;
    int mkind;
} Source;

/* Widen elements [start, start + n) of `in` into out (no copy for plain fp32: `*x` points
 * into the source); returns nonzero if a value is not finite. */
static uint32_t widen_chunk(const Source *in, Py_ssize_t start, Py_ssize_t n, float *out,
                            const float **x) {
    if (in->kind == KIND_F32 && in->mkind == KIND_NONE) {
        *x = (const float *)in->src + start;
        return any_not_finite(*x, n);
    }
    *x = out;
    const char *minus = in->mkind == KIND_NONE ? NULL : in->minus + start * KIND_SIZE[in->mkind];
    return widen_block(in->src + start * KIND_SIZE[in->kind], in->kind, minus, in->mkind, out, n);
}

/* Groups of `width` per chunk: the chunk is widened once into an L1-sized buffer. */
static Py_ssize_t chunk_groups(Py_ssize_t width, Py_ssize_t groups) {
    Py_ssize_t per = width >= CHUNK ? 1 : CHUNK / width;
    return per < groups ? per : groups;
}

/* ---------------------------------------------------------------------------------------- */
/* Ranges and the range search                                                               */

#if defined(__GNUC__)
/* Eight float lanes as a GCC vector: min and max by compare and select (the scalar loop's
 * `v < m ? v : m`, which the compiler does not vectorize on its own). */
typedef float f8 __attribute__((vector_size(32)));
typedef int32_t i8 __attribute__((vector_size(32)));

#define SELECT8(take, a, b) ((f8)(((i8)(a) & (take)) | ((i8)(b) & ~(take))))
#endif

/* Each group's min and max, widened to include 0 (range_search.group_ranges). */
MULTIVERSION
static void group_ranges(const float *x, Py_ssize_t groups, Py_ssize_t width, float *lo,
                         float *hi) {
    for (Py_ssize_t g = 0; g < groups; g++) {
        const float *xg = x + g * width;
        float mn[LANES] = {0.0f}, mx[LANES] = {0.0f};
        Py_ssize_t i = 0;
#if defined(__GNUC__)
        f8 vmn = {0.0f}, vmx = {0.0f};
        for (; i + LANES <= width; i += LANES) {
            f8 v;
            memcpy(&v, xg + i, sizeof v);
            vmn = SELECT8(v < vmn, v, vmn);
            vmx = SELECT8(v > vmx, v, vmx);
        }
        memcpy(mn, &vmn, sizeof mn);
        memcpy(mx, &vmx, sizeof mx);
#else
        for (; i + LANES <= width; i += LANES) {
            for (int j = 0; j < LANES; j++) {
                float v = xg[i + j];
                mn[j] = v < mn[j] ? v : mn[j];
                mx[j] = v > mx[j] ? v : mx[j];
            }
        }
#endif
        for (int j = 0; i < width; i++, j++) {
            mn[j] = xg[i] < mn[j] ? xg[i] : mn[j];
            mx[j] = xg[i] > mx[j] ? xg[i] : mx[j];
        }
        float a = mn[0], b = mx[0];
        for (int j = 1; j < LANES; j++) {
            a = mn[j] < a ? mn[j] : a;
            b = mx[j] > b ? mx[j] : b;
        }
        lo[g] = a;
        hi[g] = b;
    }
}

static uint32_t source_ranges(const Source *in, Py_ssize_t groups, Py_ssize_t width,
                              float *scratch, float *lo, float *hi) {
    uint32_t bad = 0;
    Py_ssize_t per = chunk_groups(width, groups);
    for (Py_ssize_t g = 0; g < groups; g += per) {
        Py_ssize_t count = per < groups - g ? per : groups - g;
        const float *x;
        bad |= widen_chunk(in, g * width, count * width, scratch, &x);
        group_ranges(x, count, width, lo + g, hi + g);
    }
    return bad;
}

typedef struct {
    float levels;
    int count;              /* candidates per group */
    const float *factors;   /* fp32 scales: shrink factors [count] */
    const int32_t *shifts;  /* compact scales: step-code shifts [count] */
    const float *table;     /* compact scales: every step code's step, decreasing */
    Py_ssize_t table_size;  /* 0 for fp32 scales */
    float *scale_of;        /* compact scales: 1 / table[k], and 1 / that (filled per call) */
    float *step_of;
    const int32_t *coarse;  /* candidates of the first pass, 0 first */
    Py_ssize_t n_coarse;
    const int32_t *fine;    /* offsets around the coarse best */
    Py_ssize_t n_fine;
    float margin;           /* 1 + MARGIN: a shrunk step must beat min-max by this much */
    float flat_scale;       /* scale of groups with a zero span */
    float max_scale;        /* cap on levels / span (quantizer.MAX_SCALE) */
} Search;

INLINE float clamp_round(float t, float levels) {
    t = t > 0.0f ? t : 0.0f;
    t = t < levels ? t : levels;
    return (t + ROUNDER) - ROUNDER;
}

INLINE float fold(const float *acc) {
    return ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
}

/* (clamp_round(t, levels) - zero) with the rounder kept in: t + ROUNDER is ROUNDER plus t
 * rounded to an integer (ties to even, as clamp_round), and clamping that to [ROUNDER,
 * ROUNDER + levels] is clamping the rounded value to [0, levels]; the difference from
 * `shifted_zero` (ROUNDER + zero, an integer below 2^24) is then exact. The same value as
 * clamp_round's, in one operation fewer (the search's inner loop is bound by these). */
INLINE float centered_code(float t, float levels, float shifted_zero) {
    float u = t + ROUNDER;
    u = u > ROUNDER ? u : ROUNDER;
    u = u < ROUNDER + levels ? u : ROUNDER + levels;
    return u - shifted_zero;
}

/* (uint8_t)clamp_round(t, levels), read off the bits of centered_code's shifted value:
 * ROUNDER + k (k in [0, levels]) lies in one binade with a step of 1, so its bit pattern is
 * ROUNDER's plus k. No float-to-integer conversion, so the loop vectorizes. */
INLINE uint8_t code_of(float t, float levels) {
    float u = centered_code(t, levels, 0.0f);
    uint32_t bits;
    memcpy(&bits, &u, 4);
    return (uint8_t)(bits - ROUNDER_BITS);
}

/* `step` is 1.0f / scale, computed by the caller. */
INLINE float group_error(const float *x, Py_ssize_t width, float scale, float step, float zero,
                         float levels) {
    float acc[LANES] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    const float shifted_zero = ROUNDER + zero;
    Py_ssize_t i = 0;
    for (; i + LANES <= width; i += LANES) {
        for (int j = 0; j < LANES; j++) {
            float v = x[i + j];
            float d = centered_code(v * scale + zero, levels, shifted_zero) * step - v;
            acc[j] += d * d;
        }
    }
    for (int j = 0; i < width; i++, j++) {
        float v = x[i];
        float d = centered_code(v * scale + zero, levels, shifted_zero) * step - v;
        acc[j] += d * d;
    }
    return fold(acc);
}

#if HAVE_AVX512
#define MAX_PAIRS 4

/* group_error of up to 2 * MAX_PAIRS candidates in one sweep over a group (width a multiple
 * of LANES): the group's next 8 values go into both halves of a register; pair p holds
 * candidate a[p]'s scale in the low half and b[p]'s in the high half, so each half runs
 * group_error's ops in its order, and the pairs' sums are independent chains. */
static inline __attribute__((always_inline, target("avx512f,avx512dq"))) void
pairs_body(const float *x, Py_ssize_t width, const float *sa, const float *sb, const float *ta,
           const float *tb, float zero, float levels, float *ea, float *eb, const int pairs) {
    __m512 scale[MAX_PAIRS], step[MAX_PAIRS], acc[MAX_PAIRS];
    for (int p = 0; p < pairs; p++) {
        scale[p] = _mm512_insertf32x8(_mm512_set1_ps(sa[p]), _mm256_set1_ps(sb[p]), 1);
        step[p] = _mm512_insertf32x8(_mm512_set1_ps(ta[p]), _mm256_set1_ps(tb[p]), 1);
        acc[p] = _mm512_setzero_ps();
    }
    const __m512 z = _mm512_set1_ps(zero), shifted_zero = _mm512_set1_ps(ROUNDER + zero);
    const __m512 r = _mm512_set1_ps(ROUNDER), top = _mm512_set1_ps(ROUNDER + levels);
    for (Py_ssize_t i = 0; i < width; i += LANES) {
        const __m512 v = _mm512_broadcast_f32x8(_mm256_loadu_ps(x + i));
        for (int p = 0; p < pairs; p++) {
            __m512 t = _mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(v, scale[p]), z), r);
            t = _mm512_min_ps(_mm512_max_ps(t, r), top); /* = centered_code's two selects */
            __m512 d = _mm512_sub_ps(_mm512_mul_ps(_mm512_sub_ps(t, shifted_zero), step[p]), v);
            acc[p] = _mm512_add_ps(acc[p], _mm512_mul_ps(d, d));
        }
    }
    for (int p = 0; p < pairs; p++) {
        float lanes[2 * LANES];
        _mm512_storeu_ps(lanes, acc[p]);
        ea[p] = fold(lanes);
        eb[p] = fold(lanes + LANES);
    }
}

AVX512 static void pairs_error(const float *x, Py_ssize_t width, const float *sa,
                               const float *sb, const float *ta, const float *tb, float zero,
                               float levels, float *ea, float *eb, int pairs) {
    switch (pairs) { /* constant counts, so the pairs stay in registers */
    case 1:
        pairs_body(x, width, sa, sb, ta, tb, zero, levels, ea, eb, 1);
        return;
    case 2:
        pairs_body(x, width, sa, sb, ta, tb, zero, levels, ea, eb, 2);
        return;
    case 3:
        pairs_body(x, width, sa, sb, ta, tb, zero, levels, ea, eb, 3);
        return;
    default:
        pairs_body(x, width, sa, sb, ta, tb, zero, levels, ea, eb, 4);
    }
}
#endif

/* The errors of the listed candidates not evaluated yet (err < 0); where wide, up to
 * 2 * MAX_PAIRS of them in one sweep. */
INLINE void evaluate(const float *xg, Py_ssize_t width, const float *cand, const float *inv,
                     float zero, float levels, const int *list, Py_ssize_t n, float *err,
                     int wide) {
    int pending[MAX_CANDIDATES];
    int count = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        int c = list[i];
        if (err[c] < 0.0f) {
            err[c] = 0.0f; /* claimed: evaluated below */
            pending[count++] = c;
        }
    }
#if HAVE_AVX512
    if (wide) {
        for (int first = 0; first < count; first += 2 * MAX_PAIRS) {
            float sa[MAX_PAIRS], sb[MAX_PAIRS], ta[MAX_PAIRS], tb[MAX_PAIRS];
            float ea[MAX_PAIRS], eb[MAX_PAIRS];
            int a[MAX_PAIRS], b[MAX_PAIRS], pairs = 0;
            for (int i = first; i < count && i < first + 2 * MAX_PAIRS; i += 2, pairs++) {
                a[pairs] = pending[i];
                b[pairs] = pending[i + 1 < count ? i + 1 : i];
                sa[pairs] = cand[a[pairs]];
                sb[pairs] = cand[b[pairs]];
                ta[pairs] = inv[a[pairs]];
                tb[pairs] = inv[b[pairs]];
            }
            pairs_error(xg, width, sa, sb, ta, tb, zero, levels, ea, eb, pairs);
            for (int p = 0; p < pairs; p++) {
                err[a[p]] = ea[p];
                err[b[p]] = eb[p];
            }
        }
        return;
    }
#endif
    for (int i = 0; i < count; i++)
        err[pending[i]] = group_error(xg, width, cand[pending[i]], inv[pending[i]], zero, levels);
}

/* With two candidates a register (AVX-512) and at most EVERY_AT_ONCE of them, every
 * candidate's error is taken in one sweep over the group, four pairs abreast, before the
 * choice reads the ones it needs (the same numbers): the coarse pass alone takes three sweeps
 * with a slot left empty, the fine pass mostly one more, so the unused ones cost no more work,
 * and one sweep with four independent chains runs about 10% faster than three and one. */
#define EVERY_AT_ONCE 8
static const int EVERY[EVERY_AT_ONCE] = {0, 1, 2, 3, 4, 5, 6, 7};

/* Search and quantize whole groups of float32 `x`; see range_search.quantize_groups. */
INLINE void search_body(const float *x, Py_ssize_t groups, Py_ssize_t width, const float *lo,
                        const float *hi, const Search *s, uint8_t *codes, float *scales,
                        uint8_t *zeros, uint8_t *step_codes, int wide) {
    const float levels = s->levels;
    float cand[MAX_CANDIDATES], inv[MAX_CANDIDATES], err[MAX_CANDIDATES];
    int32_t code[MAX_CANDIDATES];
    int coarse[MAX_CANDIDATES], fine[MAX_CANDIDATES];
    for (Py_ssize_t g = 0; g < groups; g++) {
        const float *xg = x + g * width;
        float span = hi[g] - lo[g];
        float minmax = (1.0f / span) * levels;
        minmax = minmax < s->max_scale ? minmax : s->max_scale;
        if (!(span > 0.0f))
            minmax = s->flat_scale;
        float zero = clamp_round(-minmax * lo[g], levels);
        if (s->table_size) {
            /* The largest step code whose step still covers 1 / minmax, 0 if none: the count
             * of table entries >= it (a prefix: the table decreases) less one. */
            const float want = 1.0f / minmax;
            Py_ssize_t a = 0, b = s->table_size;
            while (a < b) {
                Py_ssize_t mid = (a + b) / 2;
                if (s->table[mid] >= want)
                    a = mid + 1;
                else
                    b = mid;
            }
            int32_t base = a > 0 ? (int32_t)(a - 1) : 0;
            int32_t limit = (int32_t)s->table_size - 1;
            for (int c = 0; c < s->count; c++) {
                int32_t k = base + s->shifts[c];
                code[c] = k < 0 ? 0 : (k > limit ? limit : k);
                cand[c] = s->scale_of[code[c]];
                inv[c] = s->step_of[code[c]];
            }
        } else {
            for (int c = 0; c < s->count; c++) {
                cand[c] = minmax / s->factors[c];
                inv[c] = 1.0f / cand[c];
            }
        }
        int best = 0;
        if (s->count > 1) {
            for (int c = 0; c < s->count; c++)
                err[c] = -1.0f; /* not evaluated yet */
            for (Py_ssize_t i = 0; i < s->n_coarse; i++)
                coarse[i] = s->coarse[i];
            if (wide && s->count <= EVERY_AT_ONCE)
                evaluate(xg, width, cand, inv, zero, levels, EVERY, s->count, err, wide);
            evaluate(xg, width, cand, inv, zero, levels, coarse, s->n_coarse, err, wide);
            float best_err = 0.0f;
            for (Py_ssize_t i = 0; i < s->n_coarse; i++) {
                int c = coarse[i];
                float e = i ? err[c] * s->margin : err[c];
                if (i == 0 || e < best_err) {
                    best_err = e;
                    best = c;
                }
            }
            for (Py_ssize_t i = 0; i < s->n_fine; i++) {
                int c = best + s->fine[i];
                fine[i] = c < 1 ? 1 : (c > s->count - 1 ? s->count - 1 : c);
            }
            evaluate(xg, width, cand, inv, zero, levels, fine, s->n_fine, err, wide);
            float fine_err = 0.0f;
            int fine_best = best;
            for (Py_ssize_t i = 0; i < s->n_fine; i++) {
                float e = err[fine[i]] * s->margin;
                if (i == 0 || e < fine_err) {
                    fine_err = e;
                    fine_best = fine[i];
                }
            }
            if (s->n_fine && fine_err < best_err)
                best = fine_best;
        }
        const float scale = cand[best];
        uint8_t *out = codes + g * width;
        for (Py_ssize_t i = 0; i < width; i++)
            out[i] = code_of(xg[i] * scale + zero, levels);
        scales[g] = scale;
        zeros[g] = (uint8_t)zero;
        if (s->table_size)
            step_codes[g] = (uint8_t)code[best];
    }
}

MULTIVERSION
static void search_generic(const float *x, Py_ssize_t groups, Py_ssize_t width, const float *lo,
                           const float *hi, const Search *s, uint8_t *codes, float *scales,
                           uint8_t *zeros, uint8_t *step_codes) {
    search_body(x, groups, width, lo, hi, s, codes, scales, zeros, step_codes, 0);
}

#if HAVE_AVX512
AVX512 static void search_wide(const float *x, Py_ssize_t groups, Py_ssize_t width,
                               const float *lo, const float *hi, const Search *s, uint8_t *codes,
                               float *scales, uint8_t *zeros, uint8_t *step_codes) {
    search_body(x, groups, width, lo, hi, s, codes, scales, zeros, step_codes, 1);
}
#endif

/* ---------------------------------------------------------------------------------------- */
/* Bit-packing                                                                               */

/* bitpack.py's layout: code i in bits [i*b, i*b + b) of a little-endian stream; eight codes
 * fill exactly b bytes. `n` is a multiple of 8. */
INLINE void pack_whole_bytes(const uint8_t *codes, Py_ssize_t n, int bits, uint8_t *out) {
    /* 1, 2, 4 bits: each output byte holds 8 / bits codes; a loop that vectorizes. */
    const int per = 8 / bits;
    for (Py_ssize_t k = 0; k < n / per; k++) {
        uint8_t byte = 0;
        for (int j = 0; j < per; j++)
            byte |= (uint8_t)(codes[k * per + j] << (j * bits));
        out[k] = byte;
    }
}

MULTIVERSION
static void pack_codes(const uint8_t *codes, Py_ssize_t n, int bits, uint8_t *out) {
    switch (bits) { /* constant widths, so each case compiles to its own loop */
    case 1:
        pack_whole_bytes(codes, n, 1, out);
        return;
    case 2:
        pack_whole_bytes(codes, n, 2, out);
        return;
    case 4:
        pack_whole_bytes(codes, n, 4, out);
        return;
    case 8:
        memcpy(out, codes, (size_t)n);
        return;
    }
    for (Py_ssize_t i = 0; i < n; i += 8) {
        uint64_t word = 0;
        for (int j = 0; j < 8; j++)
            word |= (uint64_t)codes[i + j] << (j * bits);
        for (int k = 0; k < bits; k++)
            out[(i / 8) * bits + k] = (uint8_t)(word >> (8 * k));
    }
}

/* Pack any count of codes into exactly ceil(n * bits / 8) bytes (the last block padded with
 * zero codes, as bitpack.pack_bits does). */
static void pack_tail(const uint8_t *codes, Py_ssize_t n, int bits, uint8_t *out) {
    Py_ssize_t whole = n / 8 * 8;
    pack_codes(codes, whole, bits, out);
    if (whole < n) {
        uint8_t last[8] = {0}, packed[8];
        memcpy(last, codes + whole, (size_t)(n - whole));
        pack_codes(last, 8, bits, packed);
        memcpy(out + whole / 8 * bits, packed, (size_t)((n - whole) * bits + 7) / 8);
    }
}

INLINE void unpack_whole_bytes(const uint8_t *in, Py_ssize_t n, int bits, uint8_t *codes) {
    const int per = 8 / bits;
    const uint8_t mask = (uint8_t)((1u << bits) - 1);
    for (Py_ssize_t k = 0; k < n / per; k++)
        for (int j = 0; j < per; j++)
            codes[k * per + j] = (uint8_t)(in[k] >> (j * bits)) & mask;
}

/* Inverse of pack_codes: n (a multiple of 8) codes from n * bits / 8 bytes. */
MULTIVERSION
static void unpack_codes(const uint8_t *in, Py_ssize_t n, int bits, uint8_t *codes) {
    switch (bits) {
    case 1:
        unpack_whole_bytes(in, n, 1, codes);
        return;
    case 2:
        unpack_whole_bytes(in, n, 2, codes);
        return;
    case 4:
        unpack_whole_bytes(in, n, 4, codes);
        return;
    case 8:
        memcpy(codes, in, (size_t)n);
        return;
    }
    const uint64_t mask = (1u << bits) - 1;
    for (Py_ssize_t i = 0; i < n; i += 8) {
        uint64_t word = 0;
        for (int k = 0; k < bits; k++)
            word |= (uint64_t)in[(i / 8) * bits + k] << (8 * k);
        for (int j = 0; j < 8; j++)
            codes[i + j] = (uint8_t)((word >> (j * bits)) & mask);
    }
}

/* ---------------------------------------------------------------------------------------- */
/* Pack: one block of raw inputs to packed codes                                             */

/* Center codes [first, first + m) on their groups' zero-points into buf: one run per group
 * (or part of one at the chunk's ends), each a loop that vectorizes. */
INLINE void center_chunk(const uint8_t *codes, Py_ssize_t first, Py_ssize_t m, Py_ssize_t width,
                         const uint8_t *zeros, uint8_t mask, uint8_t *buf) {
    Py_ssize_t j = 0;
    while (j < m) {
        Py_ssize_t group = (first + j) / width;
        Py_ssize_t end = (group + 1) * width - first;
        end = end < m ? end : m;
        const uint8_t zero = zeros[group];
        for (Py_ssize_t k = j; k < end; k++)
            buf[k] = (uint8_t)(codes[first + k] - zero) & mask;
        j = end;
    }
}

/* Pack n codes of `code_bits` bits at `bits` each as entropy.center stores them for codec
 * zstd-c: each one centered on its group's zero-point, (code - zero) mod 2^code_bits, through
 * a small buffer so `codes` keep their values. */
MULTIVERSION
static void pack_centered(const uint8_t *codes, Py_ssize_t n, Py_ssize_t width,
                          const uint8_t *zeros, int code_bits, int bits, uint8_t *out) {
    uint8_t buf[CHUNK]; /* CHUNK is a multiple of 8: each chunk starts on a byte */
    const uint8_t mask = (uint8_t)((1u << code_bits) - 1);
    for (Py_ssize_t i = 0; i < n; i += CHUNK) {
        Py_ssize_t m = n - i < CHUNK ? n - i : CHUNK;
        center_chunk(codes, i, m, width, zeros, mask, buf);
        pack_tail(buf, m, bits, out + i / 8 * bits);
    }
}

/* Range-search and quantize a block of raw inputs, writing bit-packed codes (`center`, the
 * codes' bits, or 0: as codec zstd-c stores them, see pack_centered). `lo`/`hi` are every group's range when
 * `ranged`, else filled here. Returns nonzero if a value is not finite. */
static uint32_t encode_block(const Source *in, Py_ssize_t n, Py_ssize_t width, float *lo,
                             float *hi, int ranged, Search *s, float *scratch,
                             uint8_t *codes, int bits, uint8_t *out, float *scales,
                             uint8_t *zeros, uint8_t *step_codes, int center) {
    Py_ssize_t groups = n / width;
    Py_ssize_t per = chunk_groups(width, groups);
    uint8_t *dest = bits == 8 && !center ? out : codes;
    for (Py_ssize_t k = 0; k < s->table_size; k++) {
        s->scale_of[k] = 1.0f / s->table[k];
        s->step_of[k] = 1.0f / s->scale_of[k];
    }
    uint32_t bad = 0;
    for (Py_ssize_t g = 0; g < groups; g += per) {
        Py_ssize_t count = per < groups - g ? per : groups - g;
        const float *x;
        bad |= widen_chunk(in, g * width, count * width, scratch, &x);
        if (!ranged)
            group_ranges(x, count, width, lo + g, hi + g);
        uint8_t *steps = s->table_size ? step_codes + g : NULL;
#if HAVE_AVX512
        if (use_avx512 && width % LANES == 0) {
            search_wide(x, count, width, lo + g, hi + g, s, dest + g * width, scales + g,
                        zeros + g, steps);
            continue;
        }
#endif
        search_generic(x, count, width, lo + g, hi + g, s, dest + g * width, scales + g,
                       zeros + g, steps);
    }
    if (center)
        pack_centered(codes, n, width, zeros, center, bits, out);
    else if (bits < 8)
        pack_tail(codes, n, bits, out);
    return bad;
}

/* ---------------------------------------------------------------------------------------- */
/* Merge: dequantization, task arithmetic, TIES, top-k histograms, the merged output          */

/* out[i] = (code - zero) / scale of elements [first, first + n) of a tensor whose groups of
 * `group` elements (0: one group) have `zeros` and `scales`; `codes` are those n elements'.
 * Where a group's run is long enough, its 2^bits values are divided once into a table (the
 * same division, so the same values); with AVX-512 and at most 16 levels the table is one
 * register and a lookup is a permutation. */
#if HAVE_AVX512
/* out[i] = table[codes[i]] for a 16-entry table, 16 at a time; returns how many were done. */
AVX512 static Py_ssize_t lookup16(const uint8_t *codes, Py_ssize_t n, const float *table,
                                  float *out) {
    const __m512 lut = _mm512_loadu_ps(table);
    Py_ssize_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(codes + i)));
        _mm512_storeu_ps(out + i, _mm512_permutexvar_ps(idx, lut));
    }
    return i;
}
#endif

INLINE void dequantize_run(const uint8_t *codes, Py_ssize_t n, float zero, float scale,
                           int levels, float *out, int wide) {
    if (n < 2 * (levels + 1)) {
        for (Py_ssize_t i = 0; i < n; i++)
            out[i] = ((float)codes[i] - zero) / scale;
        return;
    }
    float table[256];
    for (int c = 0; c <= levels; c++)
        table[c] = ((float)c - zero) / scale;
    Py_ssize_t i = 0;
#if HAVE_AVX512
    if (wide && levels < 16)
        i = lookup16(codes, n, table, out);
#endif
    for (; i < n; i++)
        out[i] = table[codes[i]];
}

INLINE void dequantize_body(const uint8_t *codes, Py_ssize_t first, Py_ssize_t n,
                            Py_ssize_t group, const uint8_t *zeros, const float *scales,
                            int levels, float *out, int wide) {
    Py_ssize_t i = 0;
    while (i < n) {
        Py_ssize_t g = group ? (first + i) / group : 0;
        Py_ssize_t end = group ? (g + 1) * group - first : n;
        end = end < n ? end : n;
        dequantize_run(codes + i, end - i, (float)zeros[g], scales[g], levels, out + i, wide);
        i = end;
    }
}

MULTIVERSION
static void dequantize_generic(const uint8_t *codes, Py_ssize_t first, Py_ssize_t n,
                               Py_ssize_t group, const uint8_t *zeros, const float *scales,
                               int levels, float *out) {
    dequantize_body(codes, first, n, group, zeros, scales, levels, out, 0);
}

#if HAVE_AVX512
AVX512 static void dequantize_wide(const uint8_t *codes, Py_ssize_t first, Py_ssize_t n,
                                   Py_ssize_t group, const uint8_t *zeros, const float *scales,
                                   int levels, float *out) {
    dequantize_body(codes, first, n, group, zeros, scales, levels, out, 1);
}
#endif

/* out = lam * sum_t w_t * rows[t], summed in task order (rows: `tasks` rows of n). */
MULTIVERSION
static void scaled_sum(const float *rows, Py_ssize_t tasks, Py_ssize_t n, const float *w,
                       float lam, float *out) {
    for (Py_ssize_t i = 0; i < n; i++)
        out[i] = rows[i] * w[0];
    for (Py_ssize_t t = 1; t < tasks; t++) {
        const float *row = rows + t * n;
        for (Py_ssize_t i = 0; i < n; i++)
            out[i] = out[i] + row[i] * w[t];
    }
    for (Py_ssize_t i = 0; i < n; i++)
        out[i] = lam * out[i];
}

INLINE float sign_of(float v) { return v > 0.0f ? 1.0f : (v < 0.0f ? -1.0f : 0.0f); }

#define TIES_CHUNK 256 /* elements at a time: per-element sums stay in L1 and loops vectorize */

/* TIES on a block (merge/methods/ties.py holds the reference): trim each task at its
 * threshold, elect the sign of the (weighted) sum, where it is 0 the model-wide majority,
 * and average the values that agree with it. `unit`: every weight is 1 (no products).
 * out = lam * merged; with out NULL, only the elected signs are counted (their sum is
 * returned, before the majority is applied). Sums run in task order, chunk by chunk. */
MULTIVERSION
static int64_t ties_block(const float *rows, Py_ssize_t tasks, Py_ssize_t n, const float *thr,
                          const float *w, int unit, float majority, float lam, float *out) {
    int64_t signs = 0;
    float total[TIES_CHUNK], elected[TIES_CHUNK], num[TIES_CHUNK], den[TIES_CHUNK];
    for (Py_ssize_t start = 0; start < n; start += TIES_CHUNK) {
        Py_ssize_t m = n - start < TIES_CHUNK ? n - start : TIES_CHUNK;
        for (Py_ssize_t t = 0; t < tasks; t++) {
            const float *row = rows + t * n + start;
            const float cut = thr[t], weight = w[t];
            for (Py_ssize_t i = 0; i < m; i++) {
                float kept = fabsf(row[i]) >= cut ? row[i] : 0.0f;
                float term = unit ? kept : weight * kept;
                total[i] = t ? total[i] + term : term;
            }
        }
        for (Py_ssize_t i = 0; i < m; i++)
            elected[i] = sign_of(total[i]);
        if (!out) {
            float sum = 0.0f; /* whole numbers below 2^24: exact */
            for (Py_ssize_t i = 0; i < m; i++)
                sum += elected[i];
            signs += (int64_t)sum;
            continue;
        }
        for (Py_ssize_t i = 0; i < m; i++)
            elected[i] = elected[i] == 0.0f ? majority : elected[i];
        for (Py_ssize_t t = 0; t < tasks; t++) {
            const float *row = rows + t * n + start;
            const float cut = thr[t], weight = w[t];
            for (Py_ssize_t i = 0; i < m; i++) { /* float selects only, so it vectorizes */
                float kept = fabsf(row[i]) >= cut ? row[i] : 0.0f;
                float one = sign_of(kept) == elected[i] ? 1.0f : 0.0f;
                one = kept != 0.0f ? one : 0.0f; /* agrees with the elected sign */
                float value = one != 0.0f ? kept : 0.0f;
                float a = unit ? value : weight * value, b = unit ? one : weight * one;
                num[i] = t ? num[i] + a : a;
                den[i] = t ? den[i] + b : b;
            }
        }
        for (Py_ssize_t i = 0; i < m; i++)
            total[i] = num[i] / (den[i] > 1e-30f ? den[i] : 1e-30f);
        for (Py_ssize_t i = 0; i < m; i++)
            out[start + i] = lam * (den[i] != 0.0f ? total[i] : 0.0f);
    }
    return signs;
}

/* Top-k histograms (merge/topk.py): counts of |x| by the high 16 bits of its pattern, or,
 * inside high bin `bin`, by the low 16 bits (few values fall in one bin: chunks with none are
 * passed over after one vectorized test). */
INLINE uint32_t magnitude_bits(const float *x, Py_ssize_t i) {
    uint32_t bits;
    memcpy(&bits, x + i, 4);
    return bits & 0x7fffffffu;
}

MULTIVERSION
static void histogram(const float *x, Py_ssize_t n, int64_t bin, int64_t *counts) {
    if (bin < 0) {
        for (Py_ssize_t i = 0; i < n; i++)
            counts[magnitude_bits(x, i) >> 16]++;
        return;
    }
    for (Py_ssize_t start = 0; start < n; start += 64) {
        Py_ssize_t end = n - start < 64 ? n : start + 64;
        uint32_t any = 0;
        for (Py_ssize_t i = start; i < end; i++)
            any |= (magnitude_bits(x, i) >> 16) == (uint32_t)bin;
        if (!any)
            continue;
        for (Py_ssize_t i = start; i < end; i++) {
            uint32_t bits = magnitude_bits(x, i);
            if ((bits >> 16) == (uint32_t)bin)
                counts[bits & 0xffffu]++;
        }
    }
}

/* The histogram above, of the dequantized values (code - zero) / scale of elements
 * [first, first + n) of a tensor quantized in groups (0: one group), from their codes: each
 * group's codes are counted by value, then each value's count is added once. */
INLINE void add_counts(const int32_t *per_code, int levels, float zero, float scale,
                       int64_t bin, int64_t *counts) {
    for (int c = 0; c <= levels; c++) {
        if (!per_code[c])
            continue;
        float v = ((float)c - zero) / scale;
        uint32_t bits = magnitude_bits(&v, 0);
        if (bin < 0)
            counts[bits >> 16] += per_code[c];
        else if ((int64_t)(bits >> 16) == bin)
            counts[bits & 0xffffu] += per_code[c];
    }
}

#if HAVE_AVX512
/* per_code[c] = how many of the n codes are c, for c < 16: one compare and one popcount per
 * 64 codes and value. */
__attribute__((target("avx512f,avx512bw,popcnt"))) static void
count_codes16(const uint8_t *codes, Py_ssize_t n, int levels, int32_t *per_code) {
    for (int c = 0; c <= levels; c++)
        per_code[c] = 0;
    for (Py_ssize_t i = 0; i < n; i += 64) {
        Py_ssize_t left = n - i;
        __mmask64 valid = left >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << left) - 1);
        __m512i chunk = _mm512_maskz_loadu_epi8(valid, codes + i);
        for (int c = 0; c <= levels; c++) {
            __mmask64 hit = _mm512_mask_cmpeq_epi8_mask(valid, chunk, _mm512_set1_epi8((char)c));
            per_code[c] += (int32_t)__builtin_popcountll(hit);
        }
    }
}
#endif

INLINE void code_histogram_body(const uint8_t *codes, Py_ssize_t first, Py_ssize_t n,
                                Py_ssize_t group, const uint8_t *zeros, const float *scales,
                                int levels, int64_t bin, int64_t *counts, int wide) {
    int32_t lanes[4][MAX_HISTOGRAM_LEVELS + 1] = {{0}}, per_code[MAX_HISTOGRAM_LEVELS + 1];
    Py_ssize_t i = 0;
    while (i < n) {
        Py_ssize_t g = group ? (first + i) / group : 0;
        Py_ssize_t end = group ? (g + 1) * group - first : n;
        end = end < n ? end : n;
#if HAVE_AVX512
        if (wide && levels < 16) {
            count_codes16(codes + i, end - i, levels, per_code);
            i = end;
            add_counts(per_code, levels, (float)zeros[g], scales[g], bin, counts);
            continue;
        }
#endif
        for (; i + 4 <= end; i += 4) /* four tables: repeated codes do not wait on each other */
            for (int j = 0; j < 4; j++)
                lanes[j][codes[i + j]]++;
        for (; i < end; i++)
            lanes[0][codes[i]]++;
        for (int c = 0; c <= levels; c++) {
            per_code[c] = (lanes[0][c] + lanes[1][c]) + (lanes[2][c] + lanes[3][c]);
            lanes[0][c] = lanes[1][c] = lanes[2][c] = lanes[3][c] = 0;
        }
        add_counts(per_code, levels, (float)zeros[g], scales[g], bin, counts);
    }
}

MULTIVERSION
static void code_histogram_generic(const uint8_t *codes, Py_ssize_t first, Py_ssize_t n,
                                   Py_ssize_t group, const uint8_t *zeros, const float *scales,
                                   int levels, int64_t bin, int64_t *counts) {
    code_histogram_body(codes, first, n, group, zeros, scales, levels, bin, counts, 0);
}

#if HAVE_AVX512
AVX512 static void code_histogram_wide(const uint8_t *codes, Py_ssize_t first, Py_ssize_t n,
                                       Py_ssize_t group, const uint8_t *zeros,
                                       const float *scales, int levels, int64_t bin,
                                       int64_t *counts) {
    code_histogram_body(codes, first, n, group, zeros, scales, levels, bin, counts, 1);
}
#endif

/* float32 to bfloat16 or float16, round to nearest even (torch's conversions; NaN to the
 * canonical quiet NaN). */
INLINE uint16_t to_bf16(float v) {
    uint32_t bits;
    memcpy(&bits, &v, 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u)
        return 0x7fc0;
    return (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

INLINE uint16_t to_f16(float v) { /* the FP16 library's fp16_ieee_from_fp32_value */
    const float scale_to_inf = 0x1.0p+112f, scale_to_zero = 0x1.0p-110f;
    uint32_t w;
    memcpy(&w, &v, 4);
    float base = (fabsf(v) * scale_to_inf) * scale_to_zero;
    const uint32_t shl1_w = w + w, sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xff000000u;
    if (bias < 0x71000000u)
        bias = 0x71000000u;
    uint32_t b = (bias >> 1) + 0x07800000u;
    float add;
    memcpy(&add, &b, 4);
    base = add + base;
    uint32_t bits;
    memcpy(&bits, &base, 4);
    const uint32_t exp_bits = (bits >> 13) & 0x00007c00u, mantissa_bits = bits & 0x00000fffu;
    const uint32_t nonsign = exp_bits + mantissa_bits;
    return (uint16_t)((sign >> 16) | (shl1_w > 0xff000000u ? 0x7e00u : nonsign));
}

/* out = dtype(float32(base) + delta); returns nonzero if a value of base is not finite. */
INLINE uint32_t finish_values(const void *base, int kind, const float *delta, void *out,
                              int okind, Py_ssize_t n) {
    uint32_t bad = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        float b = load_value(base, kind, i);
        bad |= not_finite(b);
        float v = b + delta[i];
        if (okind == KIND_F32)
            ((float *)out)[i] = v;
        else if (okind == KIND_BF16)
            ((uint16_t *)out)[i] = to_bf16(v);
        else
            ((uint16_t *)out)[i] = to_f16(v);
    }
    return bad;
}

#define FINISH_CASE(K, O)                                                                      \
    case (K) * 4 + (O):                                                                        \
        return finish_values(base, K, delta, out, O, n);

MULTIVERSION
static uint32_t finish_block(const void *base, int kind, const float *delta, void *out,
                             int okind, Py_ssize_t n) {
    switch (kind * 4 + okind) {
        FINISH_CASE(KIND_F32, KIND_F32)
        FINISH_CASE(KIND_F32, KIND_BF16)
        FINISH_CASE(KIND_F32, KIND_F16)
        FINISH_CASE(KIND_BF16, KIND_F32)
        FINISH_CASE(KIND_BF16, KIND_BF16)
        FINISH_CASE(KIND_BF16, KIND_F16)
        FINISH_CASE(KIND_F16, KIND_F32)
        FINISH_CASE(KIND_F16, KIND_BF16)
        FINISH_CASE(KIND_F16, KIND_F16)
    }
    return 1;
}

#define CODED_CHUNK 2048 /* elements per task at a time: the tasks' values stay in L1/L2 */

/* One task's coded values: codes of the whole tensor, with its groups' zeros and scales. */
typedef struct {
    const uint8_t *codes;
    const uint8_t *zeros;
    const float *scales;
    Py_ssize_t group;
    int levels;
} CodedTask;

enum { OP_SUM = 0, OP_TIES = 1, OP_SIGNS = 2 };

/* What to do with the tasks' values: scaled_sum (OP_SUM), ties_block's merge (OP_TIES) or
 * its sign count (OP_SIGNS). */
typedef struct {
    int op;
    const float *weights;
    float lam;
    const float *thresholds;
    int unit;
    float majority;
} CodedOp;

/* Elements [first, first + n) of T coded task vectors, a chunk at a time: each task's values
 * dequantized into `values` (T rows of the chunk: `dequantize`'s values), then the op on the
 * chunk (the same per-element operations as on a block of rows), then for merges
 * out = dtype(float32(base) + merged). Returns the sign count (OP_SIGNS); `bad` is set if a
 * value of base is not finite. */
INLINE int64_t coded_body(const CodedTask *tasks, Py_ssize_t count, const CodedOp *op,
                          Py_ssize_t first, Py_ssize_t n, const void *base, int kind, void *out,
                          int okind, float *values, uint32_t *bad, int wide) {
    float merged[CODED_CHUNK];
    int64_t signs = 0;
    for (Py_ssize_t start = 0; start < n; start += CODED_CHUNK) {
        Py_ssize_t m = n - start < CODED_CHUNK ? n - start : CODED_CHUNK;
        for (Py_ssize_t t = 0; t < count; t++) {
            const CodedTask *task = tasks + t;
            dequantize_body(task->codes + first + start, first + start, m, task->group,
                            task->zeros, task->scales, task->levels, values + t * m, wide);
        }
        if (op->op == OP_SIGNS) {
            signs += ties_block(values, count, m, op->thresholds, op->weights, op->unit, 0.0f,
                                1.0f, NULL);
            continue;
        }
        if (op->op == OP_SUM)
            scaled_sum(values, count, m, op->weights, op->lam, merged);
        else
            ties_block(values, count, m, op->thresholds, op->weights, op->unit, op->majority,
                       op->lam, merged);
        const char *b = (const char *)base + start * KIND_SIZE[kind];
        char *o = (char *)out + start * KIND_SIZE[okind];
        *bad |= finish_block(b, kind, merged, o, okind, m);
    }
    return signs;
}

MULTIVERSION
static int64_t coded_generic(const CodedTask *tasks, Py_ssize_t count, const CodedOp *op,
                             Py_ssize_t first, Py_ssize_t n, const void *base, int kind,
                             void *out, int okind, float *values, uint32_t *bad) {
    return coded_body(tasks, count, op, first, n, base, kind, out, okind, values, bad, 0);
}

#if HAVE_AVX512
AVX512 static int64_t coded_wide(const CodedTask *tasks, Py_ssize_t count, const CodedOp *op,
                                 Py_ssize_t first, Py_ssize_t n, const void *base, int kind,
                                 void *out, int okind, float *values, uint32_t *bad) {
    return coded_body(tasks, count, op, first, n, base, kind, out, okind, values, bad, 1);
}
#endif

/* ---------------------------------------------------------------------------------------- */
/* Python bindings                                                                           */

static int check_size(const Py_buffer *buf, Py_ssize_t items, Py_ssize_t itemsize,
                      const char *name) {
    if (buf->len != items * itemsize) {
        PyErr_Format(PyExc_ValueError, "%s: %zd bytes, expected %zd", name, buf->len,
                     items * itemsize);
        return 0;
    }
    return 1;
}

static int check_at_least(const Py_buffer *buf, Py_ssize_t items, Py_ssize_t itemsize,
                          const char *name) {
    if (buf->len < items * itemsize) {
        PyErr_Format(PyExc_ValueError, "%s: %zd bytes, need at least %zd", name, buf->len,
                     items * itemsize);
        return 0;
    }
    return 1;
}

static int check_indices(const int32_t *values, Py_ssize_t n, int lo, int hi, const char *name) {
    for (Py_ssize_t i = 0; i < n; i++) {
        if (values[i] < lo || values[i] > hi) {
            PyErr_Format(PyExc_ValueError, "%s[%zd] = %d is outside [%d, %d]", name, i,
                         (int)values[i], lo, hi);
            return 0;
        }
    }
    return 1;
}

/* A source's element count, after checking its kinds and sizes. */
static Py_ssize_t source_of(const Py_buffer *src, int kind, const Py_buffer *minus, int mkind,
                            Source *in) {
    if (kind < KIND_F32 || kind > KIND_F16 || mkind < KIND_F32 || mkind > KIND_NONE) {
        PyErr_SetString(PyExc_ValueError, "bad value kind");
        return -1;
    }
    if (src->len % KIND_SIZE[kind]) {
        PyErr_SetString(PyExc_ValueError, "src: not a whole number of values");
        return -1;
    }
    Py_ssize_t n = src->len / KIND_SIZE[kind];
    if (mkind != KIND_NONE && !check_size(minus, n, KIND_SIZE[mkind], "minus"))
        return -1;
    in->src = src->buf;
    in->kind = kind;
    in->minus = minus->buf;
    in->mkind = mkind;
    return n;
}

static int needs_scratch(const Source *in) {
    return !(in->kind == KIND_F32 && in->mkind == KIND_NONE);
}

PyDoc_STRVAR(widen_doc,
             "widen(src, kind, minus, mkind, out) -> bool\n\n"
             "out = float32(src) - float32(minus) (no subtraction when mkind is 3); kinds: 0 "
             "float32, 1 bfloat16, 2 float16. True when every value is finite.");

static PyObject *py_widen(PyObject *self, PyObject *args) {
    Py_buffer src, minus, out;
    int kind, mkind;
    if (!PyArg_ParseTuple(args, "y*iy*iw*:widen", &src, &kind, &minus, &mkind, &out))
        return NULL;
    PyObject *result = NULL;
    Source in;
    Py_ssize_t n = source_of(&src, kind, &minus, mkind, &in);
    if (n < 0 || !check_size(&out, n, 4, "out"))
        goto done;
    uint32_t bad;
    Py_BEGIN_ALLOW_THREADS
    bad = widen_block(in.src, kind, in.minus, mkind, out.buf, n);
    Py_END_ALLOW_THREADS
    result = PyBool_FromLong(!bad);
done:
    PyBuffer_Release(&src);
    PyBuffer_Release(&minus);
    PyBuffer_Release(&out);
    return result;
}

PyDoc_STRVAR(ranges_doc,
             "ranges(src, kind, minus, mkind, width, lo, hi, scratch) -> bool\n\n"
             "Each group of `width` values' min and max, widened to 0; values as in widen(). "
             "`scratch`: float32 work space (empty for plain float32). True when finite.");

static PyObject *py_ranges(PyObject *self, PyObject *args) {
    Py_buffer src, minus, lo, hi, scratch;
    int kind, mkind;
    Py_ssize_t width;
    if (!PyArg_ParseTuple(args, "y*iy*inw*w*w*:ranges", &src, &kind, &minus, &mkind, &width,
                          &lo, &hi, &scratch))
        return NULL;
    PyObject *result = NULL;
    Source in;
    Py_ssize_t n = source_of(&src, kind, &minus, mkind, &in);
    if (n < 0)
        goto done;
    if (width <= 0 || n % width) {
        PyErr_SetString(PyExc_ValueError, "ranges: width must divide the values");
        goto done;
    }
    Py_ssize_t groups = n / width;
    if (!check_size(&lo, groups, 4, "lo") || !check_size(&hi, groups, 4, "hi") ||
        (needs_scratch(&in) &&
         !check_at_least(&scratch, chunk_groups(width, groups) * width, 4, "scratch")))
        goto done;
    uint32_t bad;
    Py_BEGIN_ALLOW_THREADS
    bad = source_ranges(&in, groups, width, scratch.buf, lo.buf, hi.buf);
    Py_END_ALLOW_THREADS
    result = PyBool_FromLong(!bad);
done:
    PyBuffer_Release(&src);
    PyBuffer_Release(&minus);
    PyBuffer_Release(&lo);
    PyBuffer_Release(&hi);
    PyBuffer_Release(&scratch);
    return result;
}

PyDoc_STRVAR(encode_doc,
             "encode(src, kind, minus, mkind, width, lo, hi, ranged, plan, scratch, codes, bits, "
             "out, scales, zeros, step_codes, center) -> bool\n\n"
             "Range-search and quantize whole groups of values (as in widen()) and bit-pack "
             "their codes into `out` (bits 8 without `center`: `out` holds the codes, `codes` "
             "is empty; `center` > 0, the codes' bits: packed as codec zstd-c stores them, "
             "`codes` as they are). `plan` "
             "is (levels, factors, shifts, table, coarse, fine, margin, flat_scale, max_scale); "
             "see range_search.py. True when every value is finite.");

static PyObject *py_encode(PyObject *self, PyObject *args) {
    Py_buffer src, minus, lo, hi, factors, shifts, table, coarse, fine, scratch, codes, out,
        scales, zeros, steps;
    int kind, mkind, ranged, levels, bits, center;
    Py_ssize_t width;
    float margin, flat_scale, max_scale;
    if (!PyArg_ParseTuple(args, "y*iy*inw*w*p(iy*y*y*y*y*fff)w*w*iw*w*w*w*i:encode", &src, &kind,
                          &minus, &mkind, &width, &lo, &hi, &ranged, &levels, &factors, &shifts,
                          &table, &coarse, &fine, &margin, &flat_scale, &max_scale, &scratch,
                          &codes, &bits, &out, &scales, &zeros, &steps, &center))
        return NULL;
    PyObject *result = NULL;
    Source in;
    Py_ssize_t n = source_of(&src, kind, &minus, mkind, &in);
    Py_ssize_t count = table.len ? shifts.len / 4 : factors.len / 4;
    float scale_of[MAX_TABLE], step_of[MAX_TABLE];
    Search s = {
        .levels = (float)levels,
        .count = (int)count,
        .factors = factors.buf,
        .shifts = shifts.buf,
        .table = table.buf,
        .table_size = table.len / 4,
        .scale_of = scale_of,
        .step_of = step_of,
        .coarse = coarse.buf,
        .n_coarse = coarse.len / 4,
        .fine = fine.buf,
        .n_fine = fine.len / 4,
        .margin = margin,
        .flat_scale = flat_scale,
        .max_scale = max_scale,
    };
    if (n < 0)
        goto done;
    if (width <= 0 || n % width || levels < 1 || levels > 255 || count < 1 ||
        count > MAX_CANDIDATES || s.table_size > MAX_TABLE || s.n_coarse < 1 || s.n_coarse > MAX_CANDIDATES ||
        s.n_fine > MAX_CANDIDATES || bits < 1 || bits > 8 || levels >= (1 << bits) || center < 0 || center > bits) {
        PyErr_SetString(PyExc_ValueError, "encode: bad width, levels, bits or candidate count");
        goto done;
    }
    Py_ssize_t groups = n / width;
    if (!check_size(&lo, groups, 4, "lo") || !check_size(&hi, groups, 4, "hi") ||
        !check_size(&scales, groups, 4, "scales") || !check_size(&zeros, groups, 1, "zeros") ||
        !check_size(&steps, table.len ? groups : 0, 1, "step_codes") ||
        !check_size(&out, (n * bits + 7) / 8, 1, "out") ||
        !check_size(&codes, bits == 8 && !center ? 0 : n, 1, "codes") ||
        (needs_scratch(&in) &&
         !check_at_least(&scratch, chunk_groups(width, groups) * width, 4, "scratch")) ||
        !check_indices(coarse.buf, s.n_coarse, 0, s.count - 1, "coarse") ||
        !check_indices(fine.buf, s.n_fine, -s.count, s.count, "fine") ||
        (s.table_size &&
         !check_indices(shifts.buf, s.count, -(int)s.table_size, (int)s.table_size, "shifts")))
        goto done;
    uint32_t bad;
    Py_BEGIN_ALLOW_THREADS
    bad = encode_block(&in, n, width, lo.buf, hi.buf, ranged, &s, scratch.buf, codes.buf, bits,
                       out.buf, scales.buf, zeros.buf, steps.buf, center);
    Py_END_ALLOW_THREADS
    result = PyBool_FromLong(!bad);
done:
    PyBuffer_Release(&src);
    PyBuffer_Release(&minus);
    PyBuffer_Release(&lo);
    PyBuffer_Release(&hi);
    PyBuffer_Release(&factors);
    PyBuffer_Release(&shifts);
    PyBuffer_Release(&table);
    PyBuffer_Release(&coarse);
    PyBuffer_Release(&fine);
    PyBuffer_Release(&scratch);
    PyBuffer_Release(&codes);
    PyBuffer_Release(&out);
    PyBuffer_Release(&scales);
    PyBuffer_Release(&zeros);
    PyBuffer_Release(&steps);
    return result;
}

PyDoc_STRVAR(pack_doc, "pack(codes, bits, out)\n\n"
                       "Bit-pack uint8 `codes` (a multiple of 8, each < 2**bits) into `out`.");

static PyObject *py_pack(PyObject *self, PyObject *args) {
    Py_buffer codes, out;
    int bits;
    if (!PyArg_ParseTuple(args, "y*iw*:pack", &codes, &bits, &out))
        return NULL;
    PyObject *result = NULL;
    if (bits < 1 || bits > 8 || codes.len % 8) {
        PyErr_SetString(PyExc_ValueError, "pack: bits must be 1-8 and codes a multiple of 8");
        goto done;
    }
    if (!check_size(&out, codes.len / 8 * bits, 1, "out"))
        goto done;
    Py_BEGIN_ALLOW_THREADS
    pack_codes(codes.buf, codes.len, bits, out.buf);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&codes);
    PyBuffer_Release(&out);
    return result;
}

/* codes[i] = (codes[i] + zeros[i / width]) mod 2^bits: codec zstd-c's stored codes back. */
MULTIVERSION
static void uncenter_codes(uint8_t *codes, Py_ssize_t n, Py_ssize_t width, const uint8_t *zeros,
                           int bits) {
    const uint8_t mask = (uint8_t)((1u << bits) - 1);
    for (Py_ssize_t g = 0; g < n / width; g++) {
        const uint8_t zero = zeros[g];
        uint8_t *c = codes + g * width;
        for (Py_ssize_t i = 0; i < width; i++)
            c[i] = (uint8_t)(c[i] + zero) & mask;
    }
}

PyDoc_STRVAR(uncenter_doc, "uncenter(codes, width, zeros, bits)\n\n"
                           "In place, codes[i] = (codes[i] + zeros[i // width]) mod 2**bits "
                           "(entropy.center undone), for groups of `width` codes that tile them.");

static PyObject *py_uncenter(PyObject *self, PyObject *args) {
    Py_buffer codes, zeros;
    Py_ssize_t width;
    int bits;
    if (!PyArg_ParseTuple(args, "w*ny*i:uncenter", &codes, &width, &zeros, &bits))
        return NULL;
    PyObject *result = NULL;
    if (width <= 0 || codes.len % width || bits < 1 || bits > 8) {
        PyErr_SetString(PyExc_ValueError, "uncenter: groups must tile the codes, bits 1-8");
        goto done;
    }
    if (!check_size(&zeros, codes.len / width, 1, "zeros"))
        goto done;
    Py_BEGIN_ALLOW_THREADS
    uncenter_codes(codes.buf, codes.len, width, zeros.buf, bits);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&codes);
    PyBuffer_Release(&zeros);
    return result;
}

PyDoc_STRVAR(unpack_doc, "unpack(stream, bits, codes)\n\n"
                         "Inverse of pack: len(codes) (a multiple of 8) codes from `stream`.");

static PyObject *py_unpack(PyObject *self, PyObject *args) {
    Py_buffer stream, codes;
    int bits;
    if (!PyArg_ParseTuple(args, "y*iw*:unpack", &stream, &bits, &codes))
        return NULL;
    PyObject *result = NULL;
    if (bits < 1 || bits > 8 || codes.len % 8) {
        PyErr_SetString(PyExc_ValueError, "unpack: bits must be 1-8 and codes a multiple of 8");
        goto done;
    }
    if (!check_size(&stream, codes.len / 8 * bits, 1, "stream"))
        goto done;
    Py_BEGIN_ALLOW_THREADS
    unpack_codes(stream.buf, codes.len, bits, codes.buf);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&stream);
    PyBuffer_Release(&codes);
    return result;
}

MULTIVERSION
static uint8_t max_code(const uint8_t *codes, Py_ssize_t n) {
    uint8_t top = 0;
    for (Py_ssize_t i = 0; i < n; i++)
        top = codes[i] > top ? codes[i] : top;
    return top;
}

PyDoc_STRVAR(dequantize_doc,
             "dequantize(codes, first, group, zeros, scales, levels, out)\n\n"
             "out = (codes - zero) / scale for elements [first, first + len(codes)) of a "
             "tensor quantized in groups of `group` (0: one group); codes <= levels.");

static PyObject *py_dequantize(PyObject *self, PyObject *args) {
    Py_buffer codes, zeros, scales, out;
    Py_ssize_t first, group;
    int levels;
    if (!PyArg_ParseTuple(args, "y*nny*y*iw*:dequantize", &codes, &first, &group, &zeros,
                          &scales, &levels, &out))
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t n = codes.len, groups = zeros.len;
    Py_ssize_t last = n ? (group ? (first + n - 1) / group : 0) : -1;
    if (first < 0 || group < 0 || levels < 1 || levels > 255 || last >= groups) {
        PyErr_SetString(PyExc_ValueError, "dequantize: bad offset, group, levels or zeros");
        goto done;
    }
    if (!check_size(&scales, groups, 4, "scales") || !check_size(&out, n, 4, "out"))
        goto done;
    if (max_code(codes.buf, n) > levels) {
        PyErr_SetString(PyExc_ValueError, "dequantize: a code is above levels");
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
#if HAVE_AVX512
    if (use_avx512)
        dequantize_wide(codes.buf, first, n, group, zeros.buf, scales.buf, levels, out.buf);
    else
#endif
        dequantize_generic(codes.buf, first, n, group, zeros.buf, scales.buf, levels, out.buf);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&codes);
    PyBuffer_Release(&zeros);
    PyBuffer_Release(&scales);
    PyBuffer_Release(&out);
    return result;
}

/* A block of task rows: `tasks` rows of n float32 values, n from the buffer's size. */
static Py_ssize_t rows_of(const Py_buffer *rows, const Py_buffer *per_task, Py_ssize_t tasks) {
    if (tasks < 1 || rows->len % (4 * tasks) || !check_size(per_task, tasks, 4, "per task")) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "rows: not a whole number of tasks");
        return -1;
    }
    return rows->len / (4 * tasks);
}

PyDoc_STRVAR(scaled_sum_doc, "scaled_sum(rows, tasks, weights, lam, out)\n\n"
                             "out = lam * sum_t weights[t] * rows[t], in task order.");

static PyObject *py_scaled_sum(PyObject *self, PyObject *args) {
    Py_buffer rows, weights, out;
    Py_ssize_t tasks;
    float lam;
    if (!PyArg_ParseTuple(args, "y*ny*fw*:scaled_sum", &rows, &tasks, &weights, &lam, &out))
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t n = rows_of(&rows, &weights, tasks);
    if (n < 0 || !check_size(&out, n, 4, "out"))
        goto done;
    Py_BEGIN_ALLOW_THREADS
    scaled_sum(rows.buf, tasks, n, weights.buf, lam, out.buf);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&rows);
    PyBuffer_Release(&weights);
    PyBuffer_Release(&out);
    return result;
}

PyDoc_STRVAR(ties_doc,
             "ties(rows, tasks, thresholds, weights, unit, majority, lam, out) -> int\n\n"
             "TIES' trim, elect and disjoint mean of a block, times lam, into `out`; with "
             "`out` empty, the sum of the elected signs (before the majority) instead.");

static PyObject *py_ties(PyObject *self, PyObject *args) {
    Py_buffer rows, thr, weights, out;
    Py_ssize_t tasks;
    int unit;
    float majority, lam;
    if (!PyArg_ParseTuple(args, "y*ny*y*pffw*:ties", &rows, &tasks, &thr, &weights, &unit,
                          &majority, &lam, &out))
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t n = rows_of(&rows, &thr, tasks);
    if (n < 0 || !check_size(&weights, tasks, 4, "weights") ||
        (out.len && !check_size(&out, n, 4, "out")))
        goto done;
    int64_t signs;
    Py_BEGIN_ALLOW_THREADS
    signs = ties_block(rows.buf, tasks, n, thr.buf, weights.buf, unit, majority, lam,
                       out.len ? out.buf : NULL);
    Py_END_ALLOW_THREADS
    result = PyLong_FromLongLong(signs);
done:
    PyBuffer_Release(&rows);
    PyBuffer_Release(&thr);
    PyBuffer_Release(&weights);
    PyBuffer_Release(&out);
    return result;
}

PyDoc_STRVAR(histogram_doc,
             "histogram(x, bin, counts)\n\n"
             "Add float32 |x| to 65536 int64 `counts` by the high 16 bits of its bit pattern "
             "(bin < 0), or, inside high bin `bin`, by the low 16 bits.");

static PyObject *py_histogram(PyObject *self, PyObject *args) {
    Py_buffer x, counts;
    long long bin;
    if (!PyArg_ParseTuple(args, "y*Lw*:histogram", &x, &bin, &counts))
        return NULL;
    PyObject *result = NULL;
    if (x.len % 4 || bin > 0xffff || !check_size(&counts, 1 << 16, 8, "counts")) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "histogram: bad values or bin");
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    histogram(x.buf, x.len / 4, bin, counts.buf);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&x);
    PyBuffer_Release(&counts);
    return result;
}

PyDoc_STRVAR(code_histogram_doc,
             "code_histogram(codes, first, group, zeros, scales, levels, bin, counts)\n\n"
             "histogram() of the values dequantize() would give (levels < 32).");

static PyObject *py_code_histogram(PyObject *self, PyObject *args) {
    Py_buffer codes, zeros, scales, counts;
    Py_ssize_t first, group;
    int levels;
    long long bin;
    if (!PyArg_ParseTuple(args, "y*nny*y*iLw*:code_histogram", &codes, &first, &group, &zeros,
                          &scales, &levels, &bin, &counts))
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t n = codes.len, groups = zeros.len;
    Py_ssize_t last = n ? (group ? (first + n - 1) / group : 0) : -1;
    if (first < 0 || group < 0 || levels < 1 || levels > MAX_HISTOGRAM_LEVELS ||
        last >= groups || bin > 0xffff) {
        PyErr_SetString(PyExc_ValueError, "code_histogram: bad offset, group, levels or bin");
        goto done;
    }
    if (!check_size(&scales, groups, 4, "scales") || !check_size(&counts, 1 << 16, 8, "counts"))
        goto done;
    if (max_code(codes.buf, n) > levels) {
        PyErr_SetString(PyExc_ValueError, "code_histogram: a code is above levels");
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
#if HAVE_AVX512
    if (use_avx512)
        code_histogram_wide(codes.buf, first, n, group, zeros.buf, scales.buf, levels, bin,
                            counts.buf);
    else
#endif
        code_histogram_generic(codes.buf, first, n, group, zeros.buf, scales.buf, levels, bin,
                               counts.buf);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&codes);
    PyBuffer_Release(&zeros);
    PyBuffer_Release(&scales);
    PyBuffer_Release(&counts);
    return result;
}

PyDoc_STRVAR(coded_doc,
             "coded(codes, zeros, scales, groups, levels, first, n, op, weights, lam, "
             "thresholds, unit, majority, base, kind, out, okind) -> int\n\n"
             "Elements [first, first + n) of T coded task vectors (sequences of their whole "
             "codes, zeros, scales, group sizes and levels; values as dequantize() gives them): "
             "op 0, out = okind(float32(base) + scaled_sum(values, weights, lam)); op 1, the "
             "same with ties(values, thresholds, weights, unit, majority, lam); op 2, the sum of "
             "ties' elected signs (base and out empty). Returns that sum, or for ops 0 and 1 "
             "1 when every value of base is finite, else 0.");

static PyObject *py_coded(PyObject *self, PyObject *args) {
    PyObject *codes_seq, *zeros_seq, *scales_seq, *groups_seq, *levels_seq;
    Py_buffer weights, thresholds, base, out;
    float lam, majority;
    Py_ssize_t first, n;
    int op, unit, kind, okind;
    if (!PyArg_ParseTuple(args, "OOOOOnniy*fy*pfy*iw*i:coded", &codes_seq, &zeros_seq,
                          &scales_seq, &groups_seq, &levels_seq, &first, &n, &op, &weights,
                          &lam, &thresholds, &unit, &majority, &base, &kind, &out, &okind))
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t count = weights.len / 4;
    Py_buffer *views = PyMem_Calloc((size_t)(3 * (count > 0 ? count : 1)), sizeof(Py_buffer));
    CodedTask *tasks = PyMem_Calloc((size_t)(count > 0 ? count : 1), sizeof(CodedTask));
    float *values = PyMem_Malloc(sizeof(float) * (size_t)(count > 0 ? count : 1) * CODED_CHUNK);
    if (!views || !tasks || !values) {
        PyErr_NoMemory();
        goto done;
    }
    if (op < OP_SUM || op > OP_SIGNS || count < 1 || weights.len % 4 || first < 0 || n < 0 ||
        (op != OP_SUM && !check_size(&thresholds, count, 4, "thresholds"))) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "coded: bad op, weights, offset or count");
        goto done;
    }
    if (op != OP_SIGNS &&
        (kind < KIND_F32 || kind > KIND_F16 || okind < KIND_F32 || okind > KIND_F16 ||
         !check_size(&base, n, KIND_SIZE[kind], "base") ||
         !check_size(&out, n, KIND_SIZE[okind], "out"))) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "coded: bad kinds");
        goto done;
    }
    PyObject *seqs[5] = {codes_seq, zeros_seq, scales_seq, groups_seq, levels_seq};
    for (int k = 0; k < 5; k++) {
        if (!PySequence_Check(seqs[k]) || PySequence_Size(seqs[k]) != count) {
            PyErr_SetString(PyExc_ValueError, "coded: one codes, zeros, scales, group size and "
                                              "levels per weight");
            goto done;
        }
    }
    for (Py_ssize_t t = 0; t < count; t++) {
        PyObject *items[3] = {PySequence_GetItem(codes_seq, t), PySequence_GetItem(zeros_seq, t),
                              PySequence_GetItem(scales_seq, t)};
        PyObject *g = PySequence_GetItem(groups_seq, t), *l = PySequence_GetItem(levels_seq, t);
        int ok = items[0] && items[1] && items[2] && g && l;
        for (int k = 0; ok && k < 3; k++)
            ok = PyObject_GetBuffer(items[k], &views[3 * t + k], PyBUF_SIMPLE) == 0;
        Py_ssize_t group = ok ? PyLong_AsSsize_t(g) : -1;
        long levels = ok ? PyLong_AsLong(l) : -1;
        for (int k = 0; k < 3; k++)
            Py_XDECREF(items[k]);
        Py_XDECREF(g);
        Py_XDECREF(l);
        if (!ok || PyErr_Occurred())
            goto done;
        Py_buffer *c = &views[3 * t], *z = &views[3 * t + 1], *sc = &views[3 * t + 2];
        Py_ssize_t groups = z->len;
        Py_ssize_t last = n ? (group ? (first + n - 1) / group : 0) : -1;
        if (group < 0 || levels < 1 || levels > 255 || c->len < first + n || last >= groups ||
            sc->len != 4 * groups) {
            PyErr_SetString(PyExc_ValueError, "coded: bad codes, zeros, scales or levels");
            goto done;
        }
        if (max_code((const uint8_t *)c->buf + first, n) > levels) {
            PyErr_SetString(PyExc_ValueError, "coded: a code is above levels");
            goto done;
        }
        tasks[t] = (CodedTask){c->buf, z->buf, sc->buf, group, (int)levels};
    }
    CodedOp spec = {op, weights.buf, lam, thresholds.buf, unit, majority};
    uint32_t bad = 0;
    int64_t signs;
    Py_BEGIN_ALLOW_THREADS
#if HAVE_AVX512
    if (use_avx512)
        signs = coded_wide(tasks, count, &spec, first, n, base.buf, kind, out.buf, okind, values,
                           &bad);
    else
#endif
        signs = coded_generic(tasks, count, &spec, first, n, base.buf, kind, out.buf, okind,
                              values, &bad);
    Py_END_ALLOW_THREADS
    result = PyLong_FromLongLong(op == OP_SIGNS ? signs : !bad);
done:
    for (Py_ssize_t k = 0; views && k < 3 * count; k++)
        if (views[k].obj)
            PyBuffer_Release(&views[k]);
    PyMem_Free(views);
    PyMem_Free(tasks);
    PyMem_Free(values);
    PyBuffer_Release(&weights);
    PyBuffer_Release(&thresholds);
    PyBuffer_Release(&base);
    PyBuffer_Release(&out);
    return result;
}

PyDoc_STRVAR(finish_doc,
             "finish(base, kind, delta, out, okind) -> bool\n\n"
             "out = okind(float32(base) + delta), rounded to nearest even; kinds as in "
             "widen(). True when every value of base is finite.");

static PyObject *py_finish(PyObject *self, PyObject *args) {
    Py_buffer base, delta, out;
    int kind, okind;
    if (!PyArg_ParseTuple(args, "y*iy*w*i:finish", &base, &kind, &delta, &out, &okind))
        return NULL;
    PyObject *result = NULL;
    if (kind < KIND_F32 || kind > KIND_F16 || okind < KIND_F32 || okind > KIND_F16 ||
        delta.len % 4) {
        PyErr_SetString(PyExc_ValueError, "finish: bad kinds or sizes");
        goto done;
    }
    Py_ssize_t n = delta.len / 4;
    if (!check_size(&base, n, KIND_SIZE[kind], "base") ||
        !check_size(&out, n, KIND_SIZE[okind], "out"))
        goto done;
    uint32_t bad;
    Py_BEGIN_ALLOW_THREADS
    bad = finish_block(base.buf, kind, delta.buf, out.buf, okind, n);
    Py_END_ALLOW_THREADS
    result = PyBool_FromLong(!bad);
done:
    PyBuffer_Release(&base);
    PyBuffer_Release(&delta);
    PyBuffer_Release(&out);
    return result;
}

PyDoc_STRVAR(simd_doc, "simd(wide=None) -> str\n\n"
                       "The vector path in use ('avx512' or 'generic'); wide=False turns the "
                       "AVX-512 path off, wide=True back on where the CPU has it.");

static int cpu_has_avx512(void) {
#if HAVE_AVX512
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
#else
    return 0;
#endif
}

static PyObject *py_simd(PyObject *self, PyObject *args) {
    PyObject *wide = Py_None;
    if (!PyArg_ParseTuple(args, "|O:simd", &wide))
        return NULL;
    if (wide != Py_None) {
        int on = PyObject_IsTrue(wide);
        if (on < 0)
            return NULL;
        use_avx512 = on && cpu_has_avx512();
    }
    return PyUnicode_FromString(use_avx512 ? "avx512" : "generic");
}

static PyMethodDef methods[] = {
    {"code_histogram", py_code_histogram, METH_VARARGS, code_histogram_doc},
    {"coded", py_coded, METH_VARARGS, coded_doc},
    {"dequantize", py_dequantize, METH_VARARGS, dequantize_doc},
    {"encode", py_encode, METH_VARARGS, encode_doc},
    {"finish", py_finish, METH_VARARGS, finish_doc},
    {"histogram", py_histogram, METH_VARARGS, histogram_doc},
    {"pack", py_pack, METH_VARARGS, pack_doc},
    {"ranges", py_ranges, METH_VARARGS, ranges_doc},
    {"scaled_sum", py_scaled_sum, METH_VARARGS, scaled_sum_doc},
    {"simd", py_simd, METH_VARARGS, simd_doc},
    {"ties", py_ties, METH_VARARGS, ties_doc},
    {"uncenter", py_uncenter, METH_VARARGS, uncenter_doc},
    {"unpack", py_unpack, METH_VARARGS, unpack_doc},
    {"widen", py_widen, METH_VARARGS, widen_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_native", "Native kernels of tvq's pack and merge pipelines.", -1,
    methods,
};

PyMODINIT_FUNC PyInit__native(void) {
    use_avx512 = cpu_has_avx512();
    return PyModule_Create(&module);
}
