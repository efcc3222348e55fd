// YAML -> ExperimentSpec with precise errors, --set overrides, the resolved dump and
// the resume rule, all driven by one table of keys per section.
#include "elbo/config/spec.hpp"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <functional>
#include <map>
#include <optional>
#include <set>
#include <sstream>
#include <type_traits>

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
  std::string source;                            // file name for messages
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

  // "model.latent" for "latent" read under model.
  std::string path(const std::string& key) const { return m_prefix + key; }
  const YAML::Node& node() const { return m_node; }

  [[noreturn]] void fail(const YAML::Node& at, const std::string& key, const std::string& what) const {
    throw config_error(m_ctx.where(key, at) + ": " + key + ": " + what);
  }

  bool has(const std::string& key) { return m_node && m_node.IsMap() && m_node[key] && !m_node[key].IsNull(); }

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

  // A choice spelled as in its name table (choices.hpp); `allowed` narrows the table.
  template <class E>
  E choice(const std::string& key, E fallback, std::initializer_list<E> allowed = {}) {
    YAML::Node n = raw(key);
    if (!n || n.IsNull()) return fallback;
    const std::string v = convert<std::string>(n, m_prefix + key);
    if (std::optional<E> e = parse_choice<E>(v, allowed)) return *e;
    fail(n, m_prefix + key, "unknown value '" + v + "'; valid choices: " + choice_list<E>(allowed));
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
  MapReader entry(const YAML::Node& n, const std::string& prefix) const { return MapReader(n, prefix, m_ctx); }

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
      if (!m_seen.count(k)) fail(kv.first, m_prefix + k, "unknown key; valid keys here: " + join(known));
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
    const char* expected = std::is_same_v<T, bool>       ? "true or false"
                           : std::is_integral_v<T>       ? "an integer"
                           : std::is_floating_point_v<T> ? "a number"
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

// --- the key tables -----------------------------------------------------------------
// Every key of the spec is one entry below: its name, how it is read and checked, how
// it is written in the resolved dump, and whether a resumed run must keep it. The
// entries' order is the dump's order and the order of "valid keys here" in messages.

// One key as its entry reads it: the mapping's reader and the key's name.
struct Field {
  MapReader& r;
  const std::string& key;

  // Reads the value over `v`, which holds the default.
  template <class T>
  void read(T& v) {
    if constexpr (std::is_enum_v<T>)
      v = r.choice(key, v);
    else
      v = r.get<T>(key, v);
  }
  template <class T>
  void require(T& v) {
    v = r.required<T>(key);
  }
  template <class T>
  void check(bool ok, const std::string& what, const T& got) {
    r.check(ok, key, what, got);
  }
  [[noreturn]] void fail(const std::string& what) { r.fail(r.raw(key), r.path(key), what); }
};

// One key as its entry writes it: the emitter, and the key's name to put before a value.
struct Out {
  YAML::Emitter& e;
  const std::string& key;

  YAML::Emitter& value() { return e << YAML::Key << key << YAML::Value; }
  template <class T>
  void put(const T& v) {
    if constexpr (std::is_enum_v<T>)
      value() << choice_name(v);
    else
      value() << v;
  }
  void put(const std::vector<int>& v) {
    value() << YAML::Flow << YAML::BeginSeq;
    for (int x : v) e << x;
    e << YAML::EndSeq;
  }
};

enum class Resume { Free, Fixed };

template <class Target>
struct KeyOf {
  std::string name;
  std::function<void(Field&, Target&)> read;      // with the checks; may leave the default
  std::function<void(Out&, const Target&)> dump;  // may write nothing (an optional key left out)
  Resume resume = Resume::Free;                   // Fixed: a resumed run must keep the checkpoint's value
};
using Key = KeyOf<ExperimentSpec>;

Key fixed(Key k) {
  k.resume = Resume::Fixed;
  return k;
}

template <class Target>
std::vector<std::string> names(const std::vector<KeyOf<Target>>& keys) {
  std::vector<std::string> out;
  for (const auto& k : keys) out.push_back(k.name);
  return out;
}

// Reads `keys` from `r` into `t`, then rejects any other key of the mapping.
template <class Target>
void read_keys(MapReader& r, const std::vector<KeyOf<Target>>& keys, Target& t) {
  for (const auto& k : keys) {
    Field f{r, k.name};
    k.read(f, t);
  }
  r.finish(names(keys));
}

template <class Target>
void dump_keys(YAML::Emitter& e, const std::vector<KeyOf<Target>>& keys, const Target& t) {
  for (const auto& k : keys) {
    Out o{e, k.name};
    k.dump(o, t);
  }
}

// A key held in one member of a section (ExperimentSpec::*section), read with the
// member's default as fallback and, when `ok` is given, checked with it: `rule` is the
// message when the check fails.
template <class S>
struct SectionKeys {
  S ExperimentSpec::*section;

  template <class T, class Ok = std::nullptr_t>
  Key field(std::string name, T S::*member, Ok ok = nullptr, std::string rule = {}) const {
    const auto sec = section;
    return Key{std::move(name),
               [=](Field& f, ExperimentSpec& s) {
                 T& v = (s.*sec).*member;
                 f.read(v);
                 if constexpr (!std::is_null_pointer_v<Ok>) f.check(ok(v), rule, v);
               },
               [=](Out& o, const ExperimentSpec& s) { o.put((s.*sec).*member); }};
  }
};

// A nested mapping (model.likelihood) read and dumped through its own keys.
Key mapping(std::string name, const std::vector<Key>& keys) {
  return Key{std::move(name),
             [&keys](Field& f, ExperimentSpec& s) {
               MapReader sub = f.r.sub(f.key);
               read_keys(sub, keys, s);
             },
             [&keys](Out& o, const ExperimentSpec& s) {
               o.value() << YAML::BeginMap;
               dump_keys(o.e, keys, s);
               o.e << YAML::EndMap;
             }};
}

struct Section {
  std::string name;  // "" = the top level
  std::vector<Key> keys;
};

// --- model.likelihood: {type, variance, sigma} or {type, components} spells the enum Likelihood ---

enum class LikelihoodType { Bernoulli, Gaussian, DiscretizedLogisticMixture };
inline constexpr Named<LikelihoodType> kLikelihoodTypeNames[] = {
    {LikelihoodType::Bernoulli, "bernoulli"},
    {LikelihoodType::Gaussian, "gaussian"},
    {LikelihoodType::DiscretizedLogisticMixture, "discretized_logistic_mixture"}};
constexpr const auto& choices_of(LikelihoodType) { return kLikelihoodTypeNames; }

enum class Variance { Fixed, Learned };
inline constexpr Named<Variance> kVarianceNames[] = {{Variance::Fixed, "fixed"}, {Variance::Learned, "learned"}};
constexpr const auto& choices_of(Variance) { return kVarianceNames; }

LikelihoodType type_of(Likelihood l) {
  return l == Likelihood::Bernoulli                    ? LikelihoodType::Bernoulli
         : l == Likelihood::DiscretizedLogisticMixture ? LikelihoodType::DiscretizedLogisticMixture
                                                       : LikelihoodType::Gaussian;
}
Variance variance_of(Likelihood l) { return l == Likelihood::GaussianLearned ? Variance::Learned : Variance::Fixed; }
// A Bernoulli likelihood has no variance: a variance given with it is ignored.
Likelihood likelihood_of(LikelihoodType t, Variance v) {
  if (t == LikelihoodType::Bernoulli) return Likelihood::Bernoulli;
  if (t == LikelihoodType::DiscretizedLogisticMixture) return Likelihood::DiscretizedLogisticMixture;
  return v == Variance::Learned ? Likelihood::GaussianLearned : Likelihood::GaussianFixed;
}
bool is_dlm(Likelihood l) { return l == Likelihood::DiscretizedLogisticMixture; }

// The discretized logistic mixture reads 8-bit pixel values; binarized inputs are only
// its two edge bins and belong to the Bernoulli likelihood. data is read first.
void check_pixels_for(Field& f, const ExperimentSpec& s) {
  if (is_dlm(s.model.likelihood) && s.data.binarize)
    f.fail(
        "discretized_logistic_mixture models the 256 values of 8-bit pixels, but data.binarize is true (binarized "
        "pixels are the bernoulli likelihood's data)");
}

// type is read before variance: a Gaussian keeps the variance read so far (fixed by default).
// variance and sigma belong to the Gaussian, components to the discretized logistic
// mixture: the dump writes a likelihood's own keys only (so the resolved specs of
// Bernoulli and Gaussian runs read as before), and the other type's keys are refused.
const std::vector<Key>& likelihood_keys() {
  static const std::vector<Key> keys = {
      {"type",
       [](Field& f, ExperimentSpec& s) {
         Likelihood& l = s.model.likelihood;
         LikelihoodType t = type_of(l);
         f.read(t);
         l = likelihood_of(t, variance_of(l));
         check_pixels_for(f, s);
       },
       [](Out& o, const ExperimentSpec& s) { o.put(type_of(s.model.likelihood)); }},
      {"variance",
       [](Field& f, ExperimentSpec& s) {
         Likelihood& l = s.model.likelihood;
         if (is_dlm(l) && f.r.has(f.key))
           f.fail("applies to the gaussian likelihood, not discretized_logistic_mixture");
         Variance v = variance_of(l);
         f.read(v);
         l = likelihood_of(type_of(l), v);
       },
       [](Out& o, const ExperimentSpec& s) {
         if (!is_dlm(s.model.likelihood)) o.put(variance_of(s.model.likelihood));
       }},
      {"sigma",
       [](Field& f, ExperimentSpec& s) {
         if (is_dlm(s.model.likelihood) && f.r.has(f.key))
           f.fail("applies to the gaussian likelihood, not discretized_logistic_mixture");
         f.read(s.model.sigma);
         f.check(s.model.sigma > 0, "must be > 0", s.model.sigma);
       },
       [](Out& o, const ExperimentSpec& s) {
         if (!is_dlm(s.model.likelihood)) o.put(s.model.sigma);
       }},
      {"components",
       [](Field& f, ExperimentSpec& s) {
         if (!is_dlm(s.model.likelihood) && f.r.has(f.key))
           f.fail("applies to type discretized_logistic_mixture only (the mixture's K)");
         f.read(s.model.components);
         f.check(s.model.components >= 1 && s.model.components <= 256, "must be in [1, 256] (mixture components)",
                 s.model.components);
       },
       [](Out& o, const ExperimentSpec& s) {
         if (is_dlm(s.model.likelihood)) o.put(s.model.components);
       }},
  };
  return keys;
}

// --- a conv model's layer lists ---

// An entry's settings, in the order the dump writes them after `type`; each applies to
// the layer types listed with it.
struct LayerKey {
  KeyOf<LayerSpec> key;
  std::vector<LayerType> types;
};

bool is_activation(LayerType t) { return t == LayerType::Relu || t == LayerType::Tanh || t == LayerType::Softplus; }

template <class Ok>
KeyOf<LayerSpec> layer_int(std::string name, int LayerSpec::*member, bool required, Ok ok, std::string rule) {
  return {std::move(name),
          [=](Field& f, LayerSpec& l) {
            if (required)
              f.require(l.*member);
            else
              f.read(l.*member);
            f.check(ok(l, l.*member), rule, l.*member);
          },
          [=](Out& o, const LayerSpec& l) { o.put(l.*member); }};
}

const std::vector<LayerKey>& layer_keys() {
  using L = LayerType;
  const auto positive = [](const LayerSpec&, int v) { return v >= 1; };
  const auto non_negative = [](const LayerSpec&, int v) { return v >= 0; };
  static const std::vector<LayerKey> keys = {
      {layer_int("features", &LayerSpec::features, true, positive, "must be >= 1"), {L::Linear}},
      {layer_int("channels", &LayerSpec::channels, true, positive, "must be >= 1"), {L::Conv2d, L::ConvTranspose2d}},
      {layer_int("kernel", &LayerSpec::kernel, false, positive, "must be >= 1"), {L::Conv2d, L::ConvTranspose2d}},
      {layer_int("stride", &LayerSpec::stride, false, positive, "must be >= 1"), {L::Conv2d, L::ConvTranspose2d}},
      {layer_int("padding", &LayerSpec::padding, false, non_negative, "must be >= 0"), {L::Conv2d, L::ConvTranspose2d}},
      {layer_int(
           "output_padding", &LayerSpec::output_padding, false,
           [](const LayerSpec& l, int v) { return v >= 0 && v < l.stride; },
           "must be >= 0 and smaller than the stride"),
       {L::ConvTranspose2d}},
      {layer_int("groups", &LayerSpec::groups, true, positive, "must be >= 1"), {L::GroupNorm}},
      {{"shape",
        [](Field& f, LayerSpec& l) {
          l.shape = f.r.int_list(f.key, {});
          if (l.shape.size() != 3 || l.shape[0] < 1 || l.shape[1] < 1 || l.shape[2] < 1)
            f.fail("must be [C, H, W] with positive sizes");
        },
        [](Out& o, const LayerSpec& l) { o.put(l.shape); }},
       {L::Reshape}},
  };
  return keys;
}

bool applies(const LayerKey& k, LayerType t) { return std::find(k.types.begin(), k.types.end(), t) != k.types.end(); }

// Maps such as {type: conv2d, channels: 32, kernel: 4, stride: 2, padding: 1}, or bare
// names for entries without settings (relu, flatten).
std::vector<LayerSpec> read_layer_list(Field& f) {
  YAML::Node n = f.r.raw(f.key);
  const std::string where = f.r.path(f.key);
  if (!n || n.IsNull()) f.r.fail(f.r.node(), where, "is required for model.type conv (a list of layers)");
  if (!n.IsSequence() || n.size() == 0)
    f.r.fail(n, where,
             "must be a non-empty list of layers, e.g. [{type: conv2d, channels: 32, kernel: 4, stride: 2, "
             "padding: 1}, relu, ...]");
  const auto unknown = [&](const YAML::Node& at, const std::string& key, const std::string& type) {
    f.r.fail(at, key, "unknown layer '" + type + "'; valid layers: " + choice_list<LayerType>());
  };
  std::vector<LayerSpec> out;
  for (size_t i = 0; i < n.size(); ++i) {
    const std::string at = where + "[" + std::to_string(i) + "]";
    YAML::Node e = n[i];
    LayerSpec l;
    bool settings = false;  // given as a mapping
    if (e.IsScalar()) {
      const std::optional<LayerType> t = parse_choice<LayerType>(e.Scalar());
      if (!t) unknown(e, at + ".type", e.Scalar());
      l.type = *t;
    } else {
      MapReader r = f.r.entry(e, at + ".");
      const std::string type = r.required<std::string>("type");
      const std::optional<LayerType> t = parse_choice<LayerType>(type);
      if (!t) unknown(r.raw("type"), at + ".type", type);
      l.type = *t;
      settings = true;
      std::vector<std::string> known = {"type"};
      for (const LayerKey& k : layer_keys()) {
        known.push_back(k.key.name);
        if (!applies(k, l.type)) continue;
        Field kf{r, k.key.name};
        k.key.read(kf, l);
      }
      r.finish(known);
    }
    if (l.type == LayerType::Reshape && !settings)
      f.r.fail(e, at, "reshape needs a shape: {type: reshape, shape: [C, H, W]}");
    if (!settings && (l.type == LayerType::Linear || l.type == LayerType::Conv2d ||
                      l.type == LayerType::ConvTranspose2d || l.type == LayerType::GroupNorm)) {
      const std::string name = choice_name(l.type);
      f.r.fail(e, at,
               "'" + name + "' needs its settings as a mapping, e.g. {type: " + name +
                   (l.type == LayerType::Linear      ? ", features: 256}"
                    : l.type == LayerType::GroupNorm ? ", groups: 8}"
                                                     : ", channels: 32, kernel: 3}"));
    }
    out.push_back(l);
  }
  return out;
}

// Entries without settings as bare names, the others as one-line mappings.
void dump_layer_list(Out& o, const std::vector<LayerSpec>& list) {
  YAML::Emitter& e = o.value();
  e << YAML::BeginSeq;
  for (const LayerSpec& l : list) {
    if (is_activation(l.type) || l.type == LayerType::Flatten) {
      e << choice_name(l.type);
      continue;
    }
    e << YAML::Flow << YAML::BeginMap << YAML::Key << "type" << YAML::Value << choice_name(l.type);
    for (const LayerKey& k : layer_keys()) {
      if (!applies(k, l.type)) continue;
      Out ko{e, k.key.name};
      k.key.dump(ko, l);
    }
    e << YAML::EndMap;
  }
  e << YAML::EndSeq;
}

// model.encoder / model.decoder: hidden widths for an MLP, a layer list for a conv model.
Key model_list(std::string name, std::vector<int> ModelSpec::*widths, std::vector<LayerSpec> ModelSpec::*layers) {
  return fixed(Key{std::move(name),
                   [=](Field& f, ExperimentSpec& s) {
                     ModelSpec& m = s.model;
                     if (m.type == ModelType::Hierarchical) {
                       if (f.r.has(f.key))
                         f.fail(
                             "a hierarchical model is described by model.width, model.bottleneck and "
                             "model.stages, not by encoder and decoder lists");
                       (m.*widths).clear();
                       return;
                     }
                     if (m.type == ModelType::Conv) {
                       (m.*widths).clear();
                       m.*layers = read_layer_list(f);
                       return;
                     }
                     m.*widths = f.r.int_list(f.key, m.*widths);
                     for (int w : m.*widths) f.check(w > 0, "hidden widths must be >= 1", w);
                   },
                   [=](Out& o, const ExperimentSpec& s) {
                     if (s.model.type == ModelType::Hierarchical) return;
                     if (s.model.type == ModelType::Conv)
                       dump_layer_list(o, s.model.*layers);
                     else
                       o.put(s.model.*widths);
                   }});
}

// --- a hierarchical model's stages ---

const std::vector<KeyOf<StageSpec>>& stage_keys() {
  const auto int_key = [](std::string name, int StageSpec::*member, int min, std::string rule) {
    return KeyOf<StageSpec>{std::move(name),
                            [=](Field& f, StageSpec& st) {
                              f.read(st.*member);
                              f.check(st.*member >= min, rule, st.*member);
                            },
                            [=](Out& o, const StageSpec& st) { o.put(st.*member); }};
  };
  // Checked when given (an explicit 0 width is an error, not "model.width"); dumped
  // only when it differs from the member's default.
  const auto optional_key = [](std::string name, int StageSpec::*member, int min, std::string rule) {
    return KeyOf<StageSpec>{std::move(name),
                            [=](Field& f, StageSpec& st) {
                              f.read(st.*member);  // marks the key read even when its value is empty
                              if (f.r.has(f.key)) f.check(st.*member >= min, rule, st.*member);
                            },
                            [=](Out& o, const StageSpec& st) {
                              if (st.*member != StageSpec{}.*member) o.put(st.*member);
                            }};
  };
  static const std::vector<KeyOf<StageSpec>> keys = {
      int_key("down", &StageSpec::down, 1, "must be >= 1 (the pooling factor from the previous stage; 1 = none)"),
      int_key("blocks", &StageSpec::blocks, 0, "must be >= 0 (encoder residual blocks)"),
      int_key("groups", &StageSpec::groups, 0, "must be >= 0 (decoder blocks, one latent group each)"),
      int_key("latent", &StageSpec::latent, 1, "must be >= 1 (latent channels per position of each group)"),
      // Dumped only when not the default, so the specs written before the key existed
      // (config.yaml, model files) read back and dump unchanged.
      KeyOf<StageSpec>{"resample", [](Field& f, StageSpec& st) { f.read(st.resample); },
                       [](Out& o, const StageSpec& st) {
                         if (st.resample != Resample::Pool) o.put(st.resample);
                       }},
      // The keys below are left out of the dump at their defaults: specs written
      // before they existed keep their text (run directories, checkpoints).
      optional_key("dec_blocks", &StageSpec::dec_blocks, 0, "must be >= 0 (decoder residual blocks after the groups)"),
      optional_key("width", &StageSpec::width, 1,
                   "must be >= 1 (channels of the stream at this resolution; leave it out for model.width)"),
      optional_key("bottleneck", &StageSpec::bottleneck, 1,
                   "must be >= 1 (channels inside this stage's residual blocks; leave it out for model.bottleneck)"),
  };
  return keys;
}

// model.stages: mappings {down, blocks, groups, latent, dec_blocks, width, bottleneck},
// the input's resolution first.
std::vector<StageSpec> read_stages(Field& f) {
  YAML::Node n = f.r.raw(f.key);
  const std::string where = f.r.path(f.key);
  if (!n || n.IsNull()) f.r.fail(f.r.node(), where, "is required for model.type hierarchical (a list of stages)");
  if (!n.IsSequence() || n.size() == 0)
    f.r.fail(n, where,
             "must be a non-empty list of stages, the input's resolution first, e.g. [{down: 1, blocks: 2, "
             "groups: 2, latent: 4}, {down: 2, blocks: 2, groups: 4, latent: 4}]");
  std::vector<StageSpec> out;
  int groups = 0;
  for (size_t i = 0; i < n.size(); ++i) {
    MapReader r = f.r.entry(n[i], where + "[" + std::to_string(i) + "].");
    if (!n[i].IsMap())
      r.fail(n[i], where + "[" + std::to_string(i) + "]",
             "must be a mapping {down, blocks, groups, latent, dec_blocks, width, bottleneck}");
    StageSpec st;
    read_keys(r, stage_keys(), st);
    groups += st.groups;
    out.push_back(st);
  }
  if (groups == 0) f.r.fail(n, where, "has no latent group: give at least one stage groups >= 1");
  return out;
}

// Keys that only one model type reads: given for another type they would be ignored,
// so they are refused; dumped only for their type (a dump of another type is unchanged).
Key model_key_of(ModelType type, Key k) {
  const auto read = k.read;
  const auto dump = k.dump;
  k.read = [=](Field& f, ExperimentSpec& s) {
    if (s.model.type == type) return read(f, s);
    if (f.r.has(f.key))
      f.fail(std::string("applies to model.type ") + choice_name(type) + " only (this model is " +
             choice_name(s.model.type) + ")");
  };
  k.dump = [=](Out& o, const ExperimentSpec& s) {
    if (s.model.type == type) dump(o, s);
  };
  return k;
}

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

// The spec's keys: the top level's own keys, then one section per mapping.
const std::vector<Section>& spec_sections() {
  const SectionKeys<DataSpec> data{&ExperimentSpec::data};
  const SectionKeys<ModelSpec> model{&ExperimentSpec::model};
  const SectionKeys<LossSpec> loss{&ExperimentSpec::loss};
  const SectionKeys<OptimSpec> optim{&ExperimentSpec::optim};
  const SectionKeys<TrainSpec> train{&ExperimentSpec::train};
  const SectionKeys<EvalSpec> eval{&ExperimentSpec::eval};
  const SectionKeys<OutputSpec> output{&ExperimentSpec::output};
  const SectionKeys<DistSpec> dist{&ExperimentSpec::dist};
  const SectionKeys<CheckpointSpec> checkpoint{&ExperimentSpec::checkpoint};
  const auto at_least_0 = [](auto v) { return v >= 0; };
  const auto at_least_1 = [](auto v) { return v >= 1; };
  const auto positive = [](auto v) { return v > 0; };
  // Keys whose change alters the model or the sequence of samples, eps and
  // binarization draws are fixed(): continuing under another value would not be the
  // same run.
  static const std::vector<Section> sections = {
      {"",
       {
           {"name",
            [](Field& f, ExperimentSpec& s) {
              f.read(s.name);
              f.check(!s.name.empty(), "must not be empty", "''");
            },
            [](Out& o, const ExperimentSpec& s) { o.put(s.name); }},
           fixed({"seed",
                  [](Field& f, ExperimentSpec& s) {
                    int64_t seed = static_cast<int64_t>(s.seed);
                    f.read(seed);
                    f.check(seed >= 0, "must be >= 0", seed);
                    s.seed = static_cast<uint64_t>(seed);
                  },
                  [](Out& o, const ExperimentSpec& s) { o.put(s.seed); }}),
           {"device", [](Field& f, ExperimentSpec& s) { f.read(s.device); },
            [](Out& o, const ExperimentSpec& s) { o.put(s.device); }},
       }},
      {"data",
       {
           {"train", [](Field& f, ExperimentSpec& s) { f.require(s.data.train); },
            [](Out& o, const ExperimentSpec& s) { o.put(s.data.train); }},
           data.field("test", &DataSpec::test),
           {"shape",
            [](Field& f, ExperimentSpec& s) {
              auto& shape = s.data.shape;
              shape = f.r.int_list(f.key, {});
              if (shape.empty()) return;
              const bool ok = shape.size() == 3 && shape[0] > 0 && shape[1] > 0 && shape[2] > 0;
              f.check(ok, "must be [channels, height, width] with positive entries", shape.size());
            },
            [](Out& o, const ExperimentSpec& s) {
              if (!s.data.shape.empty()) o.put(s.data.shape);  // optional: absent = taken from the shards
            }},
           fixed(data.field("binarize", &DataSpec::binarize)),
           // Any YAML boolean spelling (yes, off, ...) for Global and Off.
           fixed({"shuffle",
                  [](Field& f, ExperimentSpec& s) {
                    const std::string text = f.r.get<std::string>(f.key, choice_name(s.data.shuffle));
                    bool flag = true;
                    const std::optional<Shuffle> named = parse_choice<Shuffle>(text);
                    f.check(named || YAML::convert<bool>::decode(YAML::Node(text), flag),
                            "must be true (a global permutation), false or blocks (the locality-aware order for "
                            "streaming)",
                            "'" + text + "'");
                    s.data.shuffle = named ? *named : flag ? Shuffle::Global : Shuffle::Off;
                  },
                  [](Out& o, const ExperimentSpec& s) {
                    if (s.data.shuffle == Shuffle::Blocks)
                      o.put(choice_name(s.data.shuffle));
                    else
                      o.put(s.data.shuffle == Shuffle::Global);  // a YAML boolean, as earlier versions wrote
                  }}),
           fixed(data.field("max_samples", &DataSpec::max_samples, at_least_0, "must be >= 0 (0 = all)")),
           data.field("loader", &DataSpec::loader),
           data.field(
               "cache_mb", &DataSpec::cache_mb, [](double v) { return v > 0 && v <= 1e9; },
               "must be > 0 (MiB per rank)"),
       }},
      {"model",
       {
           fixed(model.field("type", &ModelSpec::type)),
           model_list("encoder", &ModelSpec::encoder, &ModelSpec::conv_encoder),
           model_list("decoder", &ModelSpec::decoder, &ModelSpec::conv_decoder),
           // A hierarchical model's latents are its stages' groups.
           fixed({"latent",
                  [](Field& f, ExperimentSpec& s) {
                    if (s.model.type == ModelType::Hierarchical) {
                      if (f.r.has(f.key))
                        f.fail("a hierarchical model's latent channels are model.stages[i].latent (per group)");
                      return;
                    }
                    f.read(s.model.latent);
                    f.check(s.model.latent >= 1, "must be >= 1", s.model.latent);
                  },
                  [](Out& o, const ExperimentSpec& s) {
                    if (s.model.type != ModelType::Hierarchical) o.put(s.model.latent);
                  }}),
           // The hidden activation of an MLP and of a hierarchical model's residual
           // blocks; a conv model lists its activations as layers.
           fixed({"activation",
                  [](Field& f, ExperimentSpec& s) {
                    ModelSpec& m = s.model;
                    if (m.type == ModelType::Mlp || m.type == ModelType::Hierarchical) {
                      m.activation =
                          f.r.choice(f.key, m.activation, {Activation::Relu, Activation::Tanh, Activation::Softplus});
                    } else if (f.r.has(f.key)) {
                      f.fail(
                          "conv models take activations as entries of the encoder and decoder lists (e.g. "
                          "{type: relu})");
                    }
                  },
                  [](Out& o, const ExperimentSpec& s) {
                    if (s.model.type != ModelType::Conv) o.put(s.model.activation);
                  }}),
           // A bare type ("bernoulli") or the mapping {type, variance, sigma}.
           fixed({"likelihood",
                  [](Field& f, ExperimentSpec& s) {
                    if (f.r.has(f.key) && f.r.raw(f.key).IsScalar()) {
                      LikelihoodType t = LikelihoodType::Bernoulli;
                      f.read(t);
                      s.model.likelihood = likelihood_of(t, Variance::Fixed);
                      check_pixels_for(f, s);
                    } else {
                      mapping(f.key, likelihood_keys()).read(f, s);
                    }
                  },
                  mapping("likelihood", likelihood_keys()).dump}),
           fixed(model_key_of(ModelType::Hierarchical, model.field("width", &ModelSpec::width, at_least_1,
                                                                   "must be >= 1 (channels of the residual stream)"))),
           fixed(model_key_of(ModelType::Hierarchical, model.field("bottleneck", &ModelSpec::bottleneck, at_least_1,
                                                                   "must be >= 1 (channels inside a residual block)"))),
           fixed(model_key_of(ModelType::Hierarchical,
                              {"stages", [](Field& f, ExperimentSpec& s) { s.model.stages = read_stages(f); },
                               [](Out& o, const ExperimentSpec& s) {
                                 YAML::Emitter& e = o.value();
                                 e << YAML::BeginSeq;
                                 for (const StageSpec& st : s.model.stages) {
                                   e << YAML::Flow << YAML::BeginMap;
                                   dump_keys(e, stage_keys(), st);
                                   e << YAML::EndMap;
                                 }
                                 e << YAML::EndSeq;
                               }})),
       }},
      {"loss",
       {
           {"type",
            [](Field& f, ExperimentSpec& s) {
              f.read(s.loss.type);
              // The importance-weighted passes (forward_iw/backward_iw) exist for the
              // Vae alone; the hierarchical model's IWAE bound is an evaluation figure.
              if (s.loss.type == LossType::Iwae && s.model.type == ModelType::Hierarchical)
                f.fail(
                    "iwae training is built for mlp and conv models; model.type: hierarchical trains the ELBO "
                    "(loss.type: elbo) and reports its IWAE bound in evaluation (eval.iw_samples)");
            },
            [](Out& o, const ExperimentSpec& s) { o.put(s.loss.type); }},
           {"samples",
            [](Field& f, ExperimentSpec& s) {
              LossSpec& l = s.loss;
              f.read(l.samples);
              f.check(l.samples >= 1, "must be >= 1 (importance samples per input)", l.samples);
              f.check(l.samples == 1 || l.type == LossType::Iwae,
                      "is the IWAE bound's number of samples; set loss.type: iwae (the ELBO takes one sample)",
                      l.samples);
            },
            [](Out& o, const ExperimentSpec& s) { o.put(s.loss.samples); }},
           {"dreg",
            [](Field& f, ExperimentSpec& s) {
              f.read(s.loss.dreg);
              f.check(!s.loss.dreg || s.loss.type == LossType::Iwae,
                      "is an estimator of the IWAE bound's encoder gradient; set loss.type: iwae", "true");
            },
            [](Out& o, const ExperimentSpec& s) { o.put(s.loss.dreg); }},
           loss.field("beta", &LossSpec::beta, at_least_0, "must be >= 0"),
           loss.field("kl_schedule", &LossSpec::kl_schedule),
           // Read after kl_schedule: a warm-up under the cyclical schedule would be
           // silently ignored, so it is refused instead.
           {"kl_warmup_steps",
            [](Field& f, ExperimentSpec& s) {
              LossSpec& l = s.loss;
              f.read(l.kl_warmup_steps);
              f.check(l.kl_warmup_steps >= 0, "must be >= 0", l.kl_warmup_steps);
              if (l.kl_schedule == KlSchedule::Cyclical && l.kl_warmup_steps > 0)
                f.fail("is the linear schedule's warm-up; loss.kl_schedule: cyclical ramps with loss.kl_cycles and "
                       "loss.kl_ramp instead (drop one of them)");
            },
            [](Out& o, const ExperimentSpec& s) { o.put(s.loss.kl_warmup_steps); }},
           loss.field("kl_cycles", &LossSpec::kl_cycles, at_least_1, "must be >= 1"),
           loss.field(
               "kl_ramp", &LossSpec::kl_ramp, [](double v) { return v > 0 && v <= 1; },
               "must be in (0, 1] (the share of each cycle spent ramping)"),
           {"free_bits",
            [](Field& f, ExperimentSpec& s) {
              LossSpec& l = s.loss;
              f.read(l.free_bits);
              f.check(l.free_bits >= 0 && std::isfinite(l.free_bits),
                      "must be >= 0 (nats per latent dimension; 0 = off)", l.free_bits);
              // The floor acts on the closed-form KL, which the importance-weighted bound does not have.
              f.check(l.free_bits == 0 || l.type == LossType::Elbo,
                      "floors the ELBO's closed-form KL; loss.type: iwae has none (set one of them off)", l.free_bits);
            },
            [](Out& o, const ExperimentSpec& s) { o.put(s.loss.free_bits); }},
           {"free_bits_group",
            [](Field& f, ExperimentSpec& s) {
              f.read(s.loss.free_bits_group);
              f.check(s.loss.free_bits_group >= 1, "must be >= 1 (latent dimensions per group)",
                      s.loss.free_bits_group);
              // A hierarchical model's free-bits groups are its latent groups.
              f.check(s.loss.free_bits_group == 1 || s.model.type != ModelType::Hierarchical,
                      "groups the latent dimensions of mlp and conv models; with model.type: hierarchical free "
                      "bits floor each latent group (model.stages) at loss.free_bits times its elements (drop "
                      "loss.free_bits_group)",
                      s.loss.free_bits_group);
            },
            [](Out& o, const ExperimentSpec& s) { o.put(s.loss.free_bits_group); }},
       }},
      {"optim",
       {
           optim.field("type", &OptimSpec::type),
           optim.field("lr", &OptimSpec::lr, positive, "must be > 0"),
           optim.field(
               "beta1", &OptimSpec::beta1, [](double v) { return v >= 0 && v < 1; }, "must be in [0, 1)"),
           optim.field(
               "beta2", &OptimSpec::beta2, [](double v) { return v >= 0 && v < 1; }, "must be in [0, 1)"),
           optim.field("eps", &OptimSpec::eps, positive, "must be > 0"),
           {"weight_decay",
            [](Field& f, ExperimentSpec& s) {
              OptimSpec& o = s.optim;
              o.weight_decay = o.type == OptimizerType::AdamW ? 0.01 : 0.0;  // AdamW's usual default
              f.read(o.weight_decay);
              f.check(o.weight_decay >= 0, "must be >= 0", o.weight_decay);
            },
            [](Out& o, const ExperimentSpec& s) { o.put(s.optim.weight_decay); }},
           optim.field("grad_clip", &OptimSpec::grad_clip, at_least_0, "must be >= 0 (0 = off)"),
           optim.field("schedule", &OptimSpec::schedule),
           optim.field("warmup_steps", &OptimSpec::warmup_steps, at_least_0, "must be >= 0"),
           {"min_lr",
            [](Field& f, ExperimentSpec& s) {
              OptimSpec& o = s.optim;
              f.read(o.min_lr);
              f.check(o.min_lr >= 0 && o.min_lr <= o.lr, "must be in [0, optim.lr]", o.min_lr);
            },
            [](Out& o, const ExperimentSpec& s) { o.put(s.optim.min_lr); }},
           optim.field(
               "ema", &OptimSpec::ema, [](double v) { return v >= 0 && v < 1; },
               "must be in [0, 1) (0 = off; e.g. 0.9999)"),
       }},
      {"train",
       {
           fixed(train.field("batch_size", &TrainSpec::batch_size, at_least_1, "must be >= 1")),
           train.field("epochs", &TrainSpec::epochs, at_least_1, "must be >= 1"),
           train.field("max_steps", &TrainSpec::max_steps, at_least_0, "must be >= 0 (0 = no cap)"),
           fixed(train.field("drop_last", &TrainSpec::drop_last)),
           train.field("log_every", &TrainSpec::log_every, at_least_1, "must be >= 1"),
           train.field("threads", &TrainSpec::threads, at_least_0, "must be >= 0 (0 = automatic)"),
           train.field("on_nonfinite", &TrainSpec::on_nonfinite),
           train.field("max_consecutive_skips", &TrainSpec::max_consecutive_skips, at_least_1, "must be >= 1"),
           train.field(
               "max_skip_fraction", &TrainSpec::max_skip_fraction, [](double v) { return v >= 0 && v <= 1; },
               "must be in [0, 1]"),
           train.field(
               "skip_threshold", &TrainSpec::skip_threshold, [](double v) { return std::isfinite(v) && v >= 0; },
               "must be a finite number >= 0 (0 = off)"),
           {"accumulate",
            [](Field& f, ExperimentSpec& s) {
              f.read(s.train.accumulate);
              f.check(s.train.accumulate >= 1, "must be >= 1 (1 = no accumulation)", s.train.accumulate);
              // The floor of free bits applies to the whole batch's KL before any
              // backward pass; micro-batches run their backward passes one by one.
              f.check(s.train.accumulate == 1 || s.loss.free_bits == 0,
                      "cannot be used with loss.free_bits (the floor needs the whole batch's KL before the "
                      "backward pass); set one of them off",
                      s.train.accumulate);
            },
            [](Out& o, const ExperimentSpec& s) { o.put(s.train.accumulate); }},
           train.field("cuda_graph", &TrainSpec::cuda_graph),
           train.field("deterministic", &TrainSpec::deterministic),
           train.field("patience", &TrainSpec::patience, at_least_0, "must be >= 0 (0 = never stop early)"),
       }},
      {"eval",
       {
           eval.field("at_end", &EvalSpec::at_end),
           eval.field("iw_samples", &EvalSpec::iw_samples, at_least_0, "must be >= 0 (0 = skip the IWAE bound)"),
           eval.field("batch_size", &EvalSpec::batch_size, at_least_1, "must be >= 1"),
           {"every",
            [](Field& f, ExperimentSpec& s) {
              f.read(s.eval.every);
              f.check(s.eval.every >= 0, "must be >= 0 (0 = only at the end)", s.eval.every);
              f.check(s.eval.every == 0 || !s.data.test.empty(), "needs data.test, the held-out split to evaluate on",
                      s.eval.every);
              // train.patience (read before this section) counts these evaluations.
              f.check(s.eval.every > 0 || s.train.patience == 0,
                      "must be > 0 with train.patience: " + std::to_string(s.train.patience) +
                          " (patience counts the evaluations during training)",
                      s.eval.every);
            },
            [](Out& o, const ExperimentSpec& s) { o.put(s.eval.every); }},
           eval.field("max_samples", &EvalSpec::max_samples, at_least_0, "must be >= 0 (0 = the whole split)"),
           eval.field("images", &EvalSpec::images),
       }},
      {"output",
       {
           {"dir",
            [](Field& f, ExperimentSpec& s) {
              f.read(s.output.dir);
              f.check(!s.output.dir.empty(), "must not be empty", "''");
            },
            [](Out& o, const ExperimentSpec& s) { o.put(s.output.dir); }},
           output.field("overwrite", &OutputSpec::overwrite),
           output.field("tensorboard", &OutputSpec::tensorboard),
       }},
      {"dist",
       {
           {"communicator",
            [](Field& f, ExperimentSpec& s) {
              s.dist.communicator =
                  f.r.choice(f.key, s.dist.communicator, {CommKind::Auto, CommKind::Nccl, CommKind::Mpi});
            },
            [](Out& o, const ExperimentSpec& s) { o.put(s.dist.communicator); }},
           dist.field("bucket_mb", &DistSpec::bucket_mb, at_least_0,
                      "must be >= 0 (0 = one all-reduce after backward)"),
           dist.field("timeout_s", &DistSpec::timeout_s, at_least_0, "must be >= 0 (0 = wait forever)"),
           dist.field("self_test", &DistSpec::self_test),
           dist.field("shard_optimizer", &DistSpec::shard_optimizer),
           dist.field("min_link_mbps", &DistSpec::min_link_mbps, at_least_0,
                      "must be >= 0 (0 = never measure the links between nodes)"),
       }},
      {"checkpoint",
       {
           checkpoint.field("every", &CheckpointSpec::every, at_least_0,
                            "must be >= 0 (0 = only at the end and on a stop signal)"),
           checkpoint.field("keep", &CheckpointSpec::keep, at_least_0, "must be >= 0 (0 = keep all)"),
           checkpoint.field("grace_s", &CheckpointSpec::grace_s, positive, "must be > 0"),
       }},
  };
  return sections;
}

ExperimentSpec build(YAML::Node root, Context& ctx) {
  ExperimentSpec s;
  s.source = ctx.source;
  s.overrides = ctx.overrides;
  MapReader top(root, "", ctx);
  std::vector<std::string> known;
  for (const Section& sec : spec_sections()) {
    if (sec.name.empty()) {
      for (const Key& k : sec.keys) {
        Field f{top, k.name};
        k.read(f, s);
        known.push_back(k.name);
      }
    } else {
      MapReader r = top.sub(sec.name);
      read_keys(r, sec.keys, s);
      known.push_back(sec.name);
    }
  }
  top.finish(known);
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
  e << YAML::BeginMap;
  for (const Section& sec : spec_sections()) {
    if (sec.name.empty()) {
      dump_keys(e, sec.keys, s);
      continue;
    }
    e << YAML::Key << sec.name << YAML::Value << YAML::BeginMap;
    dump_keys(e, sec.keys, s);
    e << YAML::EndMap;
  }
  e << YAML::EndMap;
  return std::string(e.c_str()) + "\n";
}

bool fixed_on_resume(const std::string& key) {
  // "model.likelihood.sigma" is ruled by its key in a section, "model.likelihood";
  // "seed" by a key of the top level.
  const size_t dot = key.find('.');
  const std::string section = dot == std::string::npos ? "" : key.substr(0, dot);
  const std::string rest = dot == std::string::npos ? key : key.substr(dot + 1);
  const std::string name = rest.substr(0, rest.find_first_of(".["));
  for (const Section& sec : spec_sections()) {
    if (sec.name != section) continue;
    for (const Key& k : sec.keys)
      if (k.name == name) return k.resume == Resume::Fixed;
  }
  return false;
}

}  // namespace elbo
