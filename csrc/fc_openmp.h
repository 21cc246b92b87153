/* OpenMP's runtime calls, or their one-thread stand-ins when the compiler has no OpenMP.

   setup.py passes the OpenMP flags only when a test program including <omp.h> compiles and links
   (Apple clang without Homebrew's libomp, or Debian's clang without libomp-dev, have none). Without
   them _OPENMP is undefined, Cython's prange loops run serially, and these functions report one
   thread, so the kernels size their work for one thread and compute the same values. */
#ifndef FC_OPENMP_H
#define FC_OPENMP_H

#ifdef _OPENMP
#include <omp.h>
#define FC_HAVE_OPENMP 1
static inline int fc_omp_max_threads(void) { return omp_get_max_threads(); }
static inline void fc_omp_set_num_threads(int n) { omp_set_num_threads(n); }
#else
#define FC_HAVE_OPENMP 0
static inline int fc_omp_max_threads(void) { return 1; }
static inline void fc_omp_set_num_threads(int n) { (void)n; }
#endif

#endif
