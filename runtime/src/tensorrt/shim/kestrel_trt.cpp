// Kestrel's C shim over TensorRT 11's C++ API (the `tensorrt` backend of kestrel-runtime).
//
// Header-only use of TensorRT: the interface classes dispatch through virtual calls into
// libnvinfer, and the three factory functions come in as pointers that Rust resolved with dlsym, so
// this file needs no libnvinfer at link time and the Rust binary runs (and says what is missing)
// where TensorRT is absent. Every function catches everything: no C++ exception crosses into Rust.
// Status codes are `KtStatus` below; Rust maps them to messages (runtime/src/tensorrt/ffi.rs).
#include <NvInfer.h>
#include <NvOnnxParser.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <string>

extern "C" {

typedef void (*kt_log_fn)(void* user, int32_t severity, char const* message);
typedef void* (*kt_create_builder_fn)(void* logger, int32_t version);
typedef void* (*kt_create_runtime_fn)(void* logger, int32_t version);
typedef void* (*kt_create_parser_fn)(void* network, void* logger, int32_t version);

enum KtStatus : int32_t {
    KT_OK = 0,
    KT_CREATE_BUILDER = 1,
    KT_CREATE_NETWORK = 2,
    KT_CREATE_PARSER = 3,
    KT_PARSE = 4,
    KT_NO_INPUT = 5,
    KT_PROFILE = 6,
    KT_CREATE_CONFIG = 7,
    KT_TIMING_CACHE = 8,
    KT_BUILD = 9,
    KT_CREATE_RUNTIME = 10,
    KT_DESERIALIZE = 11,
    KT_CREATE_CONTEXT = 12,
    KT_INPUT_SHAPE = 13,
    KT_TENSOR_ADDRESS = 14,
    KT_ENQUEUE = 15,
    KT_UNKNOWN_TENSOR = 16,
    KT_EXCEPTION = 17,
    KT_NULL_ARGUMENT = 18,
};

// What to build (see runtime/src/tensorrt/options.rs for how Kestrel's options map to it).
struct KtBuildConfig {
    char const* input_name;
    int64_t channels;
    int64_t height;
    int64_t width;
    int64_t batch_min;
    int64_t batch_opt;
    int64_t batch_max;
    uint64_t workspace_bytes;          // 0: TensorRT's default (the device's memory)
    int32_t hardware_compatibility;    // nvinfer1::HardwareCompatibilityLevel
    int32_t version_compatible;        // BuilderFlag::kVERSION_COMPATIBLE
    int32_t exclude_lean_runtime;      // BuilderFlag::kEXCLUDE_LEAN_RUNTIME (with the above)
    int32_t optimization_level;        // -1: TensorRT's default (3)
    void const* timing_cache;          // a serialized timing cache, or null
    uint64_t timing_cache_len;
};

// Bytes TensorRT owns (an IHostMemory); release with kt_blob_free.
struct KtBlob {
    void const* data;
    uint64_t len;
    void* handle;
};

}  // extern "C"

namespace {

class Logger final : public nvinfer1::ILogger {
public:
    Logger(kt_log_fn fn, void* user) : fn_(fn), user_(user) {}
    void log(Severity severity, nvinfer1::AsciiChar const* msg) noexcept override {
        if (fn_ != nullptr && msg != nullptr) {
            fn_(user_, static_cast<int32_t>(severity), msg);
        }
    }
    void error(std::string const& msg) noexcept { log(Severity::kERROR, msg.c_str()); }

private:
    kt_log_fn fn_;
    void* user_;
};

template <typename T>
struct Deleter {
    void operator()(T* p) const noexcept { delete p; }
};
template <typename T>
using Owned = std::unique_ptr<T, Deleter<T>>;

void set_blob(KtBlob* blob, nvinfer1::IHostMemory* mem) {
    blob->data = mem != nullptr ? mem->data() : nullptr;
    blob->len = mem != nullptr ? static_cast<uint64_t>(mem->size()) : 0;
    blob->handle = mem;
}

nvinfer1::Dims dims_of(int64_t const* d, int32_t nb) {
    nvinfer1::Dims dims{};
    dims.nbDims = nb;
    for (int32_t i = 0; i < nb && i < nvinfer1::Dims::MAX_DIMS; ++i) {
        dims.d[i] = d[i];
    }
    return dims;
}

int32_t build(kt_create_builder_fn create_builder, kt_create_parser_fn create_parser, Logger* logger,
              void const* onnx, uint64_t onnx_len, KtBuildConfig const* cfg, KtBlob* plan,
              KtBlob* timing_cache, int32_t* timing_cache_reset) {
    using namespace nvinfer1;
    Owned<IBuilder> builder(static_cast<IBuilder*>(create_builder(logger, NV_TENSORRT_VERSION)));
    if (!builder) return KT_CREATE_BUILDER;
    // TensorRT 11 networks are strongly typed: no flag (kSTRONGLY_TYPED is deprecated, implied).
    Owned<INetworkDefinition> network(builder->createNetworkV2(0));
    if (!network) return KT_CREATE_NETWORK;
    Owned<nvonnxparser::IParser> parser(
        static_cast<nvonnxparser::IParser*>(create_parser(network.get(), logger, NV_ONNX_PARSER_VERSION)));
    if (!parser) return KT_CREATE_PARSER;
    if (!parser->parse(onnx, static_cast<size_t>(onnx_len), nullptr)) {
        for (int i = 0; i < parser->getNbErrors(); ++i) {
            auto const* e = parser->getError(i);
            if (e == nullptr) continue;
            std::string msg = std::string("ONNX parser: ") + e->desc();
            if (e->nodeName() != nullptr && e->nodeName()[0] != '\0') {
                msg += std::string(" (node ") + e->nodeName() + ", " + e->nodeOperator() + ")";
            }
            logger->error(msg);
        }
        return KT_PARSE;
    }
    bool found = false;
    for (int32_t i = 0; i < network->getNbInputs(); ++i) {
        if (std::strcmp(network->getInput(i)->getName(), cfg->input_name) == 0) found = true;
    }
    if (!found) return KT_NO_INPUT;

    Owned<IBuilderConfig> config(builder->createBuilderConfig());
    if (!config) return KT_CREATE_CONFIG;
    IOptimizationProfile* profile = builder->createOptimizationProfile();
    if (profile == nullptr) return KT_PROFILE;
    int64_t const chw[3] = {cfg->channels, cfg->height, cfg->width};
    int64_t const batches[3] = {cfg->batch_min, cfg->batch_opt, cfg->batch_max};
    OptProfileSelector const selectors[3] = {OptProfileSelector::kMIN, OptProfileSelector::kOPT,
                                             OptProfileSelector::kMAX};
    for (int k = 0; k < 3; ++k) {
        int64_t const d[4] = {batches[k], chw[0], chw[1], chw[2]};
        if (!profile->setDimensions(cfg->input_name, selectors[k], dims_of(d, 4))) return KT_PROFILE;
    }
    if (config->addOptimizationProfile(profile) < 0) return KT_PROFILE;
    if (cfg->workspace_bytes > 0) {
        config->setMemoryPoolLimit(MemoryPoolType::kWORKSPACE, static_cast<size_t>(cfg->workspace_bytes));
    }
    config->setHardwareCompatibilityLevel(static_cast<HardwareCompatibilityLevel>(cfg->hardware_compatibility));
    if (cfg->version_compatible != 0) {
        config->setFlag(BuilderFlag::kVERSION_COMPATIBLE);
        if (cfg->exclude_lean_runtime != 0) config->setFlag(BuilderFlag::kEXCLUDE_LEAN_RUNTIME);
    }
    if (cfg->optimization_level >= 0) config->setBuilderOptimizationLevel(cfg->optimization_level);

    // The timing cache: the previous builds' measurements, or a fresh one where they do not fit.
    *timing_cache_reset = 0;
    Owned<ITimingCache> cache(
        config->createTimingCache(cfg->timing_cache, cfg->timing_cache != nullptr ? cfg->timing_cache_len : 0));
    if (!cache && cfg->timing_cache != nullptr) {
        *timing_cache_reset = 1;
        cache.reset(config->createTimingCache(nullptr, 0));
    }
    if (!cache) return KT_TIMING_CACHE;
    if (!config->setTimingCache(*cache, false)) {
        *timing_cache_reset = 1;
        cache.reset(config->createTimingCache(nullptr, 0));
        if (!cache || !config->setTimingCache(*cache, false)) return KT_TIMING_CACHE;
    }

    IHostMemory* serialized = builder->buildSerializedNetwork(*network, *config);
    if (serialized == nullptr) return KT_BUILD;
    set_blob(plan, serialized);
    ITimingCache const* used = config->getTimingCache();
    set_blob(timing_cache, used != nullptr ? used->serialize() : nullptr);
    return KT_OK;
}

}  // namespace

extern "C" {

// The TensorRT version these headers declare (major * 10000 + minor * 100 + patch).
int32_t kt_header_version() { return NV_TENSORRT_VERSION; }

void* kt_logger_new(kt_log_fn fn, void* user) {
    try {
        return new Logger(fn, user);
    } catch (...) {
        return nullptr;
    }
}

void kt_logger_free(void* logger) { delete static_cast<Logger*>(logger); }

void kt_blob_free(KtBlob* blob) {
    if (blob == nullptr) return;
    delete static_cast<nvinfer1::IHostMemory*>(blob->handle);
    blob->data = nullptr;
    blob->len = 0;
    blob->handle = nullptr;
}

int32_t kt_build(kt_create_builder_fn create_builder, kt_create_parser_fn create_parser, void* logger,
                 void const* onnx, uint64_t onnx_len, KtBuildConfig const* cfg, KtBlob* plan,
                 KtBlob* timing_cache, int32_t* timing_cache_reset) {
    if (create_builder == nullptr || create_parser == nullptr || logger == nullptr || onnx == nullptr ||
        cfg == nullptr || cfg->input_name == nullptr || plan == nullptr || timing_cache == nullptr ||
        timing_cache_reset == nullptr) {
        return KT_NULL_ARGUMENT;
    }
    *plan = KtBlob{nullptr, 0, nullptr};
    *timing_cache = KtBlob{nullptr, 0, nullptr};
    try {
        return build(create_builder, create_parser, static_cast<Logger*>(logger), onnx, onnx_len, cfg, plan,
                     timing_cache, timing_cache_reset);
    } catch (std::exception const& e) {
        static_cast<Logger*>(logger)->error(std::string("exception: ") + e.what());
        return KT_EXCEPTION;
    } catch (...) {
        return KT_EXCEPTION;
    }
}

// A runtime (IRuntime*), or null. `allow_host_code`: version-compatible plans carry a lean runtime.
void* kt_runtime_new(kt_create_runtime_fn create_runtime, void* logger, int32_t allow_host_code) {
    if (create_runtime == nullptr || logger == nullptr) return nullptr;
    try {
        auto* runtime = static_cast<nvinfer1::IRuntime*>(create_runtime(logger, NV_TENSORRT_VERSION));
        if (runtime != nullptr && allow_host_code != 0) runtime->setEngineHostCodeAllowed(true);
        return runtime;
    } catch (...) {
        return nullptr;
    }
}

void kt_runtime_free(void* runtime) { delete static_cast<nvinfer1::IRuntime*>(runtime); }

// An engine (ICudaEngine*) from a serialized plan, or null (the logger says why).
void* kt_engine_new(void* runtime, void const* plan, uint64_t len) {
    if (runtime == nullptr || plan == nullptr) return nullptr;
    try {
        return static_cast<nvinfer1::IRuntime*>(runtime)->deserializeCudaEngine(plan, static_cast<size_t>(len));
    } catch (...) {
        return nullptr;
    }
}

void kt_engine_free(void* engine) { delete static_cast<nvinfer1::ICudaEngine*>(engine); }

int32_t kt_engine_io_count(void* engine) {
    return engine != nullptr ? static_cast<nvinfer1::ICudaEngine*>(engine)->getNbIOTensors() : 0;
}

char const* kt_engine_io_name(void* engine, int32_t index) {
    return engine != nullptr ? static_cast<nvinfer1::ICudaEngine*>(engine)->getIOTensorName(index) : nullptr;
}

// 1 input, 2 output, 0 unknown name (nvinfer1::TensorIOMode).
int32_t kt_engine_io_mode(void* engine, char const* name) {
    if (engine == nullptr || name == nullptr) return 0;
    return static_cast<int32_t>(static_cast<nvinfer1::ICudaEngine*>(engine)->getTensorIOMode(name));
}

// nvinfer1::DataType of a tensor.
int32_t kt_engine_io_dtype(void* engine, char const* name) {
    if (engine == nullptr || name == nullptr) return -1;
    return static_cast<int32_t>(static_cast<nvinfer1::ICudaEngine*>(engine)->getTensorDataType(name));
}

// A tensor's shape as the engine declares it (-1 for dynamic); returns the rank (-1: unknown).
int32_t kt_engine_io_shape(void* engine, char const* name, int64_t* dims, int32_t capacity) {
    if (engine == nullptr || name == nullptr || dims == nullptr) return -1;
    nvinfer1::Dims d = static_cast<nvinfer1::ICudaEngine*>(engine)->getTensorShape(name);
    for (int32_t i = 0; i < d.nbDims && i < capacity; ++i) dims[i] = d.d[i];
    return d.nbDims;
}

void* kt_context_new(void* engine) {
    if (engine == nullptr) return nullptr;
    try {
        return static_cast<nvinfer1::ICudaEngine*>(engine)->createExecutionContext();
    } catch (...) {
        return nullptr;
    }
}

void kt_context_free(void* context) { delete static_cast<nvinfer1::IExecutionContext*>(context); }

int32_t kt_context_set_input_shape(void* context, char const* name, int64_t const* dims, int32_t rank) {
    if (context == nullptr || name == nullptr || dims == nullptr) return KT_NULL_ARGUMENT;
    if (rank < 0 || rank > nvinfer1::Dims::MAX_DIMS) return KT_INPUT_SHAPE;
    return static_cast<nvinfer1::IExecutionContext*>(context)->setInputShape(name, dims_of(dims, rank))
               ? KT_OK
               : KT_INPUT_SHAPE;
}

// The shape of a tensor for the current input shapes; returns the rank (-1: unknown).
int32_t kt_context_shape(void* context, char const* name, int64_t* dims, int32_t capacity) {
    if (context == nullptr || name == nullptr || dims == nullptr) return -1;
    nvinfer1::Dims d = static_cast<nvinfer1::IExecutionContext*>(context)->getTensorShape(name);
    for (int32_t i = 0; i < d.nbDims && i < capacity; ++i) dims[i] = d.d[i];
    return d.nbDims;
}

int32_t kt_context_set_tensor_address(void* context, char const* name, void* address) {
    if (context == nullptr || name == nullptr) return KT_NULL_ARGUMENT;
    return static_cast<nvinfer1::IExecutionContext*>(context)->setTensorAddress(name, address) ? KT_OK
                                                                                               : KT_TENSOR_ADDRESS;
}

int32_t kt_context_enqueue(void* context, void* stream) {
    if (context == nullptr) return KT_NULL_ARGUMENT;
    try {
        return static_cast<nvinfer1::IExecutionContext*>(context)->enqueueV3(static_cast<cudaStream_t>(stream))
                   ? KT_OK
                   : KT_ENQUEUE;
    } catch (...) {
        return KT_EXCEPTION;
    }
}

}  // extern "C"
