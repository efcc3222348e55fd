// FNV-1a, 64 bit: the checksum of checkpoints and model files. Not cryptographic, but
// any flipped bit changes it, and it streams over arrays without copying them.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <string>

namespace elbo {

class Fnv1a64 {
 public:
  void update(const void* data, size_t size) {
    const auto* p = static_cast<const unsigned char*>(data);
    for (size_t i = 0; i < size; ++i) {
      m_hash ^= p[i];
      m_hash *= 1099511628211ull;
    }
  }
  uint64_t value() const { return m_hash; }
  // 16 lower-case hex digits, as stored in the files' attributes.
  std::string hex() const {
    char buf[20];
    std::snprintf(buf, sizeof(buf), "%016llx", static_cast<unsigned long long>(m_hash));
    return buf;
  }

 private:
  uint64_t m_hash = 1469598103934665603ull;
};

}  // namespace elbo
