/* Drawing a token from logits, as fastchar/sampler.py's sample_token does, in float64 and plain
   sequential sums (the Python reference sums pairwise: the two agree to ~1e-15 relative, and the
   sampler tests bound the difference). No allocation, no state: the caller passes the scratch. */
#include "fc_sample.h"

#include <math.h>

/* The k-th largest (k from 0) of a[0..n-1], with multiplicity: Hoare's selection, average O(n)
   instead of a full sort. Reorders a. */
static double fc_kth_largest(double *a, int64_t n, int64_t k) {
    int64_t lo = 0, hi = n - 1, i, j;
    double pivot, t;
    while (lo < hi) {
        pivot = a[lo + (hi - lo) / 2];
        i = lo;
        j = hi;
        while (i <= j) {
            while (a[i] > pivot) i++;
            while (a[j] < pivot) j--;
            if (i <= j) {
                t = a[i];
                a[i] = a[j];
                a[j] = t;
                i++;
                j--;
            }
        }
        if (k <= j) hi = j;
        else if (k >= i) lo = i;
        else return a[k];
    }
    return a[k];
}

/* The ids whose probability is >= bound into order, most likely first (lower id on ties: an
   insertion sort, stable); returns how many. */
static int64_t fc_sorted_ids(const double *probs, int64_t V, double bound, int32_t *order) {
    int64_t j, c, n = 0;
    for (j = 0; j < V; j++) {
        if (!(probs[j] >= bound)) continue;
        for (c = n; c > 0 && probs[order[c - 1]] < probs[j]; c--) order[c] = order[c - 1];
        order[c] = (int32_t)j;
        n++;
    }
    return n;
}

/* How many of order[0..n) their sum, in that order, needs to reach target; V if it does not. */
static int64_t fc_reach(const double *probs, const int32_t *order, int64_t n, int64_t V, double target) {
    double mass = 0.0;
    for (int64_t i = 0; i < n; i++) {
        mass += probs[order[i]];
        if (mass >= target) return i + 1;
    }
    return V;
}

/* probs (V,) = softmax(logits / temperature), then top-k (keep values >= the k-th largest, ties
   kept; top_k <= 0 or >= V: off), then top-p (the smallest set of most likely ids, ties by lower id,
   whose mass reaches top_p of the total, renormalised; top_p >= 1: off). tmp (V,), order (V,) scratch.
   Neither filter sorts V ids: top-k selects the k-th value (fc_kth_largest); top-p sorts only the
   candidates that can reach the mass (below), a handful for a trained model, and takes ids in
   exactly the sorted reference's order. */
void fc_token_probs(const float *logits, int64_t V, double temperature, int64_t top_k, double top_p,
                    double *probs, double *tmp, int32_t *order) {
    int64_t j, keep, n;
    double mx, total, target, kth;
    /* (logit - max) / temperature: a tiny temperature (1e-308) gives -inf and 0, never inf - inf */
    mx = logits[0];
    for (j = 1; j < V; j++) mx = logits[j] > mx ? logits[j] : mx;
    for (j = 0; j < V; j++) probs[j] = ((double)logits[j] - mx) / temperature;
    if (top_k > 0 && top_k < V) {
        for (j = 0; j < V; j++) tmp[j] = probs[j];
        kth = fc_kth_largest(tmp, V, top_k - 1);
        for (j = 0; j < V; j++)
            if (!(probs[j] >= kth)) probs[j] = -INFINITY;
    }
    mx = probs[0];
    for (j = 1; j < V; j++) mx = probs[j] > mx ? probs[j] : mx;
    total = 0.0;
    for (j = 0; j < V; j++) {
        probs[j] = exp(probs[j] - mx);
        total += probs[j];
    }
    for (j = 0; j < V; j++) probs[j] /= total;
    if (top_p >= 1.0) return;
    total = 0.0;
    for (j = 0; j < V; j++) total += probs[j];
    target = top_p * total;
    /* The candidates first: the ids of probability >= (1 - top_p) * total / V. The other ids hold
       less than V times that between them, so the candidates reach the target, and they are the
       head of the sorted order: the same ids and sums as sorting all V. All V only where the
       candidates fell short (rounding at the boundary, or a top_p <= 0). */
    n = fc_sorted_ids(probs, V, (1.0 - top_p) * total / (double)V, order);
    keep = fc_reach(probs, order, n, V, target);
    if (keep == V && n < V) {
        n = fc_sorted_ids(probs, V, -INFINITY, order);
        keep = fc_reach(probs, order, n, V, target);
    }
    if (keep == V) return;  /* everything kept: the distribution is unchanged */
    total = 0.0;
    for (j = 0; j < keep; j++) total += probs[order[j]];
    for (j = 0; j < V; j++) tmp[j] = 0.0;
    for (j = 0; j < keep; j++) tmp[order[j]] = probs[order[j]] / total;
    for (j = 0; j < V; j++) probs[j] = tmp[j];
}

/* A token id from logits (V,): greedy (argmax, lowest id on ties) when temperature is 0, else the
   first id whose cumulative probability exceeds u * total (u uniform in [0, 1)), at most V - 1.
   work (3V,) float64 and order (V,) scratch. */
int64_t fc_sample(const float *logits, int64_t V, double temperature, int64_t top_k, double top_p, double u,
                  double *work, int32_t *order) {
    int64_t j, best = 0;
    double *probs = work, *cdf = work + V, cum = 0.0, target;
    if (temperature == 0.0) {
        for (j = 1; j < V; j++)
            if (logits[j] > logits[best]) best = j;
        return best;
    }
    fc_token_probs(logits, V, temperature, top_k, top_p, probs, work + 2 * V, order);
    for (j = 0; j < V; j++) {
        cum += probs[j];
        cdf[j] = cum;
    }
    target = u * cdf[V - 1];
    for (j = 0; j < V; j++)
        if (cdf[j] > target) return j;
    return V - 1;
}
