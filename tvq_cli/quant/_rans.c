/* Static-model rANS streams for the low-rate codec (docs/format.md, "rANS streams").
 *
 * `rans.py` holds the reference in numpy; this is the same coder, step for step, so a stream's
 * bytes are identical whichever one writes it (the tests compare them). Only the integer
 * arithmetic is here: models, quantization and dequantization stay in numpy.
 *
 * A stream codes n symbols under one frequency table (A <= 256 symbols, each frequency >= 1 for
 * a symbol that occurs, summing to 2^16). State: 64 bits in [2^31, 2^63); renormalization by
 * 32-bit words. Symbol i belongs to lane i % lanes, lanes = ceil(n / 2^16) (at least 1), so a
 * long stream decodes in independent chains. Layout: every lane's final encoder state (u64,
 * little-endian), then the words (u32, little-endian) in the order the decoder reads them.
 * The GIL is released while coding.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define PROB_BITS 16
#define PROB_TOTAL (1u << PROB_BITS)
#define LANE_SYMBOLS 65536
#define STATE_LOW (1ull << 31)

static Py_ssize_t lane_count(Py_ssize_t n) {
    Py_ssize_t lanes = (n + LANE_SYMBOLS - 1) / LANE_SYMBOLS;
    return lanes > 0 ? lanes : 1;
}

static void put_u32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}

static uint32_t get_u32(const uint8_t *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

/* Checks a frequency table: A entries, each <= 2^16, summing to 2^16; fills cumulative starts. */
static int read_model(const Py_buffer *freq_buf, uint32_t *freq, uint32_t *start, Py_ssize_t *size) {
    Py_ssize_t count = freq_buf->len / 2;
    if (freq_buf->len % 2 || count < 1 || count > 256) {
        PyErr_SetString(PyExc_ValueError, "frequency table must hold 1 to 256 uint16 values");
        return -1;
    }
    const uint16_t *f = (const uint16_t *)freq_buf->buf;
    uint32_t total = 0;
    for (Py_ssize_t s = 0; s < count; s++) {
        freq[s] = f[s];
        start[s] = total;
        total += f[s];
    }
    if (total != PROB_TOTAL) {
        PyErr_SetString(PyExc_ValueError, "frequencies must sum to 65536");
        return -1;
    }
    *size = count;
    return 0;
}

/* Encodes `n` symbols; `out` has room for 8 * lanes + 4 * n bytes (at most one word per
 * symbol). Returns the stream's length, or -1 if a symbol is outside the table or has
 * frequency 0. */
static Py_ssize_t encode_stream(const uint8_t *symbols, Py_ssize_t n, const uint32_t *freq,
                                const uint32_t *start, Py_ssize_t alphabet, uint8_t *out,
                                uint64_t *state) {
    Py_ssize_t lanes = lane_count(n);
    for (Py_ssize_t l = 0; l < lanes; l++) state[l] = STATE_LOW;
    /* words are produced last-read-first: written backwards from the end of the buffer */
    uint8_t *end = out + 8 * lanes + 4 * n;
    uint8_t *w = end;
    Py_ssize_t lane = (n - 1) % lanes;
    for (Py_ssize_t i = n - 1; i >= 0; i--) {
        uint32_t s = symbols[i];
        if (s >= (uint32_t)alphabet || freq[s] == 0) return -1;
        uint64_t f = freq[s];
        uint64_t x = state[lane];
        if (x >= (f << 47)) {
            w -= 4;
            put_u32(w, (uint32_t)x);
            x >>= 32;
        }
        state[lane] = ((x / f) << PROB_BITS) + (x % f) + start[s];
        lane = lane ? lane - 1 : lanes - 1;
    }
    Py_ssize_t words = (end - w) / 4;
    for (Py_ssize_t l = 0; l < lanes; l++) {
        put_u32(out + 8 * l, (uint32_t)state[l]);
        put_u32(out + 8 * l + 4, (uint32_t)(state[l] >> 32));
    }
    memmove(out + 8 * lanes, w, 4 * words);
    return 8 * lanes + 4 * words;
}

/* Decodes `n` symbols of a stream of `len` bytes; returns 0, or -1 if the stream is not one
 * this coder wrote for `n` symbols under this table (a damaged stream). */
static int decode_stream(const uint8_t *data, Py_ssize_t len, Py_ssize_t n, const uint32_t *freq,
                         const uint32_t *start, Py_ssize_t alphabet, uint8_t *out,
                         uint8_t *lookup, uint64_t *state) {
    Py_ssize_t lanes = lane_count(n);
    if (len < 8 * lanes || (len - 8 * lanes) % 4) return -1;
    for (Py_ssize_t s = 0; s < alphabet; s++) memset(lookup + start[s], (int)s, freq[s]);
    for (Py_ssize_t l = 0; l < lanes; l++) {
        state[l] = (uint64_t)get_u32(data + 8 * l) | ((uint64_t)get_u32(data + 8 * l + 4) << 32);
        if (state[l] < STATE_LOW || state[l] >> 63) return -1;
    }
    const uint8_t *w = data + 8 * lanes;
    const uint8_t *w_end = data + len;
    Py_ssize_t lane = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t x = state[lane];
        uint32_t slot = (uint32_t)(x & (PROB_TOTAL - 1));
        uint32_t s = lookup[slot];
        x = (uint64_t)freq[s] * (x >> PROB_BITS) + slot - start[s];
        if (x < STATE_LOW) {
            if (w >= w_end) return -1;
            x = (x << 32) | get_u32(w);
            w += 4;
        }
        state[lane] = x;
        out[i] = (uint8_t)s;
        lane = lane + 1 == lanes ? 0 : lane + 1;
    }
    if (w != w_end) return -1;
    for (Py_ssize_t l = 0; l < lanes; l++)
        if (state[l] != STATE_LOW) return -1;
    return 0;
}

PyDoc_STRVAR(encode_doc,
             "encode(symbols, freqs) -> bytes: the rANS stream of uint8 `symbols` under the "
             "uint16 frequency table `freqs` (sum 65536).");

static PyObject *py_encode(PyObject *self, PyObject *args) {
    Py_buffer sym, fb;
    if (!PyArg_ParseTuple(args, "y*y*", &sym, &fb)) return NULL;
    uint32_t freq[256], start[256];
    Py_ssize_t alphabet;
    PyObject *result = NULL;
    uint8_t *out = NULL;
    uint64_t *state = NULL;
    if (read_model(&fb, freq, start, &alphabet) < 0) goto done;
    Py_ssize_t n = sym.len;
    Py_ssize_t lanes = lane_count(n);
    out = PyMem_RawMalloc(8 * lanes + 4 * n + 1);
    state = PyMem_RawMalloc(sizeof(uint64_t) * lanes);
    if (!out || !state) {
        PyErr_NoMemory();
        goto done;
    }
    Py_ssize_t size;
    Py_BEGIN_ALLOW_THREADS
    size = encode_stream((const uint8_t *)sym.buf, n, freq, start, alphabet, out, state);
    Py_END_ALLOW_THREADS
    if (size < 0) {
        PyErr_SetString(PyExc_ValueError, "a symbol is outside the table or has frequency 0");
        goto done;
    }
    result = PyBytes_FromStringAndSize((const char *)out, size);
done:
    PyMem_RawFree(out);
    PyMem_RawFree(state);
    PyBuffer_Release(&sym);
    PyBuffer_Release(&fb);
    return result;
}

PyDoc_STRVAR(decode_doc,
             "decode(stream, freqs, out) -> bool: decode len(out) symbols into the writable "
             "uint8 buffer `out`; False if the stream is damaged.");

static PyObject *py_decode(PyObject *self, PyObject *args) {
    Py_buffer data, fb, out;
    if (!PyArg_ParseTuple(args, "y*y*w*", &data, &fb, &out)) return NULL;
    uint32_t freq[256], start[256];
    Py_ssize_t alphabet;
    PyObject *result = NULL;
    uint8_t *lookup = NULL;
    uint64_t *state = NULL;
    if (read_model(&fb, freq, start, &alphabet) < 0) goto done;
    Py_ssize_t lanes = lane_count(out.len);
    lookup = PyMem_RawMalloc(PROB_TOTAL);
    state = PyMem_RawMalloc(sizeof(uint64_t) * lanes);
    if (!lookup || !state) {
        PyErr_NoMemory();
        goto done;
    }
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = decode_stream((const uint8_t *)data.buf, data.len, out.len, freq, start, alphabet,
                           (uint8_t *)out.buf, lookup, state);
    Py_END_ALLOW_THREADS
    result = PyBool_FromLong(status == 0);
done:
    PyMem_RawFree(lookup);
    PyMem_RawFree(state);
    PyBuffer_Release(&data);
    PyBuffer_Release(&fb);
    PyBuffer_Release(&out);
    return result;
}

static PyMethodDef methods[] = {
    {"encode", py_encode, METH_VARARGS, encode_doc},
    {"decode", py_decode, METH_VARARGS, decode_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_rans",
                                    "Static-model rANS streams (see rans.py).", -1, methods};

PyMODINIT_FUNC PyInit__rans(void) { return PyModule_Create(&module); }
