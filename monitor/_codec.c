/* The per-value work of a drill-down sample's payload (monitor/store/sample_codec.py) in one
 * call: the sum-preserving grid rounding of both log-prob arrays, zigzag, the narrowest width
 * and the byte planes, and the token lengths of a list of str.
 *
 * Why C: numpy needs a dozen whole-array passes and temporaries for this (cumsum, rint, diff,
 * zigzag, max, narrowing, transpose) on ~1,000-2,000 values a sample, a few microseconds each
 * plus the call overheads, all holding the GIL between passes; and the token lengths are a
 * Python-level map. Here it is one loop per array with the GIL released (the token lengths,
 * which read Python objects, hold it for a few microseconds).
 *
 * sample_codec._numpy_planes is the definition and the fallback for builds without a C
 * compiler: the bytes here are IDENTICAL to it (tests/test_sample_codec.py compares them).
 * The same IEEE double operations in the same order as numpy's: float32 widened exactly,
 * a sequential running sum (numpy's cumsum), times the scale, rint (round half to even), the
 * difference of consecutive rounded sums, truncated to int64. A value that is not finite or
 * beyond +-limit in either array counts as 0 in both (the caller stores it apart).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline uint64_t zigzag(int64_t v) {
    const uint64_t u = (uint64_t)v;
    return (u << 1) ^ (0 - (u >> 63));
}

/* rint (round half to even) without libm's call where no instruction does it (x86-64 before
 * SSE4.1): adding 1.5 * 2^52 leaves no fraction bits, so the addition rounds x to an integer
 * by the current (nearest-even) mode, and the subtraction is exact. Only the sign of a zero
 * may differ from rint's, which no caller sees (differences, then int64). Needs double
 * arithmetic without excess precision (not x87). */
static inline double round_even(double x) {
#if defined(__FLT_EVAL_METHOD__) && __FLT_EVAL_METHOD__ == 0
    const double big = 6755399441055744.0; /* 1.5 * 2^52 */
    if (fabs(x) < 2251799813685248.0)      /* 2^51 */
        return (x + big) - big;
#endif
    return rint(x);
}

static inline int width_of(uint64_t top) {
    return top < (1ULL << 8) ? 1 : top < (1ULL << 16) ? 2 : top < (1ULL << 32) ? 4 : 8;
}

static inline double value_at(const void *p, int is_double, Py_ssize_t i) {
    return is_double ? ((const double *)p)[i] : (double)((const float *)p)[i];
}

/* zl[i], zd[i]: zigzag of the grid of log p and of (grid log p - grid log q); returns the
 * number of values counted as 0 (non-finite or beyond limit in either array). */
static Py_ssize_t grid_pass(const void *lp, int lp_double, const void *ref, int ref_double,
                            Py_ssize_t n, double scale, double limit, uint64_t *zl, uint64_t *zd,
                            uint64_t *top_l, uint64_t *top_d) {
    double sum_l = 0.0, sum_r = 0.0, prev_l = 0.0, prev_r = 0.0;
    uint64_t tl = 0, td = 0;
    Py_ssize_t bad = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        double a = value_at(lp, lp_double, i), b = value_at(ref, ref_double, i);
        if (!(fabs(a) <= limit && fabs(b) <= limit)) {
            a = 0.0;
            b = 0.0;
            bad++;
        }
        sum_l += a;
        sum_r += b;
        const double rl = round_even(sum_l * scale), rr = round_even(sum_r * scale);
        const int64_t ql = (int64_t)(rl - prev_l), qr = (int64_t)(rr - prev_r);
        prev_l = rl;
        prev_r = rr;
        const uint64_t a_z = zigzag(ql), d_z = zigzag(ql - qr);
        zl[i] = a_z;
        zd[i] = d_z;
        tl = a_z > tl ? a_z : tl;
        td = d_z > td ? d_z : td;
    }
    *top_l = tl;
    *top_d = td;
    return bad;
}

/* Byte planes of z[0..n) in `width` bytes: all first bytes, then all second bytes, ... */
static void write_planes(const uint64_t *z, Py_ssize_t n, int width, unsigned char *out) {
    for (int k = 0; k < width; k++) {
        unsigned char *plane = out + (Py_ssize_t)k * n;
        const int shift = 8 * k;
        for (Py_ssize_t i = 0; i < n; i++) plane[i] = (unsigned char)(z[i] >> shift);
    }
}

static int float_view(PyObject *obj, Py_buffer *view, int *is_double, const char *field) {
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) return -1;
    const char *f = view->format ? view->format : "B";
    if (*f == '<' || *f == '=' || *f == '@') f++;
    if (view->ndim != 1 || (strcmp(f, "d") != 0 && strcmp(f, "f") != 0)) {
        PyErr_Format(PyExc_TypeError, "%s must be a 1-d float32 or float64 array", field);
        PyBuffer_Release(view);
        return -1;
    }
    *is_double = *f == 'd';
    return 0;
}

/* planes(lp, ref, tokens, scale, limit) -> (planes, w_lp, w_diff, w_len, n_bad):
 * see sample_codec._numpy_planes. */
static PyObject *planes(PyObject *self, PyObject *args) {
    PyObject *lp_obj, *ref_obj, *tokens;
    double scale, limit;
    if (!PyArg_ParseTuple(args, "OOOdd", &lp_obj, &ref_obj, &tokens, &scale, &limit)) return NULL;
    if (tokens != Py_None && !PyList_Check(tokens)) {
        PyErr_SetString(PyExc_TypeError, "tokens must be a list of str or None");
        return NULL;
    }
    Py_buffer lp, ref;
    int lp_double, ref_double;
    if (float_view(lp_obj, &lp, &lp_double, "policy_logprobs") < 0) return NULL;
    if (float_view(ref_obj, &ref, &ref_double, "ref_logprobs") < 0) {
        PyBuffer_Release(&lp);
        return NULL;
    }
    PyObject *result = NULL;
    const Py_ssize_t n = lp.shape[0];
    const Py_ssize_t n_tok = tokens == Py_None ? 0 : PyList_GET_SIZE(tokens);
    uint64_t *z = NULL;
    if (ref.shape[0] != n) {
        PyErr_SetString(PyExc_ValueError, "policy_logprobs and ref_logprobs differ in length");
        goto done;
    }
    z = (uint64_t *)malloc(sizeof(uint64_t) * (size_t)(2 * n + n_tok + 1));
    if (z == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    uint64_t *zl = z, *zd = z + n, *zt = z + 2 * n, top_t = 0;
    for (Py_ssize_t i = 0; i < n_tok; i++) { /* reads Python objects: holds the GIL */
        PyObject *t = PyList_GET_ITEM(tokens, i);
        if (!PyUnicode_Check(t)) {
            PyErr_Format(PyExc_TypeError, "token %zd is not a str", i);
            goto done;
        }
        const uint64_t len_z = (uint64_t)PyUnicode_GET_LENGTH(t) << 1; /* zigzag of len >= 0 */
        zt[i] = len_z;
        top_t = len_z > top_t ? len_z : top_t;
    }
    uint64_t top_l, top_d;
    Py_ssize_t n_bad;
    Py_BEGIN_ALLOW_THREADS
    n_bad = grid_pass(lp.buf, lp_double, ref.buf, ref_double, n, scale, limit, zl, zd, &top_l,
                      &top_d);
    Py_END_ALLOW_THREADS
    const int w_l = width_of(top_l), w_d = width_of(top_d);
    const int w_t = tokens == Py_None ? 0 : width_of(top_t); /* 0: no token lengths */
    PyObject *out = PyBytes_FromStringAndSize(NULL, n * (w_l + w_d) + n_tok * w_t);
    if (out == NULL) goto done;
    unsigned char *buf = (unsigned char *)PyBytes_AS_STRING(out);
    Py_BEGIN_ALLOW_THREADS /* nothing else holds a reference to `out` yet */
    write_planes(zl, n, w_l, buf);
    write_planes(zd, n, w_d, buf + n * w_l);
    write_planes(zt, n_tok, w_t, buf + n * (w_l + w_d));
    Py_END_ALLOW_THREADS
    result = Py_BuildValue("(Niiin)", out, w_l, w_d, w_t, n_bad);
done:
    free(z);
    PyBuffer_Release(&lp);
    PyBuffer_Release(&ref);
    return result;
}

static PyMethodDef methods[] = {
    {"planes", planes, METH_VARARGS,
     "planes(lp, ref, tokens, scale, limit) -> (planes, w_lp, w_diff, w_len, n_bad)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "monitor._codec",
                                    "The per-value work of sample_codec in C.", -1, methods};

PyMODINIT_FUNC PyInit__codec(void) { return PyModule_Create(&module); }
