// Progress for long work (training epochs, evaluation, sharding), on stderr so that
// stdout keeps the results. On a terminal: one bar redrawn in place, at most ten
// times a second. Elsewhere (SLURM logs, pipes): a plain line at every 10%, so logs
// stay short and readable. ELBO_PROGRESS=bar|lines|off overrides the choice.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>

namespace elbo {

class Progress {
 public:
  // `enabled` false (e.g. on ranks other than 0) makes every call a no-op;
  // `lines` false shows the bar on a terminal and nothing elsewhere (for work that
  // already logs its own lines, such as training).
  Progress(std::string label, int64_t total, bool enabled = true, bool lines = true);
  ~Progress();  // finishes the line if finish() was not called
  Progress(const Progress&) = delete;
  Progress& operator=(const Progress&) = delete;

  void update(int64_t done);  // absolute amount of work done so far
  void finish();              // final state: 100% (or wherever it stopped) and a newline
  void clear();               // erase a drawn bar before other output; the next update redraws it

 private:
  enum class Mode { Off, Bar, Lines };
  void draw(bool final);

  std::string m_label;
  int64_t m_total, m_done = 0;
  Mode m_mode;
  bool m_finished = false;
  bool m_drawn = false;  // a bar is on the screen
  int m_next_decile = 1;
  std::chrono::steady_clock::time_point m_start, m_last_draw;
};

// "1:02:03" or "02:03".
std::string format_duration(double seconds);

}  // namespace elbo
