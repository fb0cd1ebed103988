/* Range search fused into one pass per group: the pack pipeline's hot loop, in C.
 *
 * `range_search.py` holds the reference in torch ops; this is the same arithmetic, op for op
 * and in the same float32 order, so archives are byte-identical whichever one runs (the tests
 * compare them). What the C gains is locality: a group's 128 values stay in registers and L1
 * while every candidate step is tried, where the torch reference makes nine full passes over
 * a block per candidate. Rules that keep the two identical:
 *   - no FMA contraction (-ffp-contract=off): every product and sum is rounded on its own;
 *   - rounding is half-to-even via the 1.5 * 2^23 trick, after clamping to [0, levels]
 *     (clamp then round equals round then clamp for integer bounds);
 *   - a group's squared error is summed in LANES interleaved lanes, in element order, folded
 *     as ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)): a fixed order that vectorizes.
 * The GIL is released, so the pack pipeline's threads run it in parallel.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define LANES 8
#define MAX_CANDIDATES 64
#define ROUNDER 12582912.0f /* 1.5 * 2^23: adding it rounds [0, 2^22] to integers */

#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__)
/* One build for every x86-64 CPU; the AVX2 copy is picked at load time where it runs. */
#define MULTIVERSION __attribute__((target_clones("avx2", "default")))
#else
#define MULTIVERSION
#endif

#if defined(__GNUC__)
#define INLINE static inline __attribute__((always_inline))
#else
#define INLINE static inline
#endif

typedef struct {
    float levels;
    int count;              /* candidates per group */
    const float *factors;   /* fp32 scales: shrink factors [count] */
    const int32_t *shifts;  /* compact scales: step-code shifts [count] */
    const float *table;     /* compact scales: every step code's step, decreasing */
    Py_ssize_t table_size;  /* 0 for fp32 scales */
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

INLINE float group_error(const float *x, Py_ssize_t width, float scale, float zero, float levels) {
    const float step = 1.0f / scale;
    float acc[LANES] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    Py_ssize_t i = 0;
    for (; i + LANES <= width; i += LANES) {
        for (int j = 0; j < LANES; j++) {
            float v = x[i + j];
            float d = (clamp_round(v * scale + zero, levels) - zero) * step - v;
            acc[j] += d * d;
        }
    }
    for (int j = 0; i < width; i++, j++) {
        float v = x[i];
        float d = (clamp_round(v * scale + zero, levels) - zero) * step - v;
        acc[j] += d * d;
    }
    return ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
}

/* The largest step code whose step still covers `step` (table[k] >= step), 0 if none. */
INLINE int32_t covering_code(const float *table, Py_ssize_t size, float step) {
    Py_ssize_t lo = 0, hi = size;
    while (lo < hi) {
        Py_ssize_t mid = (lo + hi) / 2;
        if (table[mid] >= step)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo > 0 ? (int32_t)(lo - 1) : 0;
}

MULTIVERSION
static void search_groups(const float *x, Py_ssize_t groups, Py_ssize_t width, const float *lo,
                          const float *hi, const Search *s, uint8_t *codes, float *scales,
                          uint8_t *zeros, uint8_t *step_codes) {
    const float levels = s->levels;
    float cand[MAX_CANDIDATES], err[MAX_CANDIDATES];
    int32_t code[MAX_CANDIDATES];
    for (Py_ssize_t g = 0; g < groups; g++) {
        const float *xg = x + g * width;
        float span = hi[g] - lo[g];
        float minmax = (1.0f / span) * levels;
        minmax = minmax < s->max_scale ? minmax : s->max_scale;
        if (!(span > 0.0f))
            minmax = s->flat_scale;
        float zero = clamp_round(-minmax * lo[g], levels);
        if (s->table_size) {
            int32_t base = covering_code(s->table, s->table_size, 1.0f / minmax);
            int32_t limit = (int32_t)s->table_size - 1;
            for (int c = 0; c < s->count; c++) {
                int32_t k = base + s->shifts[c];
                code[c] = k < 0 ? 0 : (k > limit ? limit : k);
                cand[c] = 1.0f / s->table[code[c]];
            }
        } else {
            for (int c = 0; c < s->count; c++)
                cand[c] = minmax / s->factors[c];
        }
        int best = 0;
        if (s->count > 1) {
            for (int c = 0; c < s->count; c++)
                err[c] = -1.0f; /* not evaluated yet */
            float best_err = 0.0f;
            for (Py_ssize_t i = 0; i < s->n_coarse; i++) {
                int c = s->coarse[i];
                err[c] = group_error(xg, width, cand[c], zero, levels);
                float e = i ? err[c] * s->margin : err[c];
                if (i == 0 || e < best_err) {
                    best_err = e;
                    best = c;
                }
            }
            float fine_err = 0.0f;
            int fine_best = best;
            for (Py_ssize_t i = 0; i < s->n_fine; i++) {
                int c = best + s->fine[i];
                c = c < 1 ? 1 : (c > s->count - 1 ? s->count - 1 : c);
                if (err[c] < 0.0f)
                    err[c] = group_error(xg, width, cand[c], zero, levels);
                float e = err[c] * s->margin;
                if (i == 0 || e < fine_err) {
                    fine_err = e;
                    fine_best = c;
                }
            }
            if (s->n_fine && fine_err < best_err)
                best = fine_best;
        }
        const float scale = cand[best];
        uint8_t *out = codes + g * width;
        for (Py_ssize_t i = 0; i < width; i++)
            out[i] = (uint8_t)clamp_round(xg[i] * scale + zero, levels);
        scales[g] = scale;
        zeros[g] = (uint8_t)zero;
        if (s->table_size)
            step_codes[g] = (uint8_t)code[best];
    }
}

INLINE float widened(const void *src, int bf16, const float *minus, Py_ssize_t at) {
    float v;
    if (bf16) {
        uint32_t bits = (uint32_t)((const uint16_t *)src)[at] << 16;
        memcpy(&v, &bits, 4);
    } else {
        v = ((const float *)src)[at];
    }
    return minus ? v - minus[at] : v;
}

INLINE uint32_t not_finite(float v) {
    uint32_t bits;
    memcpy(&bits, &v, 4);
    return (bits & 0x7f800000u) == 0x7f800000u; /* all-ones exponent: NaN or inf */
}

/* out = float32(src) [- minus]; returns nonzero if any value of out is NaN or infinite. */
INLINE uint32_t widen_values(const void *src, int bf16, const float *minus, float *out,
                             Py_ssize_t n) {
    uint32_t bad = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        out[i] = widened(src, bf16, minus, i);
        bad |= not_finite(out[i]);
    }
    return bad;
}

MULTIVERSION
static uint32_t widen_block(const void *src, int bf16, const float *minus, float *out,
                            Py_ssize_t n) {
    /* Constant arguments per call, so each branch compiles to its own vectorized loop. */
    if (bf16)
        return minus ? widen_values(src, 1, minus, out, n) : widen_values(src, 1, NULL, out, n);
    return minus ? widen_values(src, 0, minus, out, n) : widen_values(src, 0, NULL, out, n);
}

/* Each group's min and max, widened to include 0 (range_search.group_ranges). */
MULTIVERSION
static void group_ranges(const float *x, Py_ssize_t groups, Py_ssize_t width, float *lo,
                         float *hi) {
    for (Py_ssize_t g = 0; g < groups; g++) {
        const float *xg = x + g * width;
        float mn[LANES] = {0.0f}, mx[LANES] = {0.0f};
        Py_ssize_t i = 0;
        for (; i + LANES <= width; i += LANES) {
            for (int j = 0; j < LANES; j++) {
                float v = xg[i + j];
                mn[j] = v < mn[j] ? v : mn[j];
                mx[j] = v > mx[j] ? v : mx[j];
            }
        }
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

static int check_size(const Py_buffer *buf, Py_ssize_t items, Py_ssize_t itemsize,
                      const char *name) {
    if (buf->len != items * itemsize) {
        PyErr_Format(PyExc_ValueError, "%s: %zd bytes, expected %zd", name, buf->len,
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

PyDoc_STRVAR(search_doc,
             "search(x, width, lo, hi, levels, factors, shifts, table, coarse, fine, margin, "
             "flat_scale, max_scale, codes, scales, zeros, step_codes)\n\n"
             "Range-search and quantize whole groups of float32 `x`; see range_search.py.");

static PyObject *py_search(PyObject *self, PyObject *args) {
    Py_buffer x, lo, hi, factors, shifts, table, coarse, fine, codes, scales, zeros, steps;
    Py_ssize_t width;
    int levels;
    float margin, flat_scale, max_scale;
    if (!PyArg_ParseTuple(args, "y*ny*y*iy*y*y*y*y*fffw*w*w*w*:search", &x, &width, &lo, &hi,
                          &levels, &factors, &shifts, &table, &coarse, &fine, &margin,
                          &flat_scale, &max_scale, &codes, &scales, &zeros, &steps))
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t groups = width > 0 ? x.len / ((Py_ssize_t)sizeof(float) * width) : 0;
    Py_ssize_t count = table.len ? shifts.len / 4 : factors.len / 4;
    Search s = {
        .levels = (float)levels,
        .count = (int)count,
        .factors = factors.buf,
        .shifts = shifts.buf,
        .table = table.buf,
        .table_size = table.len / 4,
        .coarse = coarse.buf,
        .n_coarse = coarse.len / 4,
        .fine = fine.buf,
        .n_fine = fine.len / 4,
        .margin = margin,
        .flat_scale = flat_scale,
        .max_scale = max_scale,
    };
    if (width <= 0 || levels < 1 || levels > 255 || count < 1 || count > MAX_CANDIDATES ||
        s.n_coarse < 1) {
        PyErr_SetString(PyExc_ValueError, "search: bad width, levels or candidate count");
        goto done;
    }
    if (!check_size(&x, groups * width, 4, "x") || !check_size(&lo, groups, 4, "lo") ||
        !check_size(&hi, groups, 4, "hi") || !check_size(&codes, groups * width, 1, "codes") ||
        !check_size(&scales, groups, 4, "scales") || !check_size(&zeros, groups, 1, "zeros") ||
        !check_size(&steps, table.len ? groups : 0, 1, "step_codes") ||
        !check_indices(coarse.buf, s.n_coarse, 0, s.count - 1, "coarse") ||
        !check_indices(fine.buf, s.n_fine, -s.count, s.count, "fine") ||
        (s.table_size &&
         !check_indices(shifts.buf, s.count, -(int)s.table_size, (int)s.table_size, "shifts")))
        goto done;
    Py_BEGIN_ALLOW_THREADS
    search_groups(x.buf, groups, width, lo.buf, hi.buf, &s, codes.buf, scales.buf, zeros.buf,
                  steps.buf);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&x);
    PyBuffer_Release(&lo);
    PyBuffer_Release(&hi);
    PyBuffer_Release(&factors);
    PyBuffer_Release(&shifts);
    PyBuffer_Release(&table);
    PyBuffer_Release(&coarse);
    PyBuffer_Release(&fine);
    PyBuffer_Release(&codes);
    PyBuffer_Release(&scales);
    PyBuffer_Release(&zeros);
    PyBuffer_Release(&steps);
    return result;
}

PyDoc_STRVAR(widen_doc, "widen(src, bf16, minus, out) -> bool\n\n"
                        "out = float32(src) - minus (no subtraction if minus is empty); src is "
                        "bfloat16 (bf16 true) or float32. True when every value is finite.");

static PyObject *py_widen(PyObject *self, PyObject *args) {
    Py_buffer src, minus, out;
    int bf16;
    if (!PyArg_ParseTuple(args, "y*py*w*:widen", &src, &bf16, &minus, &out))
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t n = out.len / 4;
    if (!check_size(&src, n, bf16 ? 2 : 4, "src") ||
        (minus.len && !check_size(&minus, n, 4, "minus")))
        goto done;
    uint32_t bad;
    Py_BEGIN_ALLOW_THREADS
    bad = widen_block(src.buf, bf16, minus.len ? minus.buf : NULL, out.buf, n);
    Py_END_ALLOW_THREADS
    result = PyBool_FromLong(!bad);
done:
    PyBuffer_Release(&src);
    PyBuffer_Release(&minus);
    PyBuffer_Release(&out);
    return result;
}

PyDoc_STRVAR(ranges_doc, "ranges(x, width, lo, hi)\n\n"
                         "Each group of `width` float32 values' min and max, widened to 0.");

static PyObject *py_ranges(PyObject *self, PyObject *args) {
    Py_buffer x, lo, hi;
    Py_ssize_t width;
    if (!PyArg_ParseTuple(args, "y*nw*w*:ranges", &x, &width, &lo, &hi))
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t groups = width > 0 ? x.len / (4 * width) : 0;
    if (width <= 0) {
        PyErr_SetString(PyExc_ValueError, "ranges: width must be positive");
        goto done;
    }
    if (!check_size(&x, groups * width, 4, "x") || !check_size(&lo, groups, 4, "lo") ||
        !check_size(&hi, groups, 4, "hi"))
        goto done;
    Py_BEGIN_ALLOW_THREADS
    group_ranges(x.buf, groups, width, lo.buf, hi.buf);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&x);
    PyBuffer_Release(&lo);
    PyBuffer_Release(&hi);
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

static PyMethodDef methods[] = {
    {"pack", py_pack, METH_VARARGS, pack_doc},
    {"search", py_search, METH_VARARGS, search_doc},
    {"widen", py_widen, METH_VARARGS, widen_doc},
    {"ranges", py_ranges, METH_VARARGS, ranges_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_native", "Native kernels of tvq's pack pipeline.", -1, methods,
};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }
