/* The sampler of the compiled generation loops, shared by both: the Cython loop (csrc/_decode.pyx)
   calls it directly, the Numba loop (fastchar/backends/numba_decode.py) by symbol name. The Python
   reference is fastchar/sampler.py (token_probs, sample_token); see fc_sample.c. */
#ifndef FC_SAMPLE_H
#define FC_SAMPLE_H

#include <stdint.h>

void fc_token_probs(const float *logits, int64_t V, double temperature, int64_t top_k, double top_p,
                    double *probs, double *tmp, int32_t *order);
int64_t fc_sample(const float *logits, int64_t V, double temperature, int64_t top_k, double top_p, double u,
                  double *work, int32_t *order);

#endif
