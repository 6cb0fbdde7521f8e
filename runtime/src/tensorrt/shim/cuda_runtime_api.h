// Kestrel's stand-in for CUDA's cuda_runtime_api.h, which the TensorRT headers include. The shim
// only passes streams and events through, so it needs the two handle types and nothing else; they
// are declared exactly as CUDA declares them (pointers to opaque driver structs), so the ABI is the
// same. Builds against a real CUDA install may put its include folder first instead.
#pragma once
typedef struct CUstream_st* cudaStream_t;
typedef struct CUevent_st* cudaEvent_t;
