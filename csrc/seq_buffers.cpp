// empty_seq: the time loops' sequence-sized buffers ([T, B, G] gates, outputs, gradients)
// from a small cache of freed blocks. Each call of a layer allocates the same few large
// buffers again; fresh ones must be faulted in and zeroed by the kernel first (perf, LSTM
// B64 H512 fwd+bwd on an AMD EPYC Zen 5 VM: 9% of the time in clear_page_erms). A block
// freed by one call is kept for the next of its size, as torch's CUDA caching allocator
// keeps device memory; the cache holds at most 1 GB (FASTCHAR_SEQ_CACHE_MB) and returns
// the rest.
// Blocks are 2 MB-aligned and advised for transparent huge pages before first touch
// (faulting a fresh 64 MB buffer: 24-35 ms in 4 KB pages, 4-6 ms in huge pages on such
// a VM). The profiler sees every allocation and free, as it does the CPU allocator's.
#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#include <cerrno>
#include <cstdlib>
#include <map>
#include <mutex>

#include "common.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastchar {
namespace {

constexpr size_t kHuge = size_t(1) << 21;           // 2 MB: the block granule and alignment
constexpr size_t kMinPooled = kHuge;                // smaller buffers use the CPU allocator

// The cache's limit: FASTCHAR_SEQ_CACHE_MB (0 turns it off), else 1 GB; a value that is
// not a whole number of MB warns (once) and keeps the default.
size_t max_held() {
  static const size_t limit = [] {
    const char* env = std::getenv("FASTCHAR_SEQ_CACHE_MB");
    if (env == nullptr || *env == '\0') {
      return size_t(1) << 30;
    }
    char* end = nullptr;
    errno = 0;
    const long long mb = std::strtoll(env, &end, 10);
    if (mb < 0 || *end != '\0' || errno == ERANGE || mb > (1LL << 43)) {
      TORCH_WARN("fastchar: FASTCHAR_SEQ_CACHE_MB=", env,
                 " is not a whole number of MB (0 turns the cache off); it holds the "
                 "default 1024 MB");
      return size_t(1) << 30;
    }
    return size_t(mb) << 20;
  }();
  return limit;
}

class SeqPool final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    size_t size = (n + kHuge - 1) / kHuge * kHuge;
    void* p = take(size);  // a cached block's size may be larger: `size` becomes it
    if (p == nullptr) {
      p = fresh(size);
    }
    {
      std::lock_guard<std::mutex> lock(mutex_);
      blocks_[p] = size;
      report(p, static_cast<int64_t>(n));
    }
    return {p, new Block{p, n}, &release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  static SeqPool& get() {
    static SeqPool* pool = new SeqPool();  // never destroyed: tensors may outlive statics
    return *pool;
  }

 private:
  struct Block {  // a DataPtr's context: its address and the bytes asked for
    void* p;
    size_t n;
  };

  // A cached block of at least `size` bytes (at most a quarter more), or nullptr; `size`
  // becomes the block's own size, which is what it holds when it is given back.
  void* take(size_t& size) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = free_.lower_bound(size);
    if (it == free_.end() || it->first > size + size / 4) {
      return nullptr;
    }
    void* p = it->second;
    size = it->first;
    held_ -= size;
    free_.erase(it);
    return p;
  }

  static void* fresh(size_t size) {
    void* p = nullptr;
    TORCH_CHECK(posix_memalign(&p, kHuge, size) == 0 && p != nullptr,
                "fastchar: could not allocate a ", size, "-byte sequence buffer");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    madvise(p, size, MADV_HUGEPAGE);  // advice only: where it is refused nothing changes
#endif
    return p;
  }

  static void release(void* ctx) {
    auto* b = static_cast<Block*>(ctx);
    get().give_back(b->p, b->n);
    delete b;
  }

  void give_back(void* p, size_t n) {
    std::lock_guard<std::mutex> lock(mutex_);
    report(p, -static_cast<int64_t>(n));
    auto it = blocks_.find(p);
    const size_t size = it->second;
    blocks_.erase(it);
    if (held_ + size <= max_held()) {
      free_.emplace(size, p);
      held_ += size;
    } else {
      std::free(p);
    }
  }

  // Called with mutex_ held.
  void report(void* p, int64_t bytes) {
    live_ += bytes;
    if (c10::memoryProfilingEnabled()) {
      c10::reportMemoryUsageToProfiler(p, bytes, static_cast<size_t>(live_),
                                       static_cast<size_t>(live_) + held_,
                                       c10::Device(c10::DeviceType::CPU));
    }
  }

  std::mutex mutex_;
  std::multimap<size_t, void*> free_;  // cached block size -> block
  std::map<void*, size_t> blocks_;     // blocks in use -> block size
  size_t held_ = 0;                    // bytes in free_
  int64_t live_ = 0;                   // bytes asked for by the tensors alive
};

}  // namespace

at::Tensor empty_seq(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const auto dtype = options.dtype().toScalarType();
  const size_t bytes = c10::multiply_integers(sizes) * c10::elementSize(dtype);
  if (bytes < kMinPooled) {
    return at::empty(sizes, options);
  }
  return at::detail::empty_generic(sizes, &SeqPool::get(),
                                   c10::DispatchKeySet(c10::DispatchKey::CPU), dtype, std::nullopt);
}

}  // namespace fastchar
