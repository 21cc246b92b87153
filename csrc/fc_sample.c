/* Drawing a token from logits, as fastchar/sampler.py's sample_token does, in float64 and plain
   sequential sums (the Python reference sums pairwise: the two agree to ~1e-15 relative, and the
   sampler tests bound the difference). No allocation, no state: the caller passes the scratch. */
#include "fc_sample.h"

#include <math.h>

/* probs (V,) = softmax(logits / temperature), then top-k (keep values >= the k-th largest, ties
   kept; top_k <= 0 or >= V: off), then top-p (the smallest set of most likely ids, ties by lower id,
   whose mass reaches top_p of the total, renormalised; top_p >= 1: off). tmp (V,), order (V,) scratch. */
void fc_token_probs(const float *logits, int64_t V, double temperature, int64_t top_k, double top_p,
                    double *probs, double *tmp, int32_t *order) {
    int64_t j, i, keep;
    double mx, total, mass, target, v, kth;
    for (j = 0; j < V; j++) probs[j] = (double)logits[j] / temperature;
    if (top_k > 0 && top_k < V) {
        /* the k-th largest value with multiplicity: insertion sort descending into tmp */
        for (j = 0; j < V; j++) {
            v = probs[j];
            for (i = j; i > 0 && tmp[i - 1] < v; i--) tmp[i] = tmp[i - 1];
            tmp[i] = v;
        }
        kth = tmp[top_k - 1];
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
    /* stable descending order by probability, then the first prefix whose mass reaches the target */
    for (j = 0; j < V; j++) {
        for (i = j; i > 0 && probs[order[i - 1]] < probs[j]; i--) order[i] = order[i - 1];
        order[i] = (int32_t)j;
    }
    mass = 0.0;
    for (j = 0; j < V; j++) {
        mass += probs[order[j]];
        tmp[j] = mass;
    }
    target = top_p * tmp[V - 1];
    keep = V;
    for (j = 0; j < V; j++)
        if (tmp[j] >= target) { keep = j + 1; break; }
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
