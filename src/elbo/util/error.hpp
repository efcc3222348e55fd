// Typed errors for the whole library. Library code throws; only the CLI turns an
// error into a message and an exit code (exit() in a rank would hang the others).
#pragma once

#include <stdexcept>
#include <string>

namespace elbo {

enum class ErrorKind { Usage, Config, Data, Io, Model, Dist, Numeric, Internal };

const char* error_kind_name(ErrorKind kind);

// Exit codes, one table for every command and job script (the SLURM scripts requeue
// on kExitStopped; README "Exit codes" lists them).
constexpr int kExitOk = 0;
constexpr int kExitFailure = 1;      // data, I/O, model, numeric or internal errors
constexpr int kExitBadInput = 2;     // usage or config errors: nothing was run
constexpr int kExitPeerFailure = 3;  // another rank failed, stalled or vanished
constexpr int kExitStopped = 75;     // stopped on request, resumable: requeue and --resume auto
constexpr int kExitForced = 76;      // stopped without a checkpoint (second signal or grace period over)

// The exit code for an error of `kind`.
constexpr int exit_code(ErrorKind kind) {
  return kind == ErrorKind::Usage || kind == ErrorKind::Config ? kExitBadInput : kExitFailure;
}

class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, const std::string& message) : std::runtime_error(message), m_kind(kind) {}
  ErrorKind kind() const { return m_kind; }

 private:
  ErrorKind m_kind;
};

// Convenience constructors so call sites read as `throw config_error(...)`.
inline Error usage_error(const std::string& m) { return Error(ErrorKind::Usage, m); }
inline Error config_error(const std::string& m) { return Error(ErrorKind::Config, m); }
inline Error data_error(const std::string& m) { return Error(ErrorKind::Data, m); }
inline Error io_error(const std::string& m) { return Error(ErrorKind::Io, m); }
inline Error model_error(const std::string& m) { return Error(ErrorKind::Model, m); }
inline Error dist_error(const std::string& m) { return Error(ErrorKind::Dist, m); }
inline Error numeric_error(const std::string& m) { return Error(ErrorKind::Numeric, m); }
inline Error internal_error(const std::string& m) { return Error(ErrorKind::Internal, m); }

namespace detail {
[[noreturn]] void throw_call_failed(ErrorKind kind, const char* call, const char* file, int line,
                                    const std::string& detail);
}  // namespace detail

// Internal invariant violated: a bug in elbo, not in the user's input.
#define ELBO_ASSERT(cond, msg)                                                                  \
  do {                                                                                          \
    if (!(cond))                                                                                \
      ::elbo::detail::throw_call_failed(::elbo::ErrorKind::Internal, #cond, __FILE__, __LINE__, \
                                        (msg));                                                 \
  } while (0)

}  // namespace elbo
