// Portability macros shared by every kdops source: the same header compiles as plain C++ (CPU
// kernels) and under nvcc (CUDA kernels), so per-element math can be written once.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define KD_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define KD_HOST_DEVICE inline __attribute__((always_inline))
#endif
