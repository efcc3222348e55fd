// Error formatting shared by every CHECK macro: "file:line call failed: detail".
#include "elbo/util/error.hpp"

#include <cstring>
#include <sstream>

namespace elbo {

const char* error_kind_name(ErrorKind kind) {
  switch (kind) {
    case ErrorKind::Usage: return "usage error";
    case ErrorKind::Config: return "config error";
    case ErrorKind::Data: return "data error";
    case ErrorKind::Io: return "I/O error";
    case ErrorKind::Model: return "model error";
    case ErrorKind::Dist: return "distributed error";
    case ErrorKind::Numeric: return "numerical error";
    case ErrorKind::Internal: return "internal error";
  }
  return "error";
}

namespace detail {

[[noreturn]] void throw_call_failed(ErrorKind kind, const char* call, const char* file, int line,
                                    const std::string& detail) {
  // Strip the build-machine prefix so messages show "src/elbo/...:42".
  const char* shown = std::strstr(file, "src/");
  if (shown == nullptr) shown = file;
  std::ostringstream msg;
  msg << shown << ":" << line << " " << call << " failed";
  if (!detail.empty()) msg << ": " << detail;
  throw Error(kind, msg.str());
}

}  // namespace detail
}  // namespace elbo
