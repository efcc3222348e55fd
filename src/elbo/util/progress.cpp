#include "elbo/util/progress.hpp"

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace elbo {

std::string format_duration(double seconds) {
  const long s = std::max(0L, static_cast<long>(seconds + 0.5));
  char buf[32];
  if (s >= 3600)
    std::snprintf(buf, sizeof(buf), "%ld:%02ld:%02ld", s / 3600, (s / 60) % 60, s % 60);
  else
    std::snprintf(buf, sizeof(buf), "%02ld:%02ld", s / 60, s % 60);
  return buf;
}

Progress::Progress(std::string label, int64_t total, bool enabled, bool lines)
    : m_label(std::move(label)), m_total(std::max<int64_t>(1, total)), m_mode(Mode::Off) {
  m_start = m_last_draw = std::chrono::steady_clock::now();
  if (!enabled) return;
  const char* env = std::getenv("ELBO_PROGRESS");
  if (env != nullptr && std::strcmp(env, "off") == 0) return;
  if (env != nullptr && std::strcmp(env, "bar") == 0)
    m_mode = Mode::Bar;
  else if (env != nullptr && std::strcmp(env, "lines") == 0)
    m_mode = Mode::Lines;
  else
    m_mode = isatty(STDERR_FILENO) ? Mode::Bar : Mode::Lines;
  if (m_mode == Mode::Lines && !lines) m_mode = Mode::Off;
}

void Progress::clear() {
  if (m_mode != Mode::Bar || !m_drawn) return;
  std::fputs("\r\033[K", stderr);
  std::fflush(stderr);
  m_drawn = false;
}

Progress::~Progress() {
  if (!m_finished) finish();
}

void Progress::update(int64_t done) {
  if (m_mode == Mode::Off) return;
  m_done = std::clamp<int64_t>(done, 0, m_total);
  if (m_mode == Mode::Bar) {
    const auto now = std::chrono::steady_clock::now();
    if (now - m_last_draw < std::chrono::milliseconds(100)) return;
    m_last_draw = now;
    draw(false);
  } else if (m_done * 10 >= static_cast<int64_t>(m_next_decile) * m_total && m_done < m_total) {
    while (m_done * 10 >= static_cast<int64_t>(m_next_decile) * m_total) ++m_next_decile;
    draw(false);
  }
}

void Progress::finish() {
  if (m_finished) return;
  m_finished = true;
  if (m_mode != Mode::Off) draw(true);
}

void Progress::draw(bool final) {
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - m_start).count();
  const double frac = static_cast<double>(m_done) / static_cast<double>(m_total);
  const double rate = secs > 0 ? static_cast<double>(m_done) / secs : 0.0;
  std::string eta = final || rate <= 0 ? "" : " eta " + format_duration((m_total - m_done) / rate);
  char tail[160];
  std::snprintf(tail, sizeof(tail), "%3.0f%% %lld/%lld [%s, %.4g/s%s]", 100.0 * frac, static_cast<long long>(m_done),
                static_cast<long long>(m_total), format_duration(secs).c_str(), rate, eta.c_str());
  if (m_mode == Mode::Bar) {
    constexpr int kWidth = 30;
    const int filled = static_cast<int>(frac * kWidth);
    std::string bar(static_cast<size_t>(filled), '#');
    bar.resize(kWidth, '.');
    // \r and a clear-to-end-of-line escape: the bar redraws in place.
    std::fprintf(stderr, "\r%s |%s| %s\033[K%s", m_label.c_str(), bar.c_str(), tail, final ? "\n" : "");
    m_drawn = !final;
  } else {
    std::fprintf(stderr, "%s: %s\n", m_label.c_str(), tail);
  }
  std::fflush(stderr);
}

}  // namespace elbo
