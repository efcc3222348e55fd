// YAML -> ExperimentSpec with precise errors, --set overrides, and the resolved dump.
#include "elbo/config/spec.hpp"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

#include "elbo/util/error.hpp"

namespace elbo {

namespace {

// The --set argument that gave `key` its value: the one for the key itself or for the
// nearest mapping above it (--set model={...} sets model.latent too); "" when the value
// came from the file.
std::string override_covering(const std::map<std::string, std::string>& overrides, const std::string& key) {
  std::string best_path, best;
  for (const auto& [path, text] : overrides) {
    const bool covers =
        key == path || (key.rfind(path, 0) == 0 && (key[path.size()] == '.' || key[path.size()] == '['));
    if (covers && path.size() >= best_path.size()) {
      best_path = path;
      best = text;
    }
  }
  return best;
}

struct Context {
  std::string source;                           // file name for messages
  std::map<std::string, std::string> overrides;  // key path -> the --set argument that set it

  std::string override_for(const std::string& key) const { return override_covering(overrides, key); }

  // Where a key's value came from, for messages: "--set key=value" or "file:line"
  // (a node's line means nothing when an override put it there).
  std::string where(const std::string& key, const YAML::Node& at) const {
    if (std::string o = override_for(key); !o.empty()) return "--set " + o;
    if (at && at.Mark().line >= 0) return source + ":" + std::to_string(at.Mark().line + 1);
    return source;
  }
};

std::string join(const std::vector<std::string>& v) {
  std::string out;
  for (size_t i = 0; i < v.size(); ++i) out += (i ? ", " : "") + v[i];
  return out;
}

// Reads one YAML mapping, remembering which keys it consumed so that `finish`
// can reject the rest as unknown (a typo must not silently fall back to a default).
class MapReader {
 public:
  MapReader(YAML::Node node, std::string prefix, const Context& ctx)
      : m_node(std::move(node)), m_prefix(std::move(prefix)), m_ctx(ctx) {
    if (m_node && !m_node.IsNull() && !m_node.IsMap())
      fail(m_node, m_prefix.empty() ? "(top level)" : m_prefix.substr(0, m_prefix.size() - 1),
           "must be a mapping of keys to values");
    reject_duplicate_keys();
  }

  [[noreturn]] void fail(const YAML::Node& at, const std::string& key, const std::string& what) const {
    throw config_error(m_ctx.where(key, at) + ": " + key + ": " + what);
  }

  bool has(const std::string& key) {
    return m_node && m_node.IsMap() && m_node[key] && !m_node[key].IsNull();
  }

  YAML::Node raw(const std::string& key) {
    m_seen.insert(key);
    if (!m_node || !m_node.IsMap()) return YAML::Node();
    return m_node[key];
  }

  template <class T>
  T get(const std::string& key, T fallback) {
    YAML::Node n = raw(key);
    if (!n || n.IsNull()) return fallback;
    return convert<T>(n, m_prefix + key);
  }

  template <class T>
  T required(const std::string& key) {
    YAML::Node n = raw(key);
    if (!n || n.IsNull()) fail(m_node, m_prefix + key, "is required");
    return convert<T>(n, m_prefix + key);
  }

  std::string choice(const std::string& key, const std::string& fallback,
                     const std::vector<std::string>& valid) {
    std::string v = get<std::string>(key, fallback);
    for (const auto& c : valid)
      if (v == c) return v;
    fail(raw(key), m_prefix + key, "unknown value '" + v + "'; valid choices: " + join(valid));
  }

  std::vector<int> int_list(const std::string& key, std::vector<int> fallback) {
    YAML::Node n = raw(key);
    if (!n || n.IsNull()) return fallback;
    if (!n.IsSequence()) fail(n, m_prefix + key, "must be a list of integers, e.g. [400, 200]");
    std::vector<int> out;
    for (const auto& e : n) out.push_back(convert<int>(e, m_prefix + key));
    return out;
  }

  MapReader sub(const std::string& key) { return MapReader(raw(key), m_prefix + key + ".", m_ctx); }

  // A conv model's layer list: maps such as {type: conv2d, channels: 32, kernel: 4,
  // stride: 2, padding: 1}, or bare names for entries without settings (relu, flatten).
  std::vector<LayerSpec> layer_list(const std::string& key) {
    YAML::Node n = raw(key);
    const std::string where = m_prefix + key;
    if (!n || n.IsNull()) fail(m_node, where, "is required for model.type conv (a list of layers)");
    if (!n.IsSequence() || n.size() == 0)
      fail(n, where, "must be a non-empty list of layers, e.g. [{type: conv2d, channels: 32, kernel: 4, stride: 2, "
                     "padding: 1}, relu, ...]");
    static const std::vector<std::string> kTypes = {"linear", "conv2d", "conv_transpose2d", "group_norm", "relu",
                                                     "tanh", "softplus", "flatten", "reshape"};
    std::vector<LayerSpec> out;
    for (size_t i = 0; i < n.size(); ++i) {
      const std::string at = where + "[" + std::to_string(i) + "]";
      YAML::Node e = n[i];
      LayerSpec l;
      if (e.IsScalar()) {
        l.type = e.Scalar();
      } else {
        MapReader r(e, at + ".", m_ctx);
        l.type = r.required<std::string>("type");
        if (std::find(kTypes.begin(), kTypes.end(), l.type) == kTypes.end())
          fail(r.raw("type"), at + ".type", "unknown layer '" + l.type + "'; valid layers: " + join(kTypes));
        if (l.type == "linear") {
          l.features = r.required<int>("features");
          r.check(l.features >= 1, "features", "must be >= 1", l.features);
        } else if (l.type == "conv2d" || l.type == "conv_transpose2d") {
          l.channels = r.required<int>("channels");
          r.check(l.channels >= 1, "channels", "must be >= 1", l.channels);
          l.kernel = r.get<int>("kernel", l.kernel);
          r.check(l.kernel >= 1, "kernel", "must be >= 1", l.kernel);
          l.stride = r.get<int>("stride", l.stride);
          r.check(l.stride >= 1, "stride", "must be >= 1", l.stride);
          l.padding = r.get<int>("padding", l.padding);
          r.check(l.padding >= 0, "padding", "must be >= 0", l.padding);
          if (l.type == "conv_transpose2d") {
            l.output_padding = r.get<int>("output_padding", l.output_padding);
            r.check(l.output_padding >= 0 && l.output_padding < l.stride, "output_padding",
                    "must be >= 0 and smaller than the stride", l.output_padding);
          }
        } else if (l.type == "group_norm") {
          l.groups = r.required<int>("groups");
          r.check(l.groups >= 1, "groups", "must be >= 1", l.groups);
        } else if (l.type == "reshape") {
          l.shape = r.int_list("shape", {});
          if (l.shape.size() != 3 || l.shape[0] < 1 || l.shape[1] < 1 || l.shape[2] < 1)
            fail(r.raw("shape"), at + ".shape", "must be [C, H, W] with positive sizes");
        }
        r.finish({"type", "features", "channels", "kernel", "stride", "padding", "output_padding", "groups", "shape"});
      }
      if (std::find(kTypes.begin(), kTypes.end(), l.type) == kTypes.end())
        fail(e, at + ".type", "unknown layer '" + l.type + "'; valid layers: " + join(kTypes));
      if (l.type == "reshape" && l.shape.empty()) fail(e, at, "reshape needs a shape: {type: reshape, shape: [C, H, W]}");
      if ((l.type == "linear" && l.features == 0) || ((l.type == "conv2d" || l.type == "conv_transpose2d") && l.channels == 0) ||
          (l.type == "group_norm" && l.groups == 0))
        fail(e, at, "'" + l.type + "' needs its settings as a mapping, e.g. {type: " + l.type +
                        (l.type == "linear" ? ", features: 256}" : l.type == "group_norm" ? ", groups: 8}" : ", channels: 32, kernel: 3}"));
      out.push_back(l);
    }
    return out;
  }

  // yaml-cpp keeps every pair of a mapping and lookups return the first, so a key
  // given twice would silently lose its second value (often the one meant).
  void reject_duplicate_keys() const {
    if (!m_node || !m_node.IsMap()) return;
    std::map<std::string, YAML::Node> first;
    for (const auto& kv : m_node) {
      if (!kv.first.IsScalar()) fail(kv.first, m_prefix + "(key)", "keys must be plain names, not lists or mappings");
      const std::string k = kv.first.Scalar();
      auto [it, fresh] = first.emplace(k, kv.first);
      if (fresh) continue;
      const int line = it->second.Mark().line;
      const bool from_file = m_ctx.override_for(m_prefix + k).empty() && line >= 0;
      fail(kv.first, m_prefix + k,
           "duplicate key" + (from_file ? " (also on line " + std::to_string(line + 1) + ")" : std::string()) +
               "; YAML would keep only the first value: remove one of them");
    }
  }

  void finish(const std::vector<std::string>& known) {
    if (!m_node || !m_node.IsMap()) return;
    for (const auto& kv : m_node) {
      std::string k = kv.first.as<std::string>();
      if (!m_seen.count(k))
        fail(kv.first, m_prefix + k, "unknown key; valid keys here: " + join(known));
    }
  }

  template <class T>
  void check(bool ok, const std::string& key, const std::string& what, T got) {
    if (ok) return;
    std::ostringstream os;
    os << what << " (got " << got << ")";
    fail(raw(key), m_prefix + key, os.str());
  }

 private:
  template <class T>
  T convert(const YAML::Node& n, const std::string& key) const {
    const char* expected = std::is_same_v<T, bool>          ? "true or false"
                           : std::is_integral_v<T>          ? "an integer"
                           : std::is_floating_point_v<T>    ? "a number"
                                                            : "a string";
    if (!n.IsScalar()) fail(n, key, std::string("must be ") + expected);
    try {
      return n.as<T>();
    } catch (const YAML::Exception&) {
      fail(n, key, std::string("must be ") + expected + ", got '" + n.Scalar() + "'");
    }
  }

  YAML::Node m_node;
  std::string m_prefix;
  const Context& m_ctx;
  std::set<std::string> m_seen;
};

void apply_override(YAML::Node& root, const std::string& text, Context& ctx) {
  size_t eq = text.find('=');
  if (eq == std::string::npos || eq == 0)
    throw config_error("--set " + text + ": expected key.path=value, e.g. --set optim.lr=3e-4");
  std::string path = text.substr(0, eq);
  std::string value = text.substr(eq + 1);
  YAML::Node parsed;
  try {
    parsed = YAML::Load(value);
  } catch (const YAML::Exception& e) {
    throw config_error("--set " + text + ": cannot parse value '" + value + "': " + e.msg);
  }
  std::vector<std::string> parts;
  std::stringstream ss(path);
  for (std::string p; std::getline(ss, p, '.');) {
    if (p.empty()) throw config_error("--set " + text + ": empty key segment");
    parts.push_back(p);
  }
  YAML::Node cur;
  cur.reset(root);
  std::string walked;
  for (size_t i = 0; i + 1 < parts.size(); ++i) {
    walked += (i ? "." : "") + parts[i];
    YAML::Node next = cur[parts[i]];
    if (next && !next.IsNull() && !next.IsMap())
      throw config_error("--set " + text + ": '" + walked + "' is not a mapping");
    if (!next || next.IsNull()) cur[parts[i]] = YAML::Node(YAML::NodeType::Map);
    YAML::Node child = cur[parts[i]];
    cur.reset(child);
  }
  cur[parts.back()] = parsed;
  // A later --set of the same key wins, in the value and in messages.
  ctx.overrides[path] = text;
}

ExperimentSpec build(YAML::Node root, Context& ctx) {
  ExperimentSpec s;
  s.source = ctx.source;
  s.overrides = ctx.overrides;
  MapReader top(root, "", ctx);
  s.name = top.get<std::string>("name", s.name);
  top.check(!s.name.empty(), "name", "must not be empty", "''");
  int64_t seed = top.get<int64_t>("seed", 1);
  top.check(seed >= 0, "seed", "must be >= 0", seed);
  s.seed = static_cast<uint64_t>(seed);
  s.device = top.choice("device", s.device, {"auto", "cpu", "cuda"});

  {
    MapReader r = top.sub("data");
    auto& d = s.data;
    d.train = r.required<std::string>("train");
    d.test = r.get<std::string>("test", "");
    d.shape = r.int_list("shape", {});
    if (!d.shape.empty()) {
      bool ok = d.shape.size() == 3 && d.shape[0] > 0 && d.shape[1] > 0 && d.shape[2] > 0;
      r.check(ok, "shape", "must be [channels, height, width] with positive entries", d.shape.size());
    }
    d.binarize = r.get<bool>("binarize", d.binarize);
    const std::string shuffle = r.get<std::string>("shuffle", "true");
    bool flag = true;
    r.check(shuffle == "blocks" || YAML::convert<bool>::decode(YAML::Node(shuffle), flag), "shuffle",
            "must be true (a global permutation), false or blocks (the locality-aware order for streaming)",
            "'" + shuffle + "'");
    d.shuffle = flag;
    d.shuffle_blocks = shuffle == "blocks";
    d.max_samples = r.get<int64_t>("max_samples", d.max_samples);
    r.check(d.max_samples >= 0, "max_samples", "must be >= 0 (0 = all)", d.max_samples);
    d.loader = r.choice("loader", d.loader, {"auto", "memory", "stream"});
    d.cache_mb = r.get<double>("cache_mb", d.cache_mb);
    r.check(d.cache_mb > 0 && d.cache_mb <= 1e9, "cache_mb", "must be > 0 (MiB per rank)", d.cache_mb);
    r.finish({"train", "test", "shape", "binarize", "shuffle", "max_samples", "loader", "cache_mb"});
  }
  {
    MapReader r = top.sub("model");
    auto& m = s.model;
    m.type = r.choice("type", m.type, {"mlp", "conv"});
    if (m.type == "mlp") {
      m.encoder = r.int_list("encoder", m.encoder);
      m.decoder = r.int_list("decoder", m.decoder);
      for (int w : m.encoder) r.check(w > 0, "encoder", "hidden widths must be >= 1", w);
      for (int w : m.decoder) r.check(w > 0, "decoder", "hidden widths must be >= 1", w);
      std::string act = r.choice("activation", "relu", {"relu", "tanh", "softplus"});
      m.activation = act == "relu" ? Activation::Relu : act == "tanh" ? Activation::Tanh : Activation::Softplus;
    } else {
      if (r.has("activation"))
        r.fail(r.raw("activation"), "model.activation",
               "conv models take activations as entries of the encoder and decoder lists (e.g. {type: relu})");
      m.encoder.clear();
      m.decoder.clear();
      m.conv_encoder = r.layer_list("encoder");
      m.conv_decoder = r.layer_list("decoder");
    }
    m.latent = r.get<int>("latent", m.latent);
    r.check(m.latent >= 1, "latent", "must be >= 1", m.latent);

    // likelihood: either a bare type ("bernoulli") or {type, variance, sigma}.
    std::string type = "bernoulli", variance = "fixed";
    if (r.has("likelihood") && r.raw("likelihood").IsScalar()) {
      type = r.choice("likelihood", type, {"bernoulli", "gaussian"});
    } else {
      MapReader l = r.sub("likelihood");
      type = l.choice("type", type, {"bernoulli", "gaussian"});
      variance = l.choice("variance", variance, {"fixed", "learned"});
      m.sigma = l.get<double>("sigma", m.sigma);
      l.check(m.sigma > 0, "sigma", "must be > 0", m.sigma);
      l.finish({"type", "variance", "sigma"});
    }
    m.likelihood = type == "bernoulli"   ? Likelihood::Bernoulli
                   : variance == "fixed" ? Likelihood::GaussianFixed
                                         : Likelihood::GaussianLearned;
    r.finish({"type", "encoder", "decoder", "latent", "activation", "likelihood"});
  }
  {
    MapReader r = top.sub("loss");
    s.loss.beta = r.get<double>("beta", s.loss.beta);
    r.check(s.loss.beta >= 0, "beta", "must be >= 0", s.loss.beta);
    s.loss.kl_warmup_steps = r.get<int64_t>("kl_warmup_steps", s.loss.kl_warmup_steps);
    r.check(s.loss.kl_warmup_steps >= 0, "kl_warmup_steps", "must be >= 0", s.loss.kl_warmup_steps);
    r.finish({"beta", "kl_warmup_steps"});
  }
  {
    MapReader r = top.sub("optim");
    auto& o = s.optim;
    o.type = r.choice("type", o.type, {"adam", "adamw"});
    o.lr = r.get<double>("lr", o.lr);
    r.check(o.lr > 0, "lr", "must be > 0", o.lr);
    o.beta1 = r.get<double>("beta1", o.beta1);
    r.check(o.beta1 >= 0 && o.beta1 < 1, "beta1", "must be in [0, 1)", o.beta1);
    o.beta2 = r.get<double>("beta2", o.beta2);
    r.check(o.beta2 >= 0 && o.beta2 < 1, "beta2", "must be in [0, 1)", o.beta2);
    o.eps = r.get<double>("eps", o.eps);
    r.check(o.eps > 0, "eps", "must be > 0", o.eps);
    o.weight_decay = r.get<double>("weight_decay", o.type == "adamw" ? 0.01 : 0.0);
    r.check(o.weight_decay >= 0, "weight_decay", "must be >= 0", o.weight_decay);
    o.grad_clip = r.get<double>("grad_clip", o.grad_clip);
    r.check(o.grad_clip >= 0, "grad_clip", "must be >= 0 (0 = off)", o.grad_clip);
    o.schedule = r.choice("schedule", o.schedule, {"constant", "cosine"});
    o.warmup_steps = r.get<int64_t>("warmup_steps", o.warmup_steps);
    r.check(o.warmup_steps >= 0, "warmup_steps", "must be >= 0", o.warmup_steps);
    o.min_lr = r.get<double>("min_lr", o.min_lr);
    r.check(o.min_lr >= 0 && o.min_lr <= o.lr, "min_lr", "must be in [0, optim.lr]", o.min_lr);
    o.ema = r.get<double>("ema", o.ema);
    r.check(o.ema >= 0 && o.ema < 1, "ema", "must be in [0, 1) (0 = off; e.g. 0.9999)", o.ema);
    r.finish({"type", "lr", "beta1", "beta2", "eps", "weight_decay", "grad_clip", "schedule", "warmup_steps", "min_lr",
              "ema"});
  }
  {
    MapReader r = top.sub("train");
    auto& t = s.train;
    t.batch_size = r.get<int64_t>("batch_size", t.batch_size);
    r.check(t.batch_size >= 1, "batch_size", "must be >= 1", t.batch_size);
    t.epochs = r.get<int64_t>("epochs", t.epochs);
    r.check(t.epochs >= 1, "epochs", "must be >= 1", t.epochs);
    t.max_steps = r.get<int64_t>("max_steps", t.max_steps);
    r.check(t.max_steps >= 0, "max_steps", "must be >= 0 (0 = no cap)", t.max_steps);
    t.drop_last = r.get<bool>("drop_last", t.drop_last);
    t.log_every = r.get<int64_t>("log_every", t.log_every);
    r.check(t.log_every >= 1, "log_every", "must be >= 1", t.log_every);
    t.threads = r.get<int>("threads", t.threads);
    r.check(t.threads >= 0, "threads", "must be >= 0 (0 = automatic)", t.threads);
    t.on_nonfinite = r.choice("on_nonfinite", t.on_nonfinite, {"abort", "skip"});
    t.max_consecutive_skips = r.get<int64_t>("max_consecutive_skips", t.max_consecutive_skips);
    r.check(t.max_consecutive_skips >= 1, "max_consecutive_skips", "must be >= 1", t.max_consecutive_skips);
    t.max_skip_fraction = r.get<double>("max_skip_fraction", t.max_skip_fraction);
    r.check(t.max_skip_fraction >= 0 && t.max_skip_fraction <= 1, "max_skip_fraction", "must be in [0, 1]",
            t.max_skip_fraction);
    t.cuda_graph = r.choice("cuda_graph", t.cuda_graph, {"auto", "on", "off"});
    t.deterministic = r.get<bool>("deterministic", t.deterministic);
    t.patience = r.get<int64_t>("patience", t.patience);
    r.check(t.patience >= 0, "patience", "must be >= 0 (0 = never stop early)", t.patience);
    r.finish({"batch_size", "epochs", "max_steps", "drop_last", "log_every", "threads", "on_nonfinite",
              "max_consecutive_skips", "max_skip_fraction", "cuda_graph", "deterministic", "patience"});
  }
  MapReader train_keys = top.sub("train");  // train.patience is checked against eval.every below
  {
    MapReader r = top.sub("eval");
    s.eval.at_end = r.get<bool>("at_end", s.eval.at_end);
    s.eval.iw_samples = r.get<int>("iw_samples", s.eval.iw_samples);
    r.check(s.eval.iw_samples >= 0, "iw_samples", "must be >= 0 (0 = skip the IWAE bound)", s.eval.iw_samples);
    s.eval.batch_size = r.get<int64_t>("batch_size", s.eval.batch_size);
    r.check(s.eval.batch_size >= 1, "batch_size", "must be >= 1", s.eval.batch_size);
    s.eval.every = r.get<int64_t>("every", s.eval.every);
    r.check(s.eval.every >= 0, "every", "must be >= 0 (0 = only at the end)", s.eval.every);
    r.check(s.eval.every == 0 || !s.data.test.empty(), "every", "needs data.test, the held-out split to evaluate on",
            s.eval.every);
    // Patience counts the evaluations during training: without them it would never act.
    train_keys.check(s.train.patience == 0 || s.eval.every > 0, "patience",
                     "needs eval.every > 0 (and data.test): it counts the evaluations during training",
                     s.train.patience);
    s.eval.max_samples = r.get<int64_t>("max_samples", s.eval.max_samples);
    r.check(s.eval.max_samples >= 0, "max_samples", "must be >= 0 (0 = the whole split)", s.eval.max_samples);
    s.eval.images = r.get<bool>("images", s.eval.images);
    r.finish({"at_end", "iw_samples", "batch_size", "every", "max_samples", "images"});
  }
  {
    MapReader r = top.sub("output");
    s.output.dir = r.get<std::string>("dir", s.output.dir);
    r.check(!s.output.dir.empty(), "dir", "must not be empty", "''");
    s.output.overwrite = r.get<bool>("overwrite", s.output.overwrite);
    r.finish({"dir", "overwrite"});
  }
  {
    MapReader r = top.sub("dist");
    auto& d = s.dist;
    d.communicator = r.choice("communicator", d.communicator, {"auto", "nccl", "mpi"});
    d.bucket_mb = r.get<double>("bucket_mb", d.bucket_mb);
    r.check(d.bucket_mb >= 0, "bucket_mb", "must be >= 0 (0 = one all-reduce after backward)", d.bucket_mb);
    d.timeout_s = r.get<double>("timeout_s", d.timeout_s);
    r.check(d.timeout_s >= 0, "timeout_s", "must be >= 0 (0 = wait forever)", d.timeout_s);
    d.self_test = r.get<bool>("self_test", d.self_test);
    d.shard_optimizer = r.get<bool>("shard_optimizer", d.shard_optimizer);
    r.finish({"communicator", "bucket_mb", "timeout_s", "self_test", "shard_optimizer"});
  }
  {
    MapReader r = top.sub("checkpoint");
    auto& c = s.checkpoint;
    c.every = r.get<int64_t>("every", c.every);
    r.check(c.every >= 0, "every", "must be >= 0 (0 = only at the end and on a stop signal)", c.every);
    c.keep = r.get<int>("keep", c.keep);
    r.check(c.keep >= 0, "keep", "must be >= 0 (0 = keep all)", c.keep);
    c.grace_s = r.get<double>("grace_s", c.grace_s);
    r.check(c.grace_s > 0, "grace_s", "must be > 0", c.grace_s);
    r.finish({"every", "keep", "grace_s"});
  }
  top.finish({"name", "seed", "device", "data", "model", "loss", "optim", "train", "eval", "output", "dist",
              "checkpoint"});
  return s;
}

}  // namespace

std::string spec_origin(const ExperimentSpec& spec, const std::string& key) {
  const std::string o = override_covering(spec.overrides, key);
  return o.empty() ? spec.source : "--set " + o;
}

ExperimentSpec parse_spec(const std::string& yaml_text, const std::string& source,
                          const std::vector<std::string>& overrides) {
  Context ctx{source, {}};
  YAML::Node root;
  try {
    root = YAML::Load(yaml_text);
  } catch (const YAML::ParserException& e) {
    throw config_error(source + ":" + std::to_string(e.mark.line + 1) + ": invalid YAML: " + e.msg);
  }
  if (!root || root.IsNull()) root = YAML::Node(YAML::NodeType::Map);
  if (!root.IsMap()) throw config_error(source + ": the spec must be a YAML mapping (key: value lines)");
  for (const auto& o : overrides) apply_override(root, o, ctx);
  return build(root, ctx);
}

ExperimentSpec load_spec(const std::string& path, const std::vector<std::string>& overrides) {
  std::ifstream in(path);
  if (!in) throw config_error(path + ": cannot open the spec file");
  std::stringstream ss;
  ss << in.rdbuf();
  return parse_spec(ss.str(), path, overrides);
}

std::string dump_spec(const ExperimentSpec& s) {
  YAML::Emitter e;
  e.SetDoublePrecision(17);
  auto ints = [&](const std::vector<int>& v) {
    e << YAML::Flow << YAML::BeginSeq;
    for (int x : v) e << x;
    e << YAML::EndSeq;
  };
  e << YAML::BeginMap;
  e << YAML::Key << "name" << YAML::Value << s.name;
  e << YAML::Key << "seed" << YAML::Value << s.seed;
  e << YAML::Key << "device" << YAML::Value << s.device;
  e << YAML::Key << "data" << YAML::Value << YAML::BeginMap;
  e << YAML::Key << "train" << YAML::Value << s.data.train;
  e << YAML::Key << "test" << YAML::Value << s.data.test;
  if (!s.data.shape.empty()) {
    e << YAML::Key << "shape" << YAML::Value;
    ints(s.data.shape);
  }
  e << YAML::Key << "binarize" << YAML::Value << s.data.binarize;
  if (s.data.shuffle_blocks)
    e << YAML::Key << "shuffle" << YAML::Value << "blocks";
  else
    e << YAML::Key << "shuffle" << YAML::Value << s.data.shuffle;
  e << YAML::Key << "max_samples" << YAML::Value << s.data.max_samples;
  e << YAML::Key << "loader" << YAML::Value << s.data.loader;
  e << YAML::Key << "cache_mb" << YAML::Value << s.data.cache_mb;
  e << YAML::EndMap;
  e << YAML::Key << "model" << YAML::Value << YAML::BeginMap;
  e << YAML::Key << "type" << YAML::Value << s.model.type;
  auto layers = [&](const std::vector<LayerSpec>& v) {
    e << YAML::BeginSeq;
    for (const LayerSpec& l : v) {
      if (l.type == "relu" || l.type == "tanh" || l.type == "softplus" || l.type == "flatten") {
        e << l.type;
        continue;
      }
      e << YAML::Flow << YAML::BeginMap << YAML::Key << "type" << YAML::Value << l.type;
      if (l.type == "linear") e << YAML::Key << "features" << YAML::Value << l.features;
      if (l.type == "conv2d" || l.type == "conv_transpose2d") {
        e << YAML::Key << "channels" << YAML::Value << l.channels << YAML::Key << "kernel" << YAML::Value << l.kernel
          << YAML::Key << "stride" << YAML::Value << l.stride << YAML::Key << "padding" << YAML::Value << l.padding;
        if (l.type == "conv_transpose2d") e << YAML::Key << "output_padding" << YAML::Value << l.output_padding;
      }
      if (l.type == "group_norm") e << YAML::Key << "groups" << YAML::Value << l.groups;
      if (l.type == "reshape") {
        e << YAML::Key << "shape" << YAML::Value;
        ints(l.shape);
      }
      e << YAML::EndMap;
    }
    e << YAML::EndSeq;
  };
  if (s.model.type == "mlp") {
    e << YAML::Key << "encoder" << YAML::Value;
    ints(s.model.encoder);
    e << YAML::Key << "decoder" << YAML::Value;
    ints(s.model.decoder);
  } else {
    e << YAML::Key << "encoder" << YAML::Value;
    layers(s.model.conv_encoder);
    e << YAML::Key << "decoder" << YAML::Value;
    layers(s.model.conv_decoder);
  }
  e << YAML::Key << "latent" << YAML::Value << s.model.latent;
  if (s.model.type == "mlp") e << YAML::Key << "activation" << YAML::Value << activation_name(s.model.activation);
  e << YAML::Key << "likelihood" << YAML::Value << YAML::BeginMap;
  e << YAML::Key << "type" << YAML::Value
    << (s.model.likelihood == Likelihood::Bernoulli ? "bernoulli" : "gaussian");
  e << YAML::Key << "variance" << YAML::Value
    << (s.model.likelihood == Likelihood::GaussianLearned ? "learned" : "fixed");
  e << YAML::Key << "sigma" << YAML::Value << s.model.sigma;
  e << YAML::EndMap << YAML::EndMap;
  e << YAML::Key << "loss" << YAML::Value << YAML::BeginMap;
  e << YAML::Key << "beta" << YAML::Value << s.loss.beta;
  e << YAML::Key << "kl_warmup_steps" << YAML::Value << s.loss.kl_warmup_steps;
  e << YAML::EndMap;
  e << YAML::Key << "optim" << YAML::Value << YAML::BeginMap;
  e << YAML::Key << "type" << YAML::Value << s.optim.type;
  e << YAML::Key << "lr" << YAML::Value << s.optim.lr;
  e << YAML::Key << "beta1" << YAML::Value << s.optim.beta1;
  e << YAML::Key << "beta2" << YAML::Value << s.optim.beta2;
  e << YAML::Key << "eps" << YAML::Value << s.optim.eps;
  e << YAML::Key << "weight_decay" << YAML::Value << s.optim.weight_decay;
  e << YAML::Key << "grad_clip" << YAML::Value << s.optim.grad_clip;
  e << YAML::Key << "schedule" << YAML::Value << s.optim.schedule;
  e << YAML::Key << "warmup_steps" << YAML::Value << s.optim.warmup_steps;
  e << YAML::Key << "min_lr" << YAML::Value << s.optim.min_lr;
  e << YAML::Key << "ema" << YAML::Value << s.optim.ema;
  e << YAML::EndMap;
  e << YAML::Key << "train" << YAML::Value << YAML::BeginMap;
  e << YAML::Key << "batch_size" << YAML::Value << s.train.batch_size;
  e << YAML::Key << "epochs" << YAML::Value << s.train.epochs;
  e << YAML::Key << "max_steps" << YAML::Value << s.train.max_steps;
  e << YAML::Key << "drop_last" << YAML::Value << s.train.drop_last;
  e << YAML::Key << "log_every" << YAML::Value << s.train.log_every;
  e << YAML::Key << "threads" << YAML::Value << s.train.threads;
  e << YAML::Key << "on_nonfinite" << YAML::Value << s.train.on_nonfinite;
  e << YAML::Key << "max_consecutive_skips" << YAML::Value << s.train.max_consecutive_skips;
  e << YAML::Key << "max_skip_fraction" << YAML::Value << s.train.max_skip_fraction;
  e << YAML::Key << "cuda_graph" << YAML::Value << s.train.cuda_graph;
  e << YAML::Key << "deterministic" << YAML::Value << s.train.deterministic;
  e << YAML::Key << "patience" << YAML::Value << s.train.patience;
  e << YAML::EndMap;
  e << YAML::Key << "eval" << YAML::Value << YAML::BeginMap;
  e << YAML::Key << "at_end" << YAML::Value << s.eval.at_end;
  e << YAML::Key << "iw_samples" << YAML::Value << s.eval.iw_samples;
  e << YAML::Key << "batch_size" << YAML::Value << s.eval.batch_size;
  e << YAML::Key << "every" << YAML::Value << s.eval.every;
  e << YAML::Key << "max_samples" << YAML::Value << s.eval.max_samples;
  e << YAML::Key << "images" << YAML::Value << s.eval.images;
  e << YAML::EndMap;
  e << YAML::Key << "output" << YAML::Value << YAML::BeginMap;
  e << YAML::Key << "dir" << YAML::Value << s.output.dir;
  e << YAML::Key << "overwrite" << YAML::Value << s.output.overwrite;
  e << YAML::EndMap;
  e << YAML::Key << "dist" << YAML::Value << YAML::BeginMap;
  e << YAML::Key << "communicator" << YAML::Value << s.dist.communicator;
  e << YAML::Key << "bucket_mb" << YAML::Value << s.dist.bucket_mb;
  e << YAML::Key << "timeout_s" << YAML::Value << s.dist.timeout_s;
  e << YAML::Key << "self_test" << YAML::Value << s.dist.self_test;
  e << YAML::Key << "shard_optimizer" << YAML::Value << s.dist.shard_optimizer;
  e << YAML::EndMap;
  e << YAML::Key << "checkpoint" << YAML::Value << YAML::BeginMap;
  e << YAML::Key << "every" << YAML::Value << s.checkpoint.every;
  e << YAML::Key << "keep" << YAML::Value << s.checkpoint.keep;
  e << YAML::Key << "grace_s" << YAML::Value << s.checkpoint.grace_s;
  e << YAML::EndMap;
  e << YAML::EndMap;
  return std::string(e.c_str()) + "\n";
}

}  // namespace elbo
