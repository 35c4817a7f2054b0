/* The token pass of monitor.divergence in C: every statistic of a step in one read of the
 * inputs, with the GIL released.
 *
 * Why C: numpy needs some thirty whole-array passes for these statistics (mask, subtract,
 * compare, gather, power sums, ...), and its threads wait for the GIL between passes. Here
 * each token is read once, four at a time with AVX2 where the CPU has it (a scalar loop with
 * the same formulas otherwise), and two Python threads run two row ranges on two cores.
 * monitor/divergence.py holds the definitions, the error messages and a numpy kernel with
 * the same results for installs built without a C compiler; this file only computes.
 *
 * The AVX2 loop reads a row's tokens between its first and last masked-in one (the padding
 * on either side is found with a 32-byte scan of the mask and never read), skips the masking
 * work where every token of that stretch is masked in, and is compiled once per input case
 * (mask or not, dtype, optional inputs) so that its sums stay in registers: nothing in it
 * makes a call, tail tokens are handled after each chunk of groups. Each lane adds the same
 * tokens in the same order as a read of the whole row, so none of this changes a sum.
 *
 * For token l = log p - log q (double precision throughout):
 *   sums: 0 -sum log p, 1 sum l, 2 sum l^2/2, 3 sum exp(-l) - 1 + l, 4 sum max(l, 0),
 *         5 sum (rollout - log p), 6 sum entropy, 7 number of tokens
 *   k3:   exp(-l) - 1 + l = l^2 g(l). Every token adds s^2 g(s) for s = l clipped to
 *         [-1/2, 1/2], with g a polynomial from Python (exact to double precision there); a
 *         tail token (|l| >= 1/2, a few percent) then swaps that for exp(-l) - 1 + l, which
 *         has no cancellation out there (libm's exp for a lone tail token, a vector exp when
 *         two or more of a group of four are in the tail, as in a drifted run).
 *   hist: the 80 bins of HIST_EDGES. Central bins 38..41 come from counts of l below -1/4,
 *         below 0 and at or above 1/4 (no scattered increments); tail tokens are binned one
 *         by one.
 *   cand: the top-1% candidates, kept in the same pass (no second read of the inputs): every
 *         token above a running level thr goes into a buffer; when the buffer is full, thr
 *         rises to a level that at least `keep` buffered values reach (one sampled from the
 *         buffer, else the `keep`-th largest by quickselect) and the values below it are
 *         dropped. A token left out is <= thr at that time, hence below `keep` kept ones, so
 *         the buffer always holds the range's `keep` largest positive l above the first level
 *         (ties count alike: equal values add the same to the sum). Python passes keep =
 *         ceil(1% of the batch's tokens) and takes the top 1% from the buffers of all row
 *         ranges. The first level is `start`: Python passes one that about twice the top's
 *         share of a sample of the whole batch beats (sampled_level, first_level), the same
 *         for every range, so a range that holds all of the top (a drifted run's top often
 *         lies in a few sequences) still keeps it, and a healthy batch buffers some 2% of its
 *         tokens instead of every positive l until the level has risen. Python checks that
 *         at least the top's size beat that level (then no token left out could belong to
 *         the top) and otherwise reads the batch again from 0.
 *   ledger: the token ledger of a row range (ledger_add), a scatter-add into buffers indexed
 *         by id that the caller keeps between calls: count[id] += 1 and sum[id] += l for each
 *         masked token, and the ids seen for the first time appended to `touched`, so reading
 *         the ledger out and clearing the buffers (ledger_take) costs O(distinct ids), not
 *         O(largest id): the touched ids sorted when they are few, else a scan of the buffers
 *         up to the largest touched id. Buffers from several row ranges add up exactly
 *         (ledger_merge).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define HAVE_AVX2 1
#endif

#define N_BINS 80
#define N_SUMS 8
#define TAIL 0.5
#define DEGREE 8 /* of g; Python passes DEGREE + 1 coefficients */

/* prefixed: <math.h> defines OVERFLOW on macOS, Windows and older glibc */
enum { KL_OK = 0, KL_BAD_VALUE = 1, KL_OVERFLOW = 2 };

typedef struct {
    const void *p, *q, *ro, *en;
    const unsigned char *m;
    int is_double;
    Py_ssize_t rows, cols;
    double tol;
    double c[DEGREE + 1];
    double clip_pos, clip_neg; /* s^2 g(s) at s = +1/2 and -1/2 */
} Inputs;

typedef struct {
    double nll, k3, l2, pos, gap, ent;
    int64_t n, below[3], tail_pos, tail_neg;
    int64_t hist[N_BINS];
    double *cand, thr; /* candidates above thr (see cand above) */
    Py_ssize_t n_cand, cap_cand, keep;
} Acc;

static inline double poly_k3(const double *c, double s) {
    const double s2 = s * s, s4 = s2 * s2; /* Estrin: a short dependency chain */
    const double g = (c[0] + c[1] * s) + s2 * (c[2] + c[3] * s) +
                     s4 * ((c[4] + c[5] * s) + s2 * (c[6] + c[7] * s) + s4 * c[8]);
    return s2 * g;
}

/* Bin of HIST_EDGES without data-dependent branches: clamp, truncate, truncation to floor. */
static inline int bin_of(double l) {
    double x = l * 4.0; /* exact */
    x = x < -40.0 ? -40.0 : x;
    x = x > 39.5 ? 39.5 : x;
    int k = (int)x;
    k -= (double)k > x;
    return k + 40;
}

/* A tail token's bin, and its side for the central bins' counts. */
static inline void tail_bookkeeping(Acc *a, double l) {
    a->hist[bin_of(l)]++;
    if (l > 0)
        a->tail_pos++;
    else
        a->tail_neg++;
}

static inline void swap(double *x, double *y) {
    const double t = *x;
    *x = *y;
    *y = t;
}

/* Reorders v[0..n) so that v[0..k) hold its k largest values (0 < k <= n): quickselect with
 * Hoare's partition around a median of three, average O(n). */
static void select_largest(double *v, Py_ssize_t n, Py_ssize_t k) {
    Py_ssize_t lo = 0, hi = n - 1;
    while (lo < hi) {
        const double x = v[lo], y = v[lo + (hi - lo) / 2], z = v[hi];
        const double pivot = x < y ? (y < z ? y : (x < z ? z : x)) : (x < z ? x : (y < z ? z : y));
        Py_ssize_t i = lo, j = hi;
        while (i <= j) { /* v[lo..i) >= pivot >= v(j..hi] */
            while (v[i] > pivot) i++;
            while (v[j] < pivot) j--;
            if (i <= j) swap(&v[i++], &v[j--]);
        }
        if (k - 1 <= j)
            hi = j;
        else if (k - 1 >= i)
            lo = i;
        else
            return; /* v(j..i) == pivot holds position k - 1 */
    }
}

/* Drops the candidates below a level taken from a sample of the buffer, when at least `keep`
 * of them reach it and it frees a good part of the buffer: one count and one branch-free
 * filter over the buffer, several times cheaper than a quickselect of it. Returns 0 (nothing
 * changed) otherwise. */
static int compact_sampled(Acc *a) {
    enum { M = 128 }; /* sampled values */
    double *v = a->cand, s[M];
    const Py_ssize_t n = a->n_cand, keep = a->keep;
    const Py_ssize_t r = (Py_ssize_t)(1.25 * M * keep / n); /* rank of the level in s */
    if (n < 4 * M || r >= M) return 0;
    for (Py_ssize_t i = 0; i < M; i++) s[i] = v[i * n / M];
    select_largest(s, M, r + 1);
    double level = s[0];
    for (Py_ssize_t i = 1; i <= r; i++) level = s[i] < level ? s[i] : level;
    Py_ssize_t count = 0;
    for (Py_ssize_t i = 0; i < n; i++) count += v[i] >= level;
    if (count < keep || count > (n + keep) / 2) return 0;
    Py_ssize_t j = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        v[j] = v[i];
        j += v[i] >= level;
    }
    a->n_cand = j;
    a->thr = level; /* the dropped are below it, and `keep` or more kept values reach it */
    return 1;
}

/* Keeps at least the `keep` largest candidates and raises the level to the smallest kept:
 * from a sample when that works out, else by a quickselect (exactly `keep` kept). */
static void compact(Acc *a) {
    if (compact_sampled(a)) return;
    select_largest(a->cand, a->n_cand, a->keep);
    a->n_cand = a->keep;
    double lowest = a->cand[0];
    for (Py_ssize_t i = 1; i < a->keep; i++) lowest = a->cand[i] < lowest ? a->cand[i] : lowest;
    a->thr = lowest;
}

/* A token above the level: into the candidate buffer, after a compaction when it is full. */
static inline void candidate(Acc *a, double l) {
    if (a->n_cand == a->cap_cand) {
        compact(a);
        if (!(l > a->thr)) return;
    }
    a->cand[a->n_cand++] = l;
}

/* A tail token: its exact k3 replaces the clipped polynomial, then the bookkeeping. */
static inline void tail_token(const Inputs *in, Acc *a, double l) {
    a->k3 += exp(-l) - 1.0 + l - (l > 0 ? in->clip_pos : in->clip_neg);
    tail_bookkeeping(a, l);
}

static inline double load(const void *base, Py_ssize_t i, int is_double) {
    return is_double ? ((const double *)base)[i] : (double)((const float *)base)[i];
}

/* The candidates' first level: one that about LEVEL_MARGIN times `share` of the batch's tokens
 * beat (`share`: the top's share of them, k / n), from the l of SAMPLE tokens in runs of RUN
 * spread evenly over the batch (a run is one cache line or two: few reads from memory); 0
 * (every positive l a candidate) when the sample is small. A sample only saves work: the
 * caller checks after the pass that k values beat the level, and reads the batch again from 0
 * otherwise. */
enum { SAMPLE = 4096, RUN = 8, SAMPLE_MIN = 1024 };
#define LEVEL_MARGIN 2.0

static double first_level(const Inputs *in, double share) {
    const Py_ssize_t n = in->rows * in->cols;
    if (!(share > 0) || n < 2 * SAMPLE) return 0.0;
    double *v = malloc(SAMPLE * sizeof(double));
    if (!v) return 0.0;
    Py_ssize_t n_in = 0, n_pos = 0;
    for (Py_ssize_t s = 0; s < SAMPLE; s += RUN) {
        const Py_ssize_t start = (Py_ssize_t)((double)s * (double)n / SAMPLE);
        for (Py_ssize_t i = start; i < start + RUN; i++) { /* no branch */
            const int in_mask = !in->m || in->m[i];
            const double l = load(in->p, i, in->is_double) - load(in->q, i, in->is_double);
            v[n_pos] = l;
            n_pos += in_mask & (l > 0); /* NaN is not */
            n_in += in_mask;
        }
    }
    const Py_ssize_t rank = (Py_ssize_t)ceil(LEVEL_MARGIN * share * (double)n_in);
    double level = 0.0;
    if (n_in >= SAMPLE_MIN && rank <= n_pos) {
        /* the rank largest, ascending, in v[0..rank): a new value beats v[0] rarely once the
         * first few hundred are in, so this costs about one comparison per value (a
         * quickselect's partitions mispredict every other one) */
        for (Py_ssize_t i = 1; i < n_pos; i++) {
            const double x = v[i];
            Py_ssize_t j;
            if (i < rank) { /* still filling: insertion sort */
                for (j = i; j > 0 && v[j - 1] > x; j--) v[j] = v[j - 1];
            } else if (x > v[0]) { /* x enters, v[0] leaves */
                for (j = 0; j + 1 < rank && v[j + 1] < x; j++) v[j] = v[j + 1];
            } else
                continue;
            v[j] = x;
        }
        level = v[0];
    }
    free(v);
    return isfinite(level) ? level : 0.0;
}

/* Tokens [j0, j1) of row r, one at a time; returns 0 when a value is out of range. The row
 * sum goes to *row. */
static int scalar_tokens(const Inputs *in, Acc *a, Py_ssize_t r, Py_ssize_t j0, Py_ssize_t j1,
                         double *row) {
    const double tol = in->tol;
    for (Py_ssize_t j = j0; j < j1; j++) {
        const Py_ssize_t i = r * in->cols + j;
        if (in->m && !in->m[i]) continue;
        const double pv = load(in->p, i, in->is_double), qv = load(in->q, i, in->is_double);
        if (!(pv <= tol && qv <= tol && pv > -HUGE_VAL && qv > -HUGE_VAL)) return 0;
        if (in->ro) {
            const double rv = load(in->ro, i, in->is_double);
            if (!(rv <= tol && rv > -HUGE_VAL)) return 0;
            a->gap += rv - pv;
        }
        if (in->en) {
            const double ev = load(in->en, i, in->is_double);
            if (!(ev >= -tol && ev < HUGE_VAL)) return 0;
            a->ent += ev;
        }
        const double l = pv - qv;
        *row += l;
        a->nll -= pv;
        a->l2 += l * l;
        a->k3 += poly_k3(in->c, l < -TAIL ? -TAIL : (l > TAIL ? TAIL : l));
        a->pos += l > 0 ? l : 0.0;
        a->below[0] += l < -0.25;
        a->below[1] += l < 0.0;
        a->below[2] += l < 0.25;
        if (!(l > -TAIL && l < TAIL)) tail_token(in, a, l);
        if (l > a->thr) candidate(a, l);
        a->n++;
    }
    return 1;
}

#ifdef HAVE_AVX2
#define AVX2 __attribute__((target("avx2,fma")))

AVX2 static inline __m256d load4(const void *base, Py_ssize_t i, int is_double) {
    return is_double ? _mm256_loadu_pd((const double *)base + i)
                     : _mm256_cvtps_pd(_mm_loadu_ps((const float *)base + i));
}

/* exp(x) of four lanes: x = n ln2 + r with |r| <= ln2/2, exp(r) by its Taylor series to r^13
 * (Estrin's scheme: four short chains), times 2^n built in the exponent bits; within a few
 * ulp of libm. x > 709.78 gives inf; x < -708 gives 0 (exp(x) < 1e-307 there, and it is only
 * ever added to numbers of order 1 or more). */
AVX2 static inline __m256d exp4(__m256d x) {
    static const double inv_fact[14] = {
        1.0,           1.0,          0.5,           1.0 / 6.0,          1.0 / 24.0,
        1.0 / 120.0,   1.0 / 720.0,  1.0 / 5040.0,  1.0 / 40320.0,      1.0 / 362880.0,
        1.0 / 3628800.0, 1.0 / 39916800.0, 1.0 / 479001600.0, 1.0 / 6227020800.0};
    __m256d c[14];
    for (int k = 0; k < 14; k++) c[k] = _mm256_set1_pd(inv_fact[k]);
    const __m256d magic = _mm256_set1_pd(0x1.8p52);
    const __m256d xc =
        _mm256_max_pd(_mm256_min_pd(x, _mm256_set1_pd(709.0)), _mm256_set1_pd(-708.0));
    const __m256d n = _mm256_round_pd(_mm256_mul_pd(xc, _mm256_set1_pd(1.4426950408889634)),
                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256d r = _mm256_fnmadd_pd(n, _mm256_set1_pd(0x1.62e42fefa3800p-1), xc);
    r = _mm256_fnmadd_pd(n, _mm256_set1_pd(0x1.ef35793c76730p-45), r);
    const __m256d r2 = _mm256_mul_pd(r, r), r4 = _mm256_mul_pd(r2, r2), r8 = _mm256_mul_pd(r4, r4);
    const __m256d p01 = _mm256_fmadd_pd(c[1], r, c[0]), p23 = _mm256_fmadd_pd(c[3], r, c[2]);
    const __m256d p45 = _mm256_fmadd_pd(c[5], r, c[4]), p67 = _mm256_fmadd_pd(c[7], r, c[6]);
    const __m256d p89 = _mm256_fmadd_pd(c[9], r, c[8]), pab = _mm256_fmadd_pd(c[11], r, c[10]);
    const __m256d pcd = _mm256_fmadd_pd(c[13], r, c[12]);
    const __m256d q0 = _mm256_fmadd_pd(p23, r2, p01), q1 = _mm256_fmadd_pd(p67, r2, p45);
    const __m256d q2 = _mm256_fmadd_pd(pab, r2, p89);
    const __m256d s0 = _mm256_fmadd_pd(q1, r4, q0), s1 = _mm256_fmadd_pd(pcd, r4, q2);
    const __m256d poly = _mm256_fmadd_pd(s1, r8, s0);
    const __m256i bits = _mm256_slli_epi64(
        _mm256_add_epi64(_mm256_sub_epi64(_mm256_castpd_si256(_mm256_add_pd(n, magic)),
                                          _mm256_castpd_si256(magic)),
                         _mm256_set1_epi64x(1023)),
        52);
    __m256d y = _mm256_mul_pd(poly, _mm256_castsi256_pd(bits));
    y = _mm256_blendv_pd(y, _mm256_set1_pd(HUGE_VAL),
                         _mm256_cmp_pd(x, _mm256_set1_pd(709.78), _CMP_GT_OQ));
    return _mm256_blendv_pd(y, _mm256_setzero_pd(),
                            _mm256_cmp_pd(x, _mm256_set1_pd(-708.0), _CMP_LT_OQ));
}

/* For each 4-bit set of lanes, the 32-bit lane indices that move those doubles to the front. */
static const int32_t pack_lanes[16][8] = {
    {0, 1, 0, 1, 0, 1, 0, 1},
    {0, 1, 0, 1, 0, 1, 0, 1},
    {2, 3, 0, 1, 0, 1, 0, 1},
    {0, 1, 2, 3, 0, 1, 0, 1},
    {4, 5, 0, 1, 0, 1, 0, 1},
    {0, 1, 4, 5, 0, 1, 0, 1},
    {2, 3, 4, 5, 0, 1, 0, 1},
    {0, 1, 2, 3, 4, 5, 0, 1},
    {6, 7, 0, 1, 0, 1, 0, 1},
    {0, 1, 6, 7, 0, 1, 0, 1},
    {2, 3, 6, 7, 0, 1, 0, 1},
    {0, 1, 2, 3, 6, 7, 0, 1},
    {4, 5, 6, 7, 0, 1, 0, 1},
    {0, 1, 4, 5, 6, 7, 0, 1},
    {2, 3, 4, 5, 6, 7, 0, 1},
    {0, 1, 2, 3, 4, 5, 6, 7}};

AVX2 static inline double hsum(__m256d v) {
    __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
}

AVX2 static inline int64_t hsum_i(__m256i v) {
    int64_t x[4];
    _mm256_storeu_si256((__m256i *)x, v);
    return x[0] + x[1] + x[2] + x[3];
}

/* Per-lane sums of the row the AVX2 loop reads (registers while a chunk of it runs). */
typedef struct {
    __m256d row, nll, l2, k3, pos, gap, ent, bad;
    __m256i b0, b1, above, n; /* counts of l < -1/4, l < 0, l >= 1/4, masked-in tokens */
} Lanes;

enum { CHUNK = 256 }; /* most groups of four per run of the inner loop */

/* The groups of a chunk with a tail token (or a non-finite l): their l and which lanes,
 * handled after the chunk, in order, so that the inner loop makes no call (libm's exp, the
 * histogram), which would move its sums out of registers. */
typedef struct {
    double l[CHUNK][4];
    int lanes[CHUNK];
    int n;
} Tails;

/* `n_groups` groups of four from flat index i0, as the loop compiled for these inputs:
 * `masked` zeroes the lanes outside the mask with a bitwise AND (NaN padding included), 0
 * for groups wholly under the mask; `dbl`, `ro`, `en`: the inputs' dtype and optional inputs.
 * All constants where inlined, so each case is a loop with only the registers it needs. The
 * caller sizes the chunk so that the candidate buffer cannot fill up in it (thr is fixed).
 * Returns the new number of candidates; a value out of range sets v->bad (or a lane of
 * t: a non-finite l). */
AVX2 static inline __attribute__((always_inline)) Py_ssize_t
avx2_chunk(const Inputs *in, Lanes *v, double *cand, Py_ssize_t n_cand, double level, Tails *t,
           Py_ssize_t i0, Py_ssize_t n_groups, int masked, int dbl, int ro, int en) {
    const void *p = in->p, *q = in->q, *ro_p = in->ro, *en_p = in->en;
    const unsigned char *m = in->m;
    const __m256d zero = _mm256_setzero_pd(), half = _mm256_set1_pd(TAIL);
    const __m256d nhalf = _mm256_set1_pd(-TAIL), q1 = _mm256_set1_pd(0.25);
    const __m256d nq1 = _mm256_set1_pd(-0.25), absmask = _mm256_set1_pd(-0.0);
    const __m256d tol = _mm256_set1_pd(in->tol), ntol = _mm256_set1_pd(-in->tol);
    const __m256d inf = _mm256_set1_pd(HUGE_VAL), ninf = _mm256_set1_pd(-HUGE_VAL);
    const __m256d thr = _mm256_set1_pd(level);
    __m256d c[DEGREE + 1];
    for (int k = 0; k <= DEGREE; k++) c[k] = _mm256_set1_pd(in->c[k]);
    Lanes x = *v;
    for (Py_ssize_t g = 0; g < n_groups; g++) {
        const Py_ssize_t i = i0 + 4 * g;
        __m256d mk = _mm256_castsi256_pd(_mm256_set1_epi64x(-1));
        if (masked) {
            int32_t bytes;
            memcpy(&bytes, m + i, 4);
            const __m256i wide = _mm256_cvtepu8_epi64(_mm_cvtsi32_si128(bytes));
            mk = _mm256_castsi256_pd(_mm256_cmpgt_epi64(wide, _mm256_setzero_si256()));
        }
        const __m256d pv = load4(p, i, dbl), qv = load4(q, i, dbl);
        /* out of range: p or q above tol, or NaN in q (max returns its second operand); NaN
         * in p and infinities make l non-finite, caught with the tail */
        __m256d over = _mm256_cmp_pd(_mm256_max_pd(pv, qv), tol, _CMP_NLE_UQ);
        if (ro) {
            const __m256d rv = load4(ro_p, i, dbl);
            over = _mm256_or_pd(over, _mm256_or_pd(_mm256_cmp_pd(rv, tol, _CMP_NLE_UQ),
                                                   _mm256_cmp_pd(rv, ninf, _CMP_EQ_OQ)));
            x.gap = _mm256_add_pd(x.gap, _mm256_and_pd(_mm256_sub_pd(rv, pv), mk));
        }
        if (en) {
            const __m256d ev = load4(en_p, i, dbl);
            over = _mm256_or_pd(over, _mm256_or_pd(_mm256_cmp_pd(ev, ntol, _CMP_NGE_UQ),
                                                   _mm256_cmp_pd(ev, inf, _CMP_EQ_OQ)));
            x.ent = _mm256_add_pd(x.ent, _mm256_and_pd(ev, mk));
        }
        x.bad = _mm256_or_pd(x.bad, masked ? _mm256_and_pd(over, mk) : over);
        __m256d l = _mm256_sub_pd(pv, qv);
        if (masked) l = _mm256_and_pd(l, mk);
        x.row = _mm256_add_pd(x.row, l);
        x.nll = _mm256_add_pd(x.nll, masked ? _mm256_and_pd(pv, mk) : pv);
        x.l2 = _mm256_fmadd_pd(l, l, x.l2);
        const __m256d s = _mm256_min_pd(_mm256_max_pd(l, nhalf), half);
        const __m256d s2 = _mm256_mul_pd(s, s), s4 = _mm256_mul_pd(s2, s2);
        const __m256d e0 = _mm256_fmadd_pd(c[1], s, c[0]), e1 = _mm256_fmadd_pd(c[3], s, c[2]);
        const __m256d e2 = _mm256_fmadd_pd(c[5], s, c[4]), e3 = _mm256_fmadd_pd(c[7], s, c[6]);
        const __m256d hi = _mm256_fmadd_pd(s4, c[8], _mm256_fmadd_pd(s2, e3, e2));
        const __m256d g4 = _mm256_fmadd_pd(s4, hi, _mm256_fmadd_pd(s2, e1, e0));
        x.k3 = _mm256_fmadd_pd(s2, g4, x.k3);
        x.pos = _mm256_add_pd(x.pos, _mm256_max_pd(l, zero));
        /* a true comparison is all ones, i.e. -1 as an integer: subtracting counts it (masked
         * lanes hold l = 0, which none of the three counts) */
        x.b0 = _mm256_sub_epi64(x.b0, _mm256_castpd_si256(_mm256_cmp_pd(l, nq1, _CMP_LT_OQ)));
        x.b1 = _mm256_sub_epi64(x.b1, _mm256_castpd_si256(_mm256_cmp_pd(l, zero, _CMP_LT_OQ)));
        x.above =
            _mm256_sub_epi64(x.above, _mm256_castpd_si256(_mm256_cmp_pd(l, q1, _CMP_GE_OQ)));
        if (masked) x.n = _mm256_sub_epi64(x.n, _mm256_castpd_si256(mk));
        /* candidates: the lanes above the level, packed to the front and stored at the end of
         * the buffer (masked lanes hold l = 0, never above thr >= 0; sequence_kl's is inf) */
        const int above_thr = _mm256_movemask_pd(_mm256_cmp_pd(l, thr, _CMP_GT_OQ));
        if (above_thr) {
            const __m256i pack = _mm256_loadu_si256((const __m256i *)pack_lanes[above_thr]);
            const __m256 packed = _mm256_permutevar8x32_ps(_mm256_castpd_ps(l), pack);
            _mm256_storeu_pd(cand + n_cand, _mm256_castps_pd(packed));
            n_cand += __builtin_popcount(above_thr);
        }
        const __m256d abs_l = _mm256_andnot_pd(absmask, l);
        const int tail = _mm256_movemask_pd(_mm256_cmp_pd(abs_l, half, _CMP_NLT_UQ));
        if (tail) {
            _mm256_storeu_pd(t->l[t->n], l);
            t->lanes[t->n++] = tail;
        }
    }
    *v = x;
    return n_cand;
}

/* The tail groups of a chunk, in order: each tail token's exact k3 replaces its clipped
 * polynomial (a vector exp when two or more of a group are in the tail, as in a drifted run;
 * libm's exp for a lone one, all of the chunk's called one after another so that they overlap,
 * then added in order), and its bin. Returns 0 when an l is inf or NaN (a value out of range). */
AVX2 static int avx2_tails(const Inputs *in, Acc *a, const Tails *t, double k3tail[4]) {
    const __m256d zero = _mm256_setzero_pd(), half = _mm256_set1_pd(TAIL);
    double lone[CHUNK], e[CHUNK];
    int n_lone = 0;
    __m256d k3t = _mm256_loadu_pd(k3tail);
    for (int k = 0; k < t->n; k++) {
        const double *lv = t->l[k];
        const int tail = t->lanes[k];
        const __m256d l = _mm256_loadu_pd(lv), abs_l = _mm256_andnot_pd(_mm256_set1_pd(-0.0), l);
        if (_mm256_movemask_pd(_mm256_cmp_pd(abs_l, _mm256_set1_pd(HUGE_VAL), _CMP_NLT_UQ)))
            return 0;
        if (__builtin_popcount(tail) >= 2) {
            const __m256d in_tail = _mm256_cmp_pd(abs_l, half, _CMP_GE_OQ);
            const __m256d clipped =
                _mm256_blendv_pd(_mm256_set1_pd(in->clip_neg), _mm256_set1_pd(in->clip_pos),
                                 _mm256_cmp_pd(l, zero, _CMP_GT_OQ));
            const __m256d exact = _mm256_add_pd(
                _mm256_sub_pd(exp4(_mm256_sub_pd(zero, l)), _mm256_set1_pd(1.0)), l);
            k3t = _mm256_add_pd(k3t, _mm256_and_pd(_mm256_sub_pd(exact, clipped), in_tail));
            for (int j = 0; j < 4; j++)
                if (tail >> j & 1) tail_bookkeeping(a, lv[j]);
        } else {
            lone[n_lone] = lv[__builtin_ctz(tail)];
            tail_bookkeeping(a, lone[n_lone++]);
        }
    }
    _mm256_storeu_pd(k3tail, k3t);
    for (int k = 0; k < n_lone; k++) e[k] = exp(-lone[k]);
    for (int k = 0; k < n_lone; k++) /* as tail_token adds it */
        a->k3 += e[k] - 1.0 + lone[k] - (lone[k] > 0 ? in->clip_pos : in->clip_neg);
    return 1;
}

/* Compacts the candidate buffer when it has no room for a group's store of four. */
static void make_room(Acc *a) {
    if (a->n_cand > a->cap_cand - 4) compact(a);
}

/* Groups i, i + 4, .. < i1 of the flat inputs into v, in chunks: each starts with the room
 * check that every group would make, and is no longer than the groups that cannot fill the
 * buffer, so the checks in between would all pass. Returns 0 when a value is out of range. */
AVX2 static int avx2_span(const Inputs *in, Acc *a, Lanes *v, double k3tail[4], Py_ssize_t i,
                          Py_ssize_t i1, int masked) {
    const int usual = !in->is_double && !in->ro && !in->en; /* float32, no optional inputs */
    const int dbl = in->is_double, ro = in->ro != NULL, en = in->en != NULL;
    Tails t;
    while (i < i1) {
        make_room(a);
        Py_ssize_t g = (i1 - i) / 4;
        if (a->keep > 0) { /* else no candidates: thr is inf */
            const Py_ssize_t room = (a->cap_cand - 4 - a->n_cand) / 4 + 1;
            g = g < room ? g : room;
        }
        g = g < CHUNK ? g : CHUNK;
        t.n = 0;
        double *cand = a->cand;
        const Py_ssize_t n = a->n_cand;
        if (usual && masked)
            a->n_cand = avx2_chunk(in, v, cand, n, a->thr, &t, i, g, 1, 0, 0, 0);
        else if (usual)
            a->n_cand = avx2_chunk(in, v, cand, n, a->thr, &t, i, g, 0, 0, 0, 0);
        else if (masked)
            a->n_cand = avx2_chunk(in, v, cand, n, a->thr, &t, i, g, 1, dbl, ro, en);
        else
            a->n_cand = avx2_chunk(in, v, cand, n, a->thr, &t, i, g, 0, dbl, ro, en);
        if (!avx2_tails(in, a, &t, k3tail)) return 0;
        i += 4 * g;
    }
    return 1;
}

/* The first nonzero byte of m[0..n) (n if none), and one past the last one (0 if none). */
AVX2 static Py_ssize_t first_set(const unsigned char *m, Py_ssize_t n) {
    Py_ssize_t j = 0;
    for (; j + 32 <= n; j += 32) {
        const __m256i x = _mm256_loadu_si256((const __m256i *)(m + j));
        if (!_mm256_testz_si256(x, x)) break;
    }
    while (j < n && !m[j]) j++;
    return j;
}

AVX2 static Py_ssize_t last_set(const unsigned char *m, Py_ssize_t n) {
    Py_ssize_t j = n;
    for (; j >= 32; j -= 32) {
        const __m256i x = _mm256_loadu_si256((const __m256i *)(m + j - 32));
        if (!_mm256_testz_si256(x, x)) break;
    }
    while (j > 0 && !m[j - 1]) j--;
    return j;
}

/* Row r, four tokens at a time. The groups before the row's first masked-in token and after
 * its last are skipped (they would add zeros; found with a 32-byte scan of the mask, so a
 * padded row costs its response, not its width), and when every token between those two is
 * masked in, the groups wholly inside skip the masking work. Each lane adds the same tokens in
 * the same order as a read of every group would, so the sums are the same. Returns 0 when a
 * value is out of range. */
AVX2 static int avx2_row(const Inputs *in, Acc *a, Py_ssize_t r, double *row_out) {
    const Py_ssize_t cols = in->cols, base = r * cols, end = cols - cols % 4;
    Lanes v;
    memset(&v, 0, sizeof v);
    double k3tail[4] = {0, 0, 0, 0};
    /* groups [lo, hi) hold the row's masked-in tokens, [dlo, dhi) nothing else */
    Py_ssize_t lo = 0, hi = end, dlo = 0, dhi = end;
    if (in->m) {
        const unsigned char *m = in->m + base;
        const Py_ssize_t first = first_set(m, end), last = first < end ? last_set(m, end) : first;
        lo = first & ~(Py_ssize_t)3;
        hi = (last + 3) & ~(Py_ssize_t)3;
        if (first < last && !memchr(m + first, 0, (size_t)(last - first))) {
            dlo = (first + 3) & ~(Py_ssize_t)3;
            dhi = last & ~(Py_ssize_t)3;
            dhi = dhi > dlo ? dhi : dlo;
        } else
            dlo = dhi = hi;
    }
    if (!avx2_span(in, a, &v, k3tail, base + lo, base + dlo, 1) ||
        !avx2_span(in, a, &v, k3tail, base + dlo, base + dhi, 0) ||
        !avx2_span(in, a, &v, k3tail, base + dhi, base + hi, 1) || _mm256_movemask_pd(v.bad))
        return 0;
    if (hi < end) make_room(a); /* as the skipped groups would have */
    double row_sum = hsum(v.row);
    a->nll -= hsum(v.nll);
    a->l2 += hsum(v.l2);
    a->k3 += hsum(v.k3) + hsum(_mm256_loadu_pd(k3tail));
    a->pos += hsum(v.pos);
    a->gap += hsum(v.gap);
    a->ent += hsum(v.ent);
    const int64_t n = hsum_i(v.n) + (dhi - dlo);
    a->below[0] += hsum_i(v.b0);
    a->below[1] += hsum_i(v.b1);
    a->below[2] += n - hsum_i(v.above);
    a->n += n;
    if (!scalar_tokens(in, a, r, end, cols, &row_sum)) return 0;
    *row_out = row_sum;
    return 1;
}

static int have_avx2(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
#endif

static int token_pass(const Inputs *in, Acc *a, double *seq, int simd, Py_ssize_t *bad_row) {
    for (Py_ssize_t r = 0; r < in->rows; r++) {
        double row = 0;
        int ok;
#ifdef HAVE_AVX2
        ok = simd ? avx2_row(in, a, r, &row) : scalar_tokens(in, a, r, 0, in->cols, &row);
#else
        ok = scalar_tokens(in, a, r, 0, in->cols, &row);
#endif
        if (!ok || !isfinite(row)) {
            *bad_row = r;
            return ok ? KL_OVERFLOW : KL_BAD_VALUE;
        }
        seq[r] = row;
    }
    return KL_OK;
}

/* ---- Python interface ---------------------------------------------------------------------
 * Inputs are C-contiguous buffers of rows * cols items (float32 or float64, the mask as
 * bytes); the optional ones may be None. Outputs are writable float64 / int64 buffers. */

/* rows * cols items, each of `item` bytes, without overflowing Py_ssize_t; -1 if it would. */
static Py_ssize_t checked_bytes(Py_ssize_t rows, Py_ssize_t cols, Py_ssize_t item) {
    if (rows < 0 || cols < 0) return -1;
    if (cols && rows > PY_SSIZE_T_MAX / cols / item) return -1;
    return rows * cols * item;
}

static int get_buffers(PyObject *objs[5], Py_buffer views[5], Inputs *in) {
    static const char *names[5] = {"policy", "ref", "mask", "rollout", "entropies"};
    const Py_ssize_t item = in->is_double ? 8 : 4;
    for (int k = 0; k < 5; k++) { /* all cleared first: the error path releases any of them */
        views[k].obj = NULL;
        views[k].buf = NULL;
    }
    if (checked_bytes(in->rows, in->cols, item) < 0) {
        PyErr_SetString(PyExc_ValueError, "rows and cols must be >= 0 and fit in memory");
        return -1;
    }
    for (int k = 0; k < 5; k++) {
        if (objs[k] == Py_None) continue;
        if (PyObject_GetBuffer(objs[k], &views[k], PyBUF_C_CONTIGUOUS) < 0) goto fail;
        const Py_ssize_t size = k == 2 ? 1 : item, want = checked_bytes(in->rows, in->cols, size);
        if (views[k].itemsize != size || views[k].len < want) {
            PyErr_Format(PyExc_ValueError, "%s holds %zd bytes of %zd-byte items, expected %zd "
                         "bytes of %zd-byte items", names[k], views[k].len, views[k].itemsize,
                         want, size);
            goto fail;
        }
    }
    if (!views[0].buf || !views[1].buf) {
        PyErr_SetString(PyExc_ValueError, "policy and ref are required");
        goto fail;
    }
    in->p = views[0].buf;
    in->q = views[1].buf;
    in->m = views[2].buf;
    in->ro = views[3].buf;
    in->en = views[4].buf;
    return 0;
fail:
    for (int k = 0; k < 5; k++)
        if (views[k].obj) PyBuffer_Release(&views[k]);
    return -1;
}

static void release(Py_buffer *views, int n) {
    for (int k = 0; k < n; k++)
        if (views[k].obj) PyBuffer_Release(&views[k]);
}

static PyObject *stats(PyObject *self, PyObject *args) {
    PyObject *objs[5];
    Inputs in;
    int simd;
    Py_ssize_t keep;
    double start;
    Py_buffer outs[5]; /* coef, seq, sums, hist, cand */
    if (!PyArg_ParseTuple(args, "OOOOOnnpdpndy*w*w*w*w*", &objs[0], &objs[1], &objs[2], &objs[3],
                          &objs[4], &in.rows, &in.cols, &in.is_double, &in.tol, &simd, &keep,
                          &start, &outs[0], &outs[1], &outs[2], &outs[3], &outs[4]))
        return NULL;
    if (!(start >= 0.0) || start == HUGE_VAL) {
        release(outs, 5);
        return PyErr_Format(PyExc_ValueError, "start must be a finite level >= 0");
    }
    if (outs[0].len != (DEGREE + 1) * 8 || in.rows < 0 || outs[1].len / 8 < in.rows ||
        outs[2].len != N_SUMS * 8 || outs[3].len != N_BINS * 8 || keep < 0 ||
        outs[4].len / 8 < keep + 4) { /* + 4: the AVX2 loop stores a group of four */
        release(outs, 5);
        return PyErr_Format(PyExc_ValueError, "output buffers have the wrong size");
    }
    memcpy(in.c, outs[0].buf, sizeof in.c);
    in.clip_pos = poly_k3(in.c, TAIL);
    in.clip_neg = poly_k3(in.c, -TAIL);
    Py_buffer views[5];
    if (get_buffers(objs, views, &in) < 0) {
        release(outs, 5);
        return NULL;
    }
#ifdef HAVE_AVX2
    simd = simd && have_avx2();
#else
    simd = 0;
#endif
    Acc a;
    memset(&a, 0, sizeof a);
    a.cand = outs[4].buf;
    a.cap_cand = outs[4].len / 8;
    a.keep = keep;
    a.thr = keep > 0 ? 0.0 : HUGE_VAL; /* nothing to keep: no candidates */
    Py_ssize_t bad_row = -1;
    int status;
    Py_BEGIN_ALLOW_THREADS
    if (keep > 0) a.thr = start;
    status = token_pass(&in, &a, outs[1].buf, simd, &bad_row);
    if (status == KL_OK && a.keep > 0 && a.n_cand > 2 * a.keep)
        compact(&a); /* here, on this range's thread, rather than in Python after the join */
    Py_END_ALLOW_THREADS
    if (status == KL_OK && !(isfinite(a.nll) && isfinite(a.gap) && isfinite(a.ent)))
        status = KL_OVERFLOW; /* finite values of magnitude near 1e308 */
    if (status == KL_OK) {
        double *sums = outs[2].buf;
        int64_t *hist = outs[3].buf;
        double sum_l = 0;
        for (Py_ssize_t r = 0; r < in.rows; r++) sum_l += ((double *)outs[1].buf)[r];
        const double add[N_SUMS] = {a.nll, sum_l, 0.5 * a.l2, a.k3, a.pos, a.gap, a.ent,
                                    (double)a.n};
        for (int k = 0; k < N_SUMS; k++) sums[k] += add[k];
        for (int b = 0; b < N_BINS; b++) hist[b] += a.hist[b];
        hist[38] += a.below[0] - a.tail_neg;
        hist[39] += a.below[1] - a.below[0];
        hist[40] += a.below[2] - a.below[1];
        hist[41] += a.n - a.below[2] - a.tail_pos;
    }
    release(views, 5);
    release(outs, 5);
    return Py_BuildValue("inni", status, bad_row, a.n_cand, simd);
}

/* ---- token ledger (see ledger at the top) ----------------------------------------------- */

enum { LEDGER_OK = 0, LEDGER_ID_TOO_LARGE = 1 };

/* acc[2 id] is the id's sum of l and acc[2 id + 1] its count (a double: exact to 2**53), side
 * by side so that a token touches one cache line. */
typedef struct {
    double *acc;
    int64_t *touched;
    Py_ssize_t cap, n_touched;
} Ledger;

/* One loop per dtype of the log-probs and of the ids, none of them tested per token. An id
 * outside [0, cap) stops the pass (LEDGER_ID_TOO_LARGE; ids < 0 are refused by the caller
 * before): the caller then clears the buffers with ledger_take and counts another way. */
#define LEDGER_LOOP(PT, IT)                                                                    \
    {                                                                                          \
        const PT *p = in->p, *q = in->q;                                                       \
        const IT *idp = ids;                                                                   \
        for (Py_ssize_t k = 0; k < n; k++) {                                                   \
            if (m && !m[k]) continue;                                                          \
            const int64_t id = (int64_t)idp[k];                                                \
            if ((uint64_t)id >= (uint64_t)cap) {                                               \
                status = LEDGER_ID_TOO_LARGE;                                                  \
                break;                                                                         \
            }                                                                                  \
            double *slot = acc + 2 * id;                                                       \
            if (slot[1] == 0.0) touched[nt++] = id;                                            \
            slot[0] += (double)p[k] - (double)q[k];                                            \
            slot[1] += 1.0;                                                                    \
        }                                                                                      \
    }

static int ledger_rows(const Inputs *in, const void *ids, int ids64, Ledger *lg) {
    const Py_ssize_t n = in->rows * in->cols, cap = lg->cap;
    const unsigned char *m = in->m;
    double *acc = lg->acc;
    int64_t *touched = lg->touched;
    Py_ssize_t nt = lg->n_touched;
    int status = LEDGER_OK;
    if (in->is_double && ids64)
        LEDGER_LOOP(double, int64_t)
    else if (in->is_double)
        LEDGER_LOOP(double, int32_t)
    else if (ids64)
        LEDGER_LOOP(float, int64_t)
    else
        LEDGER_LOOP(float, int32_t)
    lg->n_touched = nt; /* also after a bad id: ledger_take clears what was added */
    return status;
}
static int cmp_id(const void *a, const void *b) {
    const int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

static inline void take_one(double *acc, int64_t id, Py_ssize_t i, int64_t *ids, int64_t *counts,
                            double *sums) {
    ids[i] = id;
    sums[i] = acc[2 * id];
    counts[i] = (int64_t)acc[2 * id + 1];
    acc[2 * id] = acc[2 * id + 1] = 0.0;
}

/* The ledger's ids in ascending order with their counts and sums, into out_*; clears it. */
static void ledger_collect(Ledger *lg, int64_t *out_ids, int64_t *out_counts, double *out_sums) {
    const Py_ssize_t n = lg->n_touched;
    int64_t top = -1;
    for (Py_ssize_t i = 0; i < n; i++) top = lg->touched[i] > top ? lg->touched[i] : top;
    if ((double)n * log2((double)n + 2.0) * 4.0 < (double)top) { /* few ids: sort them */
        qsort(lg->touched, (size_t)n, sizeof(int64_t), cmp_id);
        for (Py_ssize_t i = 0; i < n; i++)
            take_one(lg->acc, lg->touched[i], i, out_ids, out_counts, out_sums);
    } else { /* many: scan the buffer up to the largest one */
        Py_ssize_t i = 0;
        for (int64_t id = 0; id <= top; id++)
            if (lg->acc[2 * id + 1] != 0.0)
                take_one(lg->acc, id, i++, out_ids, out_counts, out_sums);
    }
    lg->n_touched = 0;
}

/* Ledger buffers from Python: acc (float64, 2 per id) and touched (int64, 1 per id); views[2]
 * must be released by the caller when this returns 0. */
static int get_ledger(PyObject *objs[2], Py_ssize_t n_touched, Py_buffer views[2], Ledger *lg) {
    for (int k = 0; k < 2; k++) views[k].obj = NULL;
    for (int k = 0; k < 2; k++)
        if (PyObject_GetBuffer(objs[k], &views[k], PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0)
            goto fail;
    lg->cap = views[1].len / 8;
    if (views[0].itemsize != 8 || views[1].itemsize != 8 || views[0].len / 16 != lg->cap ||
        n_touched < 0 || n_touched > lg->cap) {
        PyErr_SetString(PyExc_ValueError,
                        "ledger buffers: acc must hold 2 doubles per id of touched (int64)");
        goto fail;
    }
    lg->acc = views[0].buf;
    lg->touched = views[1].buf;
    lg->n_touched = n_touched;
    return 0;
fail:
    release(views, 2);
    return -1;
}

static PyObject *ledger_add(PyObject *self, PyObject *args) {
    PyObject *objs[5] = {NULL, NULL, NULL, Py_None, Py_None}, *ids_obj, *lobjs[2];
    Inputs in;
    Py_ssize_t n_touched;
    memset(&in, 0, sizeof in);
    if (!PyArg_ParseTuple(args, "OOOOnnpOOn", &ids_obj, &objs[0], &objs[1], &objs[2], &in.rows,
                          &in.cols, &in.is_double, &lobjs[0], &lobjs[1], &n_touched))
        return NULL;
    Py_buffer views[5], idv, lviews[2];
    Ledger lg;
    if (get_buffers(objs, views, &in) < 0) return NULL;
    if (PyObject_GetBuffer(ids_obj, &idv, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) {
        release(views, 5);
        return NULL;
    }
    const char kind = idv.format ? idv.format[strlen(idv.format) - 1] : 'B';
    if ((idv.itemsize != 8 && idv.itemsize != 4) || !strchr("ilqn", kind) ||
        idv.len / idv.itemsize < in.rows * in.cols) {
        PyErr_SetString(PyExc_ValueError, "ids must hold rows * cols int32 or int64");
        goto fail;
    }
    if (get_ledger(lobjs, n_touched, lviews, &lg) < 0) goto fail;
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = ledger_rows(&in, idv.buf, idv.itemsize == 8, &lg);
    Py_END_ALLOW_THREADS
    release(lviews, 2);
    release(views, 5);
    PyBuffer_Release(&idv);
    return Py_BuildValue("in", status, lg.n_touched);
fail:
    release(views, 5);
    PyBuffer_Release(&idv);
    return NULL;
}

/* ledger_merge(acc, touched, n, src_acc, src_touched, src_n) -> n: src added, src cleared. */
static PyObject *ledger_merge(PyObject *self, PyObject *args) {
    PyObject *a[2], *b[2];
    Py_ssize_t na, nb;
    if (!PyArg_ParseTuple(args, "OOnOOn", &a[0], &a[1], &na, &b[0], &b[1], &nb)) return NULL;
    Py_buffer va[2], vb[2];
    Ledger dst, src;
    if (get_ledger(a, na, va, &dst) < 0) return NULL;
    if (get_ledger(b, nb, vb, &src) < 0) {
        release(va, 2);
        return NULL;
    }
    if (src.cap > dst.cap) {
        release(va, 2);
        release(vb, 2);
        return PyErr_Format(PyExc_ValueError, "ledger_merge: the source is the larger ledger");
    }
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < src.n_touched; i++) {
        const int64_t id = src.touched[i];
        double *d = dst.acc + 2 * id, *s = src.acc + 2 * id;
        if (d[1] == 0.0) dst.touched[dst.n_touched++] = id;
        d[0] += s[0];
        d[1] += s[1];
        s[0] = s[1] = 0.0;
    }
    Py_END_ALLOW_THREADS
    release(va, 2);
    release(vb, 2);
    return PyLong_FromSsize_t(dst.n_touched);
}

/* ledger_take(acc, touched, n, out_ids, out_counts, out_sums): see ledger_collect. */
static PyObject *ledger_take(PyObject *self, PyObject *args) {
    PyObject *a[2];
    Py_ssize_t n;
    Py_buffer outs[3], va[2];
    if (!PyArg_ParseTuple(args, "OOnw*w*w*", &a[0], &a[1], &n, &outs[0], &outs[1], &outs[2]))
        return NULL;
    Ledger lg;
    if (get_ledger(a, n, va, &lg) < 0) {
        release(outs, 3);
        return NULL;
    }
    if (outs[0].len / 8 < n || outs[1].len / 8 < n || outs[2].len / 8 < n) {
        release(va, 2);
        release(outs, 3);
        return PyErr_Format(PyExc_ValueError, "ledger_take: output buffers are too small");
    }
    Py_BEGIN_ALLOW_THREADS
    ledger_collect(&lg, outs[0].buf, outs[1].buf, outs[2].buf);
    Py_END_ALLOW_THREADS
    release(va, 2);
    release(outs, 3);
    Py_RETURN_NONE;
}

/* ---- the caller's copy (monitor.ingest.fused_copy) ----------------------------------------
 * log_step's private copies of the per-token arrays and of the mask, and the value checks of
 * monitor.divergence.inputs.check_values, in one pass with the GIL released once (numpy
 * would take it back after each of some seven whole-array passes, and each time a busy
 * background thread can make the caller wait up to the switch interval). Row by row: the
 * mask row is copied and tested for any response token, then each array's row is copied and
 * checked while in cache. A value is bad when it is under the mask and not finite or out of
 * range (a log-prob above tol, an entropy below -tol); float32 data is compared in float32,
 * as numpy compares it. Python builds the messages from the first bad position reported. */

#define MAX_COPIES 4

typedef struct {
    Py_buffer src, dst;
    int entropy, is_double;
    Py_ssize_t bad; /* row-major index of the first bad value under the mask, -1 if none */
} Copy;

/* Whether a value is bad, on its bits (integer compares vectorise; float ones may not, as
 * they can trap): a log-prob is bad when it is NaN, infinite or above tol, that is when its
 * bits as a signed integer exceed tol's (every negative float is below) or when its magnitude
 * bits reach infinity's. An entropy is bad when its negation is a bad log-prob. */
#define BAD_BITS(u, U, S, ABS, INF, TOL) \
    (((S)(u) > (S)(TOL)) | (((u) & (ABS)) >= (INF)))

/* Copy one row of `cols` items of type T (bits U, signed S) from `src` (items `step` bytes
 * apart) to `dst`; if `check`, return the first bad column under the mask row `m` (NULL: every
 * column), else -1. An aligned contiguous row is tested as it is copied, with no branch per
 * value nor mask read (most rows are fine everywhere, padding included); a row with a bad value
 * somewhere is then searched for one under the mask. */
#define COPY_ROW(ATTR, NAME, T, U, S, SIGN, INF)                                              \
    ATTR static Py_ssize_t NAME(const char *src, Py_ssize_t step, T *dst, const unsigned char *m,  \
                           Py_ssize_t cols, T tol, int entropy, int check) {                  \
        U tol_bits, flip = entropy ? (U)SIGN : 0, bad = 0;                                     \
        memcpy(&tol_bits, &tol, sizeof tol_bits);                                             \
        U *__restrict out = (U *)dst;                                                         \
        if (!check && step == (Py_ssize_t)sizeof(T)) {                                        \
            memcpy(dst, src, (size_t)cols * sizeof(T));                                       \
            return -1;                                                                        \
        }                                                                                     \
        if (step == (Py_ssize_t)sizeof(T) && (uintptr_t)src % sizeof(T) == 0) {               \
            const U *__restrict in = (const U *)src;                                          \
            for (Py_ssize_t j = 0; j < cols; j++) {                                           \
                const U u = in[j];                                                            \
                out[j] = u;                                                                   \
                bad |= BAD_BITS(u ^ flip, U, S, (U)~(U)SIGN, (U)INF, tol_bits);               \
            }                                                                                 \
        } else {                                                                              \
            for (Py_ssize_t j = 0; j < cols; j++) memcpy(out + j, src + j * step, sizeof(T)); \
            if (!check) return -1;                                                            \
            for (Py_ssize_t j = 0; j < cols; j++)                                             \
                bad |= BAD_BITS(out[j] ^ flip, U, S, (U)~(U)SIGN, (U)INF, tol_bits);          \
        }                                                                                     \
        if (!bad) return -1;                                                                  \
        for (Py_ssize_t j = 0; j < cols; j++)                                                 \
            if ((!m || m[j]) && BAD_BITS(out[j] ^ flip, U, S, (U)~(U)SIGN, (U)INF, tol_bits)) \
                return j;                                                                     \
        return -1;                                                                            \
    }
#define F32 float, uint32_t, int32_t, 0x80000000u, 0x7f800000u
#define F64 double, uint64_t, int64_t, 0x8000000000000000ull, 0x7ff0000000000000ull
#define COPY_ROW_(...) COPY_ROW(__VA_ARGS__)
COPY_ROW_(, copy_row_f32, F32)
COPY_ROW_(, copy_row_f64, F64)
#ifdef HAVE_AVX2 /* the same loops, eight float32 (four float64) values at a time */
COPY_ROW_(AVX2, copy_row_f32_avx2, F32)
COPY_ROW_(AVX2, copy_row_f64_avx2, F64)
#endif
typedef Py_ssize_t (*CopyF32)(const char *, Py_ssize_t, float *, const unsigned char *, Py_ssize_t,
                              float, int, int);
typedef Py_ssize_t (*CopyF64)(const char *, Py_ssize_t, double *, const unsigned char *,
                              Py_ssize_t, double, int, int);

static void copy_rows(Copy *c, int n, const char *msrc, Py_ssize_t mstep0, Py_ssize_t mstep1,
                      unsigned char *mdst, Py_ssize_t rows, Py_ssize_t cols, double tol,
                      int check, int simd, Py_ssize_t *n_empty) {
    CopyF32 f32 = copy_row_f32;
    CopyF64 f64 = copy_row_f64;
#ifdef HAVE_AVX2
    if (simd && have_avx2()) {
        f32 = copy_row_f32_avx2;
        f64 = copy_row_f64_avx2;
    }
#else
    (void)simd;
#endif
    for (Py_ssize_t i = 0; i < rows; i++) {
        const unsigned char *m = NULL;
        if (mdst) {
            unsigned char *row = mdst + i * cols, any = 0;
            const char *s = msrc + i * mstep0;
            if (mstep1 == 1)
                memcpy(row, s, (size_t)cols);
            else
                for (Py_ssize_t j = 0; j < cols; j++) row[j] = (unsigned char)s[j * mstep1];
            for (Py_ssize_t j = 0; j < cols; j++) any |= row[j];
            *n_empty += !any;
            m = row;
        }
        for (int k = 0; k < n; k++) {
            const int test = check && c[k].bad < 0;
            const char *s = (const char *)c[k].src.buf + i * c[k].src.strides[0];
            const Py_ssize_t step = c[k].src.strides[1];
            Py_ssize_t j;
            if (c[k].is_double)
                j = f64(s, step, (double *)c[k].dst.buf + i * cols, m, cols, tol,
                                 c[k].entropy, test);
            else
                j = f32(s, step, (float *)c[k].dst.buf + i * cols, m, cols, (float)tol,
                                 c[k].entropy, test);
            if (j >= 0) c[k].bad = i * cols + j;
        }
    }
}

/* A (rows, cols) source of float32/float64 ("f"/"d") or bool ("?") items, any strides; its
 * destination a C-contiguous buffer of as many items of the same size. */
static int copy_views(PyObject *src, PyObject *dst, Py_buffer *vs, Py_buffer *vd,
                      Py_ssize_t shape[2], int is_mask) {
    vs->obj = vd->obj = NULL;
    if (PyObject_GetBuffer(src, vs, PyBUF_RECORDS_RO) < 0) return -1;
    const char *f = vs->format;
    const int ok_format = is_mask ? strcmp(f, "?") == 0 : strcmp(f, "f") == 0 || strcmp(f, "d") == 0;
    if (!ok_format || vs->ndim != 2) {
        PyErr_Format(PyExc_ValueError, "expected a 2-D array of %s, got format '%s' and %d dims",
                     is_mask ? "bool" : "float32 or float64", f, vs->ndim);
        goto fail;
    }
    if (shape[0] < 0) {
        shape[0] = vs->shape[0];
        shape[1] = vs->shape[1];
    } else if (vs->shape[0] != shape[0] || vs->shape[1] != shape[1]) {
        PyErr_SetString(PyExc_ValueError, "every source must have the same shape");
        goto fail;
    }
    if (PyObject_GetBuffer(dst, vd, PyBUF_CONTIG) < 0) goto fail;
    if (vd->itemsize != vs->itemsize || vd->len != vs->len) {
        PyErr_SetString(PyExc_ValueError, "a destination does not match its source's size");
        goto fail;
    }
    return 0;
fail:
    if (vs->obj) PyBuffer_Release(vs);
    if (vd->obj) PyBuffer_Release(vd);
    vs->obj = vd->obj = NULL;
    return -1;
}

static PyObject *copy_checked(PyObject *self, PyObject *args) {
    PyObject *srcs, *dsts, *entropy, *mask, *mask_dst;
    double tol;
    int check, simd;
    if (!PyArg_ParseTuple(args, "O!O!O!OOdpp", &PyTuple_Type, &srcs, &PyTuple_Type, &dsts,
                          &PyTuple_Type, &entropy, &mask, &mask_dst, &tol, &check, &simd))
        return NULL;
    const Py_ssize_t n = PyTuple_GET_SIZE(srcs);
    if (n < 1 || n > MAX_COPIES || PyTuple_GET_SIZE(dsts) != n ||
        PyTuple_GET_SIZE(entropy) != n || (mask == Py_None) != (mask_dst == Py_None))
        return PyErr_Format(PyExc_ValueError, "1 to %d sources, as many destinations and kinds, "
                            "and a mask with its destination or neither", MAX_COPIES);
    Copy c[MAX_COPIES];
    Py_buffer ms = {0}, md = {0};
    Py_ssize_t shape[2] = {-1, -1}, n_empty = 0;
    int got = 0;
    PyObject *out = NULL;
    for (; got < n; got++) {
        c[got].entropy = PyObject_IsTrue(PyTuple_GET_ITEM(entropy, got));
        if (c[got].entropy < 0 || copy_views(PyTuple_GET_ITEM(srcs, got),
                                             PyTuple_GET_ITEM(dsts, got), &c[got].src,
                                             &c[got].dst, shape, 0) < 0)
            goto done;
        c[got].is_double = c[got].src.itemsize == 8;
        c[got].bad = -1;
    }
    if (mask != Py_None && copy_views(mask, mask_dst, &ms, &md, shape, 1) < 0) goto done;
    Py_BEGIN_ALLOW_THREADS
    copy_rows(c, (int)n, ms.buf, ms.obj ? ms.strides[0] : 0, ms.obj ? ms.strides[1] : 0,
              md.buf, shape[0], shape[1], tol, check, simd, &n_empty);
    Py_END_ALLOW_THREADS
    PyObject *bad = PyTuple_New(n);
    for (Py_ssize_t k = 0; bad && k < n; k++) {
        PyObject *v = PyLong_FromSsize_t(c[k].bad);
        if (!v) Py_CLEAR(bad);
        else PyTuple_SET_ITEM(bad, k, v);
    }
    if (bad) out = Py_BuildValue("nN", n_empty, bad);
done:
    for (int k = 0; k < got; k++) {
        PyBuffer_Release(&c[k].src);
        PyBuffer_Release(&c[k].dst);
    }
    if (ms.obj) PyBuffer_Release(&ms);
    if (md.obj) PyBuffer_Release(&md);
    return out;
}

/* ---- a spilled step's write (monitor.ingest.spool, on log_step's thread) -------------------
 * os.writev releases the GIL, and log_step may then wait up to the switch interval to take it
 * back from a busy writer thread; a few MB into the page cache take about a millisecond, so
 * the caller's spill writes while holding it. Returns the bytes written, which may be fewer
 * than given (a short write, or parts beyond the first MAX_PARTS: the caller writes the
 * rest); OSError on failure. */
#ifndef _WIN32
#include <errno.h>
#include <sys/uio.h>

#define MAX_PARTS 64

static PyObject *writev_holding_gil(PyObject *self, PyObject *args) {
    int fd;
    PyObject *parts;
    if (!PyArg_ParseTuple(args, "iO!", &fd, &PyList_Type, &parts)) return NULL;
    const Py_ssize_t n = PyList_GET_SIZE(parts) < MAX_PARTS ? PyList_GET_SIZE(parts) : MAX_PARTS;
    Py_buffer views[MAX_PARTS];
    struct iovec iov[MAX_PARTS];
    Py_ssize_t got = 0, done = -1;
    for (; got < n; got++) {
        if (PyObject_GetBuffer(PyList_GET_ITEM(parts, got), &views[got], PyBUF_SIMPLE) < 0)
            goto out;
        iov[got].iov_base = views[got].buf;
        iov[got].iov_len = (size_t)views[got].len;
    }
    do {
        done = writev(fd, iov, (int)n);
    } while (done < 0 && errno == EINTR && !PyErr_CheckSignals());
    if (done < 0 && !PyErr_Occurred()) PyErr_SetFromErrno(PyExc_OSError);
out:
    for (Py_ssize_t k = 0; k < got; k++) PyBuffer_Release(&views[k]);
    return done < 0 ? NULL : PyLong_FromSsize_t(done);
}
#endif

/* first_level over a whole batch: one level for every row range (see cand at the top). */
static PyObject *sampled_level(PyObject *self, PyObject *args) {
    PyObject *objs[5] = {NULL, NULL, NULL, Py_None, Py_None};
    Inputs in;
    double share;
    if (!PyArg_ParseTuple(args, "OOOnnpd", &objs[0], &objs[1], &objs[2], &in.rows, &in.cols,
                          &in.is_double, &share))
        return NULL;
    Py_buffer views[5];
    if (get_buffers(objs, views, &in) < 0) return NULL;
    double level;
    Py_BEGIN_ALLOW_THREADS
    level = first_level(&in, share);
    Py_END_ALLOW_THREADS
    release(views, 5);
    return PyFloat_FromDouble(level);
}

static PyObject *py_has_avx2(PyObject *self, PyObject *unused) {
#ifdef HAVE_AVX2
    return PyBool_FromLong(have_avx2());
#else
    return PyBool_FromLong(0);
#endif
}

static PyMethodDef methods[] = {
    {"has_avx2", py_has_avx2, METH_NOARGS, "Whether stats() can use its AVX2 loop here."},
    {"stats", stats, METH_VARARGS,
     "stats(policy, ref, mask, rollout, entropies, rows, cols, is_double, tol, simd,"
     " keep, start, coef, seq, sums, hist, cand) -> (status, bad_row, n_cand, used_simd)"},
    {"sampled_level", sampled_level, METH_VARARGS,
     "sampled_level(policy, ref, mask, rows, cols, is_double, share) -> the first level of"
     " the candidates, from a sample of the whole batch (0 when it is too small)"},
    {"ledger_add", ledger_add, METH_VARARGS,
     "ledger_add(ids, policy, ref, mask, rows, cols, is_double, acc, touched, n_touched)"
     " -> (status, n_touched)"},
    {"ledger_merge", ledger_merge, METH_VARARGS,
     "ledger_merge(acc, touched, n, src_acc, src_touched, src_n) -> n"},
    {"ledger_take", ledger_take, METH_VARARGS,
     "ledger_take(acc, touched, n, out_ids, out_counts, out_sums) -> None"},
#ifndef _WIN32
    {"writev_holding_gil", writev_holding_gil, METH_VARARGS,
     "writev_holding_gil(fd, parts) -> bytes written (os.writev without releasing the GIL)"},
#endif
    {"copy_checked", copy_checked, METH_VARARGS,
     "copy_checked(srcs, dsts, entropy, mask, mask_dst, tol, check, simd) -> (n_empty, first_bad)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "monitor._kernel",
                                    "Fused token pass of monitor.divergence.", -1, methods};

PyMODINIT_FUNC PyInit__kernel(void) {
    PyObject *m = PyModule_Create(&module);
    if (m && (PyModule_AddIntConstant(m, "N_SUMS", N_SUMS) < 0 ||
              PyModule_AddIntConstant(m, "DEGREE", DEGREE) < 0 ||
              PyModule_AddIntConstant(m, "LEDGER_ID_TOO_LARGE", LEDGER_ID_TOO_LARGE) < 0)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
