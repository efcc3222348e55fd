// The hierarchical VAE over the flat buffers, written once for every backend: the
// layout (stages, blocks and groups, parameter offsets and names, initialization)
// and the forward, backward and prior-sampling passes (structure: hvae.hpp).
#include "elbo/model/hvae.hpp"

#include <algorithm>
#include <cmath>

#include "elbo/util/error.hpp"
#include "elbo/util/files.hpp"

namespace elbo {

namespace {

// softplus^-1(1) = log(e - 1): the raw scale at which sigma = softplus(raw) = 1.
const double kUnitScaleRaw = std::log(std::exp(1.0) - 1.0);

size_t params_end(const Layer& l) { return l.b + static_cast<size_t>(l.out.c); }

std::string res_text(int h, int w) { return std::to_string(h) + "x" + std::to_string(w); }

}  // namespace

size_t HvaeLayout::place(size_t n) {
  // 64-byte aligned views, as VaeLayout's (vectorized kernels, cuBLASLt epilogues).
  constexpr size_t A = VaeLayout::kParamAlign;
  const size_t at = (m_num_params + A - 1) / A * A;
  m_num_params = at + n;
  m_num_values += n;
  return at;
}

Layer HvaeLayout::conv(TensorShape in, int out_channels, int kernel, Activation act, const std::string& name) {
  Layer l;
  l.kind = LayerKind::Conv2d;
  l.in = in;
  l.out = TensorShape{out_channels, in.h, in.w};
  l.kernel = kernel;
  l.stride = 1;
  l.pad = kernel / 2;  // "same" padding: 1x1 and 3x3 keep the resolution
  l.act = act;
  l.w = place(static_cast<size_t>(out_channels) * in.c * kernel * kernel);
  m_views.push_back({name + ".weight", l.w, {out_channels, in.c, kernel, kernel}});
  l.b = place(static_cast<size_t>(out_channels));
  m_views.push_back({name + ".bias", l.b, {out_channels}});
  m_max_width = std::max({m_max_width, in.size(), l.out.size()});
  return l;
}

Layer HvaeLayout::resample(LayerKind kind, TensorShape in, TensorShape out, int down, const std::string& name) {
  Layer l;
  l.kind = kind;
  l.in = in;
  l.out = out;
  l.kernel = down;
  l.stride = down;
  l.pad = 0;
  l.act = Activation::Identity;
  // PyTorch's weight shapes: Conv2d (out, in, k, k), ConvTranspose2d (in, out, k, k).
  const int first = kind == LayerKind::Conv2d ? out.c : in.c, second = kind == LayerKind::Conv2d ? in.c : out.c;
  l.w = place(static_cast<size_t>(first) * second * down * down);
  m_views.push_back({name + ".weight", l.w, {first, second, down, down}});
  l.b = place(static_cast<size_t>(out.c));
  m_views.push_back({name + ".bias", l.b, {out.c}});
  m_max_width = std::max({m_max_width, in.size(), out.size()});
  return l;
}

HvaeBranch HvaeLayout::branch(TensorShape in, int B, int out_channels, const std::string& name) {
  const Activation act = m_spec.activation;
  HvaeBranch b;
  b.c1 = conv(in, B, 1, act, name + ".c1");
  b.c2 = conv(b.c1.out, B, 3, act, name + ".c2");
  b.c3 = conv(b.c2.out, out_channels, 1, Activation::Identity, name + ".c3");
  return b;
}

HvaeLayout::HvaeLayout(const ModelSpec& spec, const std::vector<int>& input_shape) : m_spec(spec) {
  if (!is_sample_shape(input_shape))
    throw model_error("model input shape must be [C, H, W] with positive sizes (got " +
                      shape_string(input_shape, "[]") + ")");
  if (spec.type != ModelType::Hierarchical)
    throw model_error(std::string("HvaeLayout builds model.type hierarchical, not ") + choice_name(spec.type));
  if (spec.stages.empty()) throw config_error("model.stages: a hierarchical model needs at least one stage");
  if (spec.width < 1 || spec.bottleneck < 1) throw config_error("model.width and model.bottleneck must be >= 1");
  if (spec.activation == Activation::Identity)
    throw config_error("model.activation: a hierarchical model's blocks need a nonlinearity (relu, tanh, softplus)");
  m_input = TensorShape{input_shape[0], input_shape[1], input_shape[2]};
  for (size_t s = 0; s < spec.stages.size(); ++s) {
    const StageSpec& st = spec.stages[s];
    const std::string at = "model.stages[" + std::to_string(s) + "]";
    if (st.down < 1) throw config_error(at + ": down must be >= 1");
    if (st.blocks < 0 || st.groups < 0 || st.dec_blocks < 0)
      throw config_error(at + ": blocks, groups and dec_blocks must be >= 0");
    if (st.groups > 0 && st.latent < 1) throw config_error(at + ": latent must be >= 1");
    // 0 stands for model.width / model.bottleneck (StageSpec); below it is an error.
    if (st.width < 0 || st.bottleneck < 0)
      throw config_error(at +
                         ": width and bottleneck must be >= 1 (leave them out for model.width and "
                         "model.bottleneck)");
  }

  m_stem = conv(m_input, spec.stage_width(0), 3, Activation::Identity, "encoder.in");
  TensorShape cur{spec.stage_width(0), m_input.h, m_input.w};
  for (size_t s = 0; s < spec.stages.size(); ++s) {
    const StageSpec& st = spec.stages[s];
    const std::string at = "model.stages[" + std::to_string(s) + "]";
    if (cur.h % st.down != 0 || cur.w % st.down != 0)
      throw config_error(at + ": down " + std::to_string(st.down) + " does not divide the " + res_text(cur.h, cur.w) +
                         " resolution of " + (s == 0 ? std::string("the input") : "stage " + std::to_string(s - 1)));
    HvaeStage stage;
    stage.down = st.down;
    stage.outer = cur;
    stage.bottleneck = spec.stage_bottleneck(s);
    cur = TensorShape{spec.stage_width(s), cur.h / st.down, cur.w / st.down};
    stage.shape = cur;
    // resample: conv learns the change of resolution and of width; a stage that
    // changes neither has nothing to learn.
    stage.learned = st.resample == Resample::Conv && (st.down > 1 || stage.outer.c != stage.shape.c);
    if (stage.learned)
      stage.down_conv =
          resample(LayerKind::Conv2d, stage.outer, cur, st.down, "encoder.stages." + std::to_string(s) + ".down");
    for (int b = 0; b < st.blocks; ++b) {
      stage.blocks.push_back(static_cast<int>(m_enc.size()));
      m_enc.push_back(
          {static_cast<int>(s), branch(cur, stage.bottleneck, cur.c,
                                       "encoder.stages." + std::to_string(s) + ".blocks." + std::to_string(b))});
    }
    // The stream's tensors around this stage's pooling and resizing (hvae.hpp).
    const size_t outer_pos = static_cast<size_t>(stage.outer.h) * stage.outer.w;
    const size_t pos = static_cast<size_t>(cur.h) * cur.w;
    m_max_stream = std::max({m_max_stream, stage.outer.size(), cur.size(), stage.outer.c * pos, cur.c * outer_pos});
    m_stages.push_back(stage);
  }

  const TensorShape top = m_stages.back().shape;
  m_h_top = place(top.size());
  m_views.push_back({"decoder.h_top", m_h_top, {top.c, top.h, top.w}});
  for (size_t s = m_stages.size(); s-- > 0;) {
    const StageSpec& st = spec.stages[s];
    HvaeStage& stage = m_stages[s];
    const TensorShape sh = stage.shape;
    const int W = sh.c, B = stage.bottleneck;
    const std::string prefix = "decoder.stages." + std::to_string(s);
    for (int g = 0; g < st.groups; ++g) {
      const std::string name = prefix + ".groups." + std::to_string(g);
      HvaeGroup grp;
      grp.stage = static_cast<int>(s);
      grp.shape = sh;
      grp.zc = st.latent;
      grp.eps_offset = m_latent_size;
      grp.q = branch(TensorShape{2 * W, sh.h, sh.w}, B, 2 * st.latent, name + ".q");
      grp.prior = branch(sh, B, 2 * st.latent + W, name + ".prior");
      grp.z_proj = conv(TensorShape{st.latent, sh.h, sh.w}, W, 1, Activation::Identity, name + ".z_proj");
      grp.resnet = branch(sh, B, W, name + ".resnet");
      m_latent_size += grp.numel();
      stage.groups.push_back(static_cast<int>(m_groups.size()));
      m_groups.push_back(grp);
    }
    // PyTorch's named_parameters order within a decoder stage: its groups, its blocks, its up_conv.
    for (int b = 0; b < st.dec_blocks; ++b) {
      stage.dec_blocks.push_back(static_cast<int>(m_dec.size()));
      m_dec.push_back({static_cast<int>(s), branch(sh, B, W, prefix + ".blocks." + std::to_string(b))});
    }
    if (stage.learned) stage.up_conv = resample(LayerKind::ConvTranspose2d, sh, stage.outer, st.down, prefix + ".up");
  }
  if (m_groups.empty()) throw config_error("model.stages: no stage has a latent group (groups >= 1)");
  // The likelihood's values per pixel: C, 2C ([mean | logvar]) or the mixture's K*(1 + 2C + C(C-1)/2).
  const int out_c = static_cast<int>(likelihood().output_width() / (static_cast<size_t>(m_input.h) * m_input.w));
  m_out =
      conv(TensorShape{m_stages.front().outer.c, m_input.h, m_input.w}, out_c, 1, Activation::Identity, "decoder.out");
}

std::vector<double> HvaeLayout::init_params(uint64_t seed) const {
  std::vector<double> p(m_num_params, 0.0);  // alignment gaps stay zero
  // Keyed by the value's position among all values (the views' order), not by its
  // offset in the padded buffer; values set to a constant still take their index.
  uint32_t value = 0;
  auto uniform = [&](size_t begin, size_t n, double bound, double scale) {
    for (size_t i = 0; i < n; ++i, ++value)
      p[begin + i] = scale * bound * (2.0 * philox_uniform(seed, RngStream::Init, 0, value, 0) - 1.0);
  };
  auto conv = [&](const Layer& l, double weight_scale) {
    const size_t nw = static_cast<size_t>(l.out.c) * l.in.c * l.kernel * l.kernel;
    const double bound = 1.0 / std::sqrt(static_cast<double>(l.in.c) * l.kernel * l.kernel);
    uniform(l.w, nw, bound, weight_scale);
    uniform(l.b, static_cast<size_t>(l.out.c), bound, 1.0);
  };
  auto branch = [&](const HvaeBranch& b, double last_scale) {
    conv(b.c1, 1.0);
    conv(b.c2, 1.0);
    conv(b.c3, last_scale);
  };
  const double enc_scale = 1.0 / std::sqrt(static_cast<double>(std::max<size_t>(m_enc.size(), 1)));
  const double dec_scale = 1.0 / std::sqrt(static_cast<double>(m_groups.size() + m_dec.size()));
  // ConvTranspose2d's fan-in is PyTorch's: weight dim 1 (its output channels) x k x k.
  auto up = [&](const Layer& l) {
    const double bound = 1.0 / std::sqrt(static_cast<double>(l.out.c) * l.kernel * l.kernel);
    uniform(l.w, static_cast<size_t>(l.in.c) * l.out.c * l.kernel * l.kernel, bound, 1.0);
    uniform(l.b, static_cast<size_t>(l.out.c), bound, 1.0);
  };
  // In the views' order: per stage its down_conv, then its blocks.
  conv(m_stem, 1.0);
  for (const HvaeStage& st : m_stages) {
    if (st.learned) conv(st.down_conv, 1.0);
    for (int i : st.blocks) branch(m_enc[static_cast<size_t>(i)].branch, enc_scale);
  }
  value += static_cast<uint32_t>(top_shape().size());  // decoder.h_top starts at zero
  // The decoder, top stage first: its groups, its blocks, its up_conv.
  for (size_t s = m_stages.size(); s-- > 0;) {
    for (int gi : m_stages[s].groups) {
      const HvaeGroup& g = m_groups[static_cast<size_t>(gi)];
      branch(g.q, 1.0);
      conv(g.prior.c1, 1.0);
      conv(g.prior.c2, 1.0);
      // The prior's last conv: zero weights, zero bias but sigma_p's raw scale at
      // softplus^-1(1), so p(z_l | z_>l) starts as N(0, I) and h_p as 0.
      const Layer& c3 = g.prior.c3;
      value += static_cast<uint32_t>(static_cast<size_t>(c3.out.c) * c3.in.c + c3.out.c);
      for (int c = g.zc; c < 2 * g.zc; ++c) p[c3.b + c] = kUnitScaleRaw;
      conv(g.z_proj, dec_scale);
      branch(g.resnet, dec_scale);
    }
    for (int i : m_stages[s].dec_blocks) branch(m_dec[static_cast<size_t>(i)].branch, dec_scale);
    if (m_stages[s].learned) up(m_stages[s].up_conv);
  }
  conv(m_out, 1.0);
  return p;
}

template <class T>
typename Hvae<T>::BranchActs Hvae<T>::make_branch(const HvaeBranch& b) {
  const size_t R = static_cast<size_t>(m_max_rows);
  BranchActs a;
  a.a0 = Buffer<T>(m_be, R * b.c1.in.size());
  a.p1 = Buffer<T>(m_be, R * b.c1.out.size());
  a.a1 = Buffer<T>(m_be, R * b.c1.out.size());
  a.p2 = Buffer<T>(m_be, R * b.c2.out.size());
  a.a2 = Buffer<T>(m_be, R * b.c2.out.size());
  a.out = Buffer<T>(m_be, R * b.c3.out.size());
  return a;
}

template <class T>
Hvae<T>::Hvae(const HvaeLayout& layout, Backend<T>& be, int max_rows)
    : m_layout(layout), m_be(be), m_max_rows(max_rows) {
  ELBO_ASSERT(max_rows >= 1, "a replica needs room for at least one sample");
  const size_t R = static_cast<size_t>(max_rows);
  const TensorShape& full = layout.stages().front().outer;  // the stream at the input's resolution
  m_stem_pre = Buffer<T>(be, R * full.size());
  for (const HvaeStage& st : layout.stages()) {
    const size_t pos = hw(st.shape), outer_c = static_cast<size_t>(st.outer.c);
    // Pooling keeps the previous stage's width, a down_conv gives this stage's; the
    // resize, where the width changes without a conv, follows the pooling in the
    // encoder and precedes the unpooling in the decoder.
    const size_t pooled = st.learned ? st.shape.size() : st.down > 1 ? outer_c * pos : 0;
    m_pooled.emplace_back(pooled > 0 ? Buffer<T>(be, R * pooled) : Buffer<T>());
    m_resized.emplace_back(st.resizes() ? Buffer<T>(be, R * st.shape.size()) : Buffer<T>());
    m_dec_resized.emplace_back(st.resizes() ? Buffer<T>(be, R * outer_c * pos) : Buffer<T>());
    // Unpooling (or the up_conv) restores the previous stage's (or the input's) shape.
    m_unpooled.emplace_back(st.learned || st.down > 1 ? Buffer<T>(be, R * st.outer.size()) : Buffer<T>());
    m_de.emplace_back(be, R * st.shape.size());
  }
  for (const HvaeBlock& b : layout.encoder_blocks()) {
    m_enc_acts.push_back(make_branch(b.branch));
    m_enc_out.emplace_back(be, R * b.branch.c3.out.size());
  }
  for (const HvaeBlock& b : layout.decoder_blocks()) {
    m_dec_acts.push_back(make_branch(b.branch));
    m_dec_out.emplace_back(be, R * b.branch.c3.out.size());
  }
  m_dec_in.resize(layout.decoder_blocks().size());
  m_block_in.resize(layout.encoder_blocks().size());
  m_stage_in.resize(layout.stages().size());
  m_stage_out.resize(layout.stages().size());
  m_down_in.resize(layout.stages().size());
  m_up_in.resize(layout.stages().size());
  m_top = Buffer<T>(be, R * layout.top_shape().size());
  size_t max_q = 0, max_p = 0, max_z = 0, max_qin = 0;
  for (const HvaeGroup& g : layout.groups()) {
    GroupActs a;
    const size_t sz = g.shape.size(), pos = static_cast<size_t>(g.shape.h) * g.shape.w;
    a.qin = Buffer<T>(be, R * 2 * sz);
    a.q = make_branch(g.q);
    a.prior = make_branch(g.prior);
    a.resnet = make_branch(g.resnet);
    a.h1 = Buffer<T>(be, R * sz);
    a.z = Buffer<T>(be, R * g.numel());
    a.zp = Buffer<T>(be, R * sz);
    a.h2 = Buffer<T>(be, R * sz);
    a.h3 = Buffer<T>(be, R * sz);
    m_group_acts.push_back(std::move(a));
    max_q = std::max(max_q, 2 * g.numel());
    max_p = std::max(max_p, static_cast<size_t>(2 * g.zc + g.shape.c) * pos);
    max_z = std::max(max_z, g.numel());
    max_qin = std::max(max_qin, 2 * sz);
  }
  const size_t G = static_cast<size_t>(layout.num_groups());
  m_output = Buffer<T>(be, R * layout.output_width());
  m_rec = Buffer<T>(be, R);
  m_kl = Buffer<T>(be, R);
  m_log_ratio = Buffer<T>(be, R);
  m_kl_groups = Buffer<T>(be, R * G);
  m_ratio_groups = Buffer<T>(be, R * G);
  m_ones = Buffer<T>(be, std::max(R, G));
  be.fill(m_ones.data(), T(1), m_ones.size());
  m_kl_weights = Buffer<T>(be, G);
  m_scratch_a = Buffer<T>(be, R * layout.max_width());
  m_scratch_b = Buffer<T>(be, R * layout.max_width());
  m_gstate_a = Buffer<T>(be, R * layout.max_stream());
  m_gstate_b = Buffer<T>(be, R * layout.max_stream());
  m_dq = Buffer<T>(be, R * max_q);
  m_dp = Buffer<T>(be, R * max_p);
  m_dz = Buffer<T>(be, R * max_z);
  m_dqin = Buffer<T>(be, R * max_qin);
  m_pool_grad = Buffer<T>(be, R * layout.max_stream());
}

template <class T>
void Hvae<T>::conv_forward(const Layer& l, const T* params, const T* in, int rows, T* pre, T* out) {
  if (l.kind == LayerKind::ConvTranspose2d)  // the data gradient of the convolution it reverses
    m_be.conv2d_backward_data(l.conv(rows), in, params + l.w, pre);
  else
    m_be.conv2d_forward(l.conv(rows), in, params + l.w, pre);
  m_be.channel_bias_act_forward(l.act, rows, l.out.c, l.out.h * l.out.w, params + l.b, pre, out);
}

template <class T>
void Hvae<T>::conv_backward(const Layer& l, const T* params, T* grads, const T* in, int rows, const T* pre,
                            const T* out, const T* g, T* dpre, T* din,
                            const std::function<void(size_t)>& grads_ready) {
  m_be.channel_bias_act_backward(l.act, rows, l.out.c, l.out.h * l.out.w, pre, out, g, dpre, grads + l.b);
  const ConvShape cs = l.conv(rows);
  if (l.kind == LayerKind::ConvTranspose2d) {
    // The roles swap: dpre is the reversed convolution's input, `in` its output.
    m_be.conv2d_backward_filter(cs, dpre, in, grads + l.w);
    if (din) m_be.conv2d_forward(cs, dpre, params + l.w, din);
  } else {
    m_be.conv2d_backward_filter(cs, in, dpre, grads + l.w);
    if (din) m_be.conv2d_backward_data(cs, dpre, params + l.w, din);
  }
  if (grads_ready) grads_ready(l.w);
}

template <class T>
const T* Hvae<T>::resample_forward(const Layer& l, const T* params, const T* in, int rows, const T*& saved_in, T* out,
                                   const std::function<void(size_t)>& params_needed) {
  saved_in = in;
  if (params_needed) params_needed(params_end(l));
  conv_forward(l, params, in, rows, out, out);
  return out;
}

template <class T>
void Hvae<T>::branch_forward(const HvaeBranch& b, const T* params, const T* in, int rows, BranchActs& a,
                             const std::function<void(size_t)>& params_needed) {
  const Activation act = m_layout.spec().activation;
  m_be.activation_forward(act, static_cast<size_t>(rows) * b.c1.in.size(), in, a.a0.data());
  const Layer* convs[] = {&b.c1, &b.c2, &b.c3};
  const T* x = a.a0.data();
  T* pre[] = {a.p1.data(), a.p2.data(), a.out.data()};
  T* out[] = {a.a1.data(), a.a2.data(), a.out.data()};
  for (int i = 0; i < 3; ++i) {
    if (params_needed) params_needed(params_end(*convs[i]));
    conv_forward(*convs[i], params, x, rows, pre[i], out[i]);
    x = out[i];
  }
}

template <class T>
void Hvae<T>::residual_forward(const HvaeBranch& b, const T* params, const T* in, int rows, BranchActs& a, T* out,
                               const std::function<void(size_t)>& params_needed) {
  branch_forward(b, params, in, rows, a, params_needed);
  const size_t n = static_cast<size_t>(rows) * b.c1.in.size();
  m_be.channel_copy(1, static_cast<int>(n), 1, in, 1, 0, out, 1, 0, false);
  m_be.axpby(n, T(1), a.out.data(), T(1), out);
}

template <class T>
void Hvae<T>::resize(int rows, int hw, int src_c, const T* src, int dst_c, T* dst) {
  if (dst_c > src_c) m_be.fill(dst, T(0), static_cast<size_t>(rows) * dst_c * hw);
  m_be.channel_copy(rows, hw, std::min(src_c, dst_c), src, src_c, 0, dst, dst_c, 0, false);
}

template <class T>
void Hvae<T>::branch_backward(const HvaeBranch& b, const T* params, T* grads, const T* in, int rows, BranchActs& a,
                              const T* g, T* din, bool accumulate, const std::function<void(size_t)>& grads_ready) {
  const Activation act = m_layout.spec().activation;
  T* A = m_scratch_a.data();
  T* B = m_scratch_b.data();
  // c3 (no activation): A = d(pre) = g; g itself stays untouched (a skip may read it).
  conv_backward(b.c3, params, grads, a.a2.data(), rows, a.out.data(), a.out.data(), g, A, B, grads_ready);
  conv_backward(b.c2, params, grads, a.a1.data(), rows, a.p2.data(), a.a2.data(), B, B, A, grads_ready);
  conv_backward(b.c1, params, grads, a.a0.data(), rows, a.p1.data(), a.a1.data(), A, A, B, grads_ready);
  const size_t n = static_cast<size_t>(rows) * b.c1.in.size();
  m_be.activation_backward(act, n, in, a.a0.data(), B, B);
  if (accumulate)
    m_be.axpby(n, T(1), B, T(1), din);
  else
    m_be.channel_copy(1, static_cast<int>(n), 1, B, 1, 0, din, 1, 0, false);
}

template <class T>
void Hvae<T>::forward(const T* params, const T* x, const T* eps, int rows,
                      const std::function<void(size_t)>& params_needed) {
  ELBO_ASSERT(rows >= 1 && rows <= m_max_rows, "batch rows exceed the replica's workspace");
  const HvaeLayout& L = m_layout;
  // Encoder: x -> stem -> per stage: pool, resize, residual blocks -> e_s.
  if (params_needed) params_needed(params_end(L.stem()));
  conv_forward(L.stem(), params, x, rows, m_stem_pre.data(), m_stem_pre.data());
  const T* cur = m_stem_pre.data();
  for (size_t s = 0; s < L.stages().size(); ++s) {
    const HvaeStage& st = L.stages()[s];
    if (st.learned) {
      cur = resample_forward(st.down_conv, params, cur, rows, m_down_in[s], m_pooled[s].data(), params_needed);
    } else if (st.down > 1) {
      m_be.avg_pool_forward(rows, st.outer.c, st.outer.h, st.outer.w, st.down, cur, m_pooled[s].data());
      cur = m_pooled[s].data();
    }
    if (st.resizes()) {
      resize(rows, static_cast<int>(hw(st.shape)), st.outer.c, cur, st.shape.c, m_resized[s].data());
      cur = m_resized[s].data();
    }
    m_stage_in[s] = cur;
    for (int i : st.blocks) {
      m_block_in[i] = cur;
      residual_forward(L.encoder_blocks()[i].branch, params, cur, rows, m_enc_acts[i], m_enc_out[i].data(),
                       params_needed);
      cur = m_enc_out[i].data();
    }
    m_stage_out[s] = cur;
  }
  decoder_forward(params, eps, rows, true, params_needed);
  const int G = L.num_groups();
  // Per-row sums over the groups as (rows, G) x ones(G).
  m_be.gemm(false, false, rows, 1, G, T(1), m_kl_groups.data(), G, m_ones.data(), 1, T(0), m_kl.data(), 1);
  m_be.gemm(false, false, rows, 1, G, T(1), m_ratio_groups.data(), G, m_ones.data(), 1, T(0), m_log_ratio.data(), 1);
  L.likelihood().forward(m_be, rows, m_output.data(), x, m_rec.data());
}

template <class T>
void Hvae<T>::sample(const T* params, const T* eps, int rows) {
  ELBO_ASSERT(rows >= 1 && rows <= m_max_rows, "batch rows exceed the replica's workspace");
  decoder_forward(params, eps, rows, false, {});
}

template <class T>
void Hvae<T>::decoder_forward(const T* params, const T* eps, int rows, bool posterior,
                              const std::function<void(size_t)>& params_needed) {
  const HvaeLayout& L = m_layout;
  const int G = L.num_groups();
  const size_t E = L.latent_size();
  // The top of the stream: decoder.h_top repeated over the rows, ones(rows, 1) x h_top(1, D).
  const int top = static_cast<int>(L.top_shape().size());
  if (params_needed) params_needed(L.h_top() + static_cast<size_t>(top));
  m_be.gemm(false, false, rows, top, 1, T(1), m_ones.data(), 1, params + L.h_top(), top, T(0), m_top.data(), top);
  const T* cur = m_top.data();
  for (size_t s = L.stages().size(); s-- > 0;) {
    const HvaeStage& st = L.stages()[s];
    const int W = st.shape.c, pos = st.shape.h * st.shape.w;
    const size_t n = static_cast<size_t>(rows) * st.shape.size();
    for (int gi : st.groups) {
      const HvaeGroup& g = L.groups()[gi];
      GroupActs& a = m_group_acts[gi];
      a.in = cur;
      const size_t q_stride = 2 * g.numel(), p_stride = static_cast<size_t>(2 * g.zc + W) * pos;
      if (posterior) {
        // q(z_l | z_>l, x) sees the stream and the encoder's e_s side by side.
        m_be.channel_copy(rows, pos, W, cur, W, 0, a.qin.data(), 2 * W, 0, false);
        m_be.channel_copy(rows, pos, W, m_stage_out[s], W, 0, a.qin.data(), 2 * W, W, false);
        branch_forward(g.q, params, a.qin.data(), rows, a.q, params_needed);
      }
      branch_forward(g.prior, params, cur, rows, a.prior, params_needed);
      // h1 = h + h_p (the prior branch's last W channels)
      m_be.channel_copy(1, static_cast<int>(n), 1, cur, 1, 0, a.h1.data(), 1, 0, false);
      m_be.channel_copy(rows, pos, W, a.prior.out.data(), 2 * g.zc + W, 2 * g.zc, a.h1.data(), W, 0, true);
      if (posterior) {
        m_be.gaussian_sample(rows, g.zc, pos, a.q.out.data(), q_stride, eps + g.eps_offset, E, a.z.data());
        m_be.gaussian_kl_forward(rows, g.zc, pos, a.q.out.data(), q_stride, a.prior.out.data(), p_stride,
                                 eps + g.eps_offset, E, m_kl_groups.data() + gi, m_ratio_groups.data() + gi,
                                 static_cast<size_t>(G));
      } else {
        m_be.gaussian_sample(rows, g.zc, pos, a.prior.out.data(), p_stride, eps + g.eps_offset, E, a.z.data());
      }
      if (params_needed) params_needed(params_end(g.z_proj));
      conv_forward(g.z_proj, params, a.z.data(), rows, a.zp.data(), a.zp.data());
      // h2 = h1 + z_proj(z); h3 = h2 + resnet(h2)
      m_be.channel_copy(1, static_cast<int>(n), 1, a.h1.data(), 1, 0, a.h2.data(), 1, 0, false);
      m_be.axpby(n, T(1), a.zp.data(), T(1), a.h2.data());
      branch_forward(g.resnet, params, a.h2.data(), rows, a.resnet, params_needed);
      m_be.channel_copy(1, static_cast<int>(n), 1, a.h2.data(), 1, 0, a.h3.data(), 1, 0, false);
      m_be.axpby(n, T(1), a.resnet.out.data(), T(1), a.h3.data());
      cur = a.h3.data();
    }
    for (int i : st.dec_blocks) {
      m_dec_in[i] = cur;
      residual_forward(L.decoder_blocks()[i].branch, params, cur, rows, m_dec_acts[i], m_dec_out[i].data(),
                       params_needed);
      cur = m_dec_out[i].data();
    }
    // To the previous stage's width at this resolution, then to its resolution (or
    // both at once by the learned up_conv).
    if (st.resizes()) {
      resize(rows, pos, W, cur, st.outer.c, m_dec_resized[s].data());
      cur = m_dec_resized[s].data();
    }
    if (st.learned) {
      cur = resample_forward(st.up_conv, params, cur, rows, m_up_in[s], m_unpooled[s].data(), params_needed);
    } else if (st.down > 1) {
      m_be.unpool_forward(rows, st.outer.c, st.shape.h, st.shape.w, st.down, cur, m_unpooled[s].data());
      cur = m_unpooled[s].data();
    }
  }
  m_final = cur;
  if (params_needed) params_needed(params_end(L.out()));
  conv_forward(L.out(), params, cur, rows, m_output.data(), m_output.data());
}

template <class T>
void Hvae<T>::backward(const T* params, T* grads, const T* x, const T* eps, int rows, T rec_weight, T kl_weight,
                       const std::function<void(size_t)>& grads_ready) {
  // A backend op, not a host write: a recorded step (CUDA graph) replays it too.
  m_be.fill(m_kl_weights.data(), kl_weight, m_kl_weights.size());
  backward(params, grads, x, eps, rows, rec_weight, m_kl_weights.data(), grads_ready);
}

template <class T>
void Hvae<T>::backward(const T* params, T* grads, const T* x, const T* eps, int rows, T rec_weight, const T* kl_weights,
                       const std::function<void(size_t)>& grads_ready) {
  const HvaeLayout& L = m_layout;
  const size_t E = L.latent_size();
  T* A = m_scratch_a.data();
  T* gs = m_gstate_a.data();  // d(the stream) at the current point of the top-down path
  T* other = m_gstate_b.data();
  for (size_t s = 0; s < L.stages().size(); ++s)
    m_be.fill(m_de[s].data(), T(0), static_cast<size_t>(rows) * L.stages()[s].shape.size());

  // Likelihood and decoder.out.
  const Layer& out = L.out();
  L.likelihood().backward(m_be, rows, m_output.data(), x, rec_weight, A);
  conv_backward(out, params, grads, m_final, rows, m_output.data(), m_output.data(), A, A, gs, grads_ready);

  // The top-down path backwards: stages from the input's resolution up; in each, the
  // unpooling, the resize, the decoder blocks and the groups, last first.
  for (size_t s = 0; s < L.stages().size(); ++s) {
    const HvaeStage& st = L.stages()[s];
    const int W = st.shape.c, pos = st.shape.h * st.shape.w;
    if (st.learned) {
      // up_conv (no activation): d(pre) = gs; the roles of a transposed convolution swap.
      conv_backward(st.up_conv, params, grads, m_up_in[s], rows, m_unpooled[s].data(), m_unpooled[s].data(), gs, gs,
                    other, grads_ready);
      std::swap(gs, other);
    } else if (st.down > 1) {
      m_be.unpool_backward(rows, st.outer.c, st.shape.h, st.shape.w, st.down, gs, other);
      std::swap(gs, other);
    }
    if (st.resizes()) {
      resize(rows, pos, st.outer.c, gs, W, other);
      std::swap(gs, other);
    }
    for (auto it = st.dec_blocks.rbegin(); it != st.dec_blocks.rend(); ++it) {
      const int i = *it;
      branch_backward(L.decoder_blocks()[i].branch, params, grads, m_dec_in[i], rows, m_dec_acts[i], gs, gs, true,
                      grads_ready);
    }
    for (auto it = st.groups.rbegin(); it != st.groups.rend(); ++it) {
      const int gi = *it;
      const HvaeGroup& g = L.groups()[gi];
      GroupActs& a = m_group_acts[gi];
      const size_t q_stride = 2 * g.numel(), p_stride = static_cast<size_t>(2 * g.zc + W) * pos;
      // gs = d h3 -> d h2 (the skip plus the resnet branch)
      branch_backward(g.resnet, params, grads, a.h2.data(), rows, a.resnet, gs, gs, true, grads_ready);
      // z_proj: d z from d h2
      conv_backward(g.z_proj, params, grads, a.z.data(), rows, a.zp.data(), a.zp.data(), gs, A, m_dz.data(),
                    grads_ready);
      // The sample and the KL into [mu_q | r_q] and [mu_p | r_p]; d h_p = d h1 = d h2.
      m_be.gaussian_kl_backward(rows, g.zc, pos, a.q.out.data(), q_stride, a.prior.out.data(), p_stride,
                                eps + g.eps_offset, E, m_dz.data(), kl_weights + gi, m_dq.data(), m_dp.data());
      m_be.channel_copy(rows, pos, W, gs, W, 0, m_dp.data(), 2 * g.zc + W, 2 * g.zc, false);
      // d h = d h1 (the skip) + the prior branch + the stream's half of the q branch's input.
      branch_backward(g.prior, params, grads, a.in, rows, a.prior, m_dp.data(), gs, true, grads_ready);
      branch_backward(g.q, params, grads, a.qin.data(), rows, a.q, m_dq.data(), m_dqin.data(), false, grads_ready);
      m_be.channel_copy(rows, pos, W, m_dqin.data(), 2 * W, 0, gs, W, 0, true);
      m_be.channel_copy(rows, pos, W, m_dqin.data(), 2 * W, W, m_de[s].data(), W, 0, true);
    }
  }
  // decoder.h_top += the column sums of d(top stream): ones(rows)^T x gs.
  const int top = static_cast<int>(L.top_shape().size());
  m_be.gemm(true, false, 1, top, rows, T(1), m_ones.data(), 1, gs, top, T(1), grads + L.h_top(), top);
  if (grads_ready) grads_ready(L.h_top());

  // The encoder backwards: d e_s flows down through the blocks, the pooling and the
  // resize (in that order: both act per channel, so they commute).
  for (size_t s = L.stages().size(); s-- > 0;) {
    const HvaeStage& st = L.stages()[s];
    T* de = m_de[s].data();
    for (auto it = st.blocks.rbegin(); it != st.blocks.rend(); ++it) {
      const int i = *it;
      branch_backward(L.encoder_blocks()[i].branch, params, grads, m_block_in[i], rows, m_enc_acts[i], de, de, true,
                      grads_ready);
    }
    // de = d(the stream entering stage s); into the previous stage's resolution.
    const int W = st.shape.c, h = st.outer.h, w = st.outer.w;
    const T* below = de;
    if (st.learned) {
      // down_conv (no activation): d(pre) = de, then its weights and the stream below.
      conv_backward(st.down_conv, params, grads, m_down_in[s], rows, m_pooled[s].data(), m_pooled[s].data(), de, de,
                    m_pool_grad.data(), grads_ready);
      below = m_pool_grad.data();
    } else if (st.down > 1) {
      m_be.avg_pool_backward(rows, W, h, w, st.down, de, m_pool_grad.data());
      below = m_pool_grad.data();
    }
    if (s > 0) {
      // Into d(e_{s-1}): the channels the resize kept (a truncation's dropped ones had none).
      if (st.resizes())
        m_be.channel_copy(rows, h * w, std::min(W, st.outer.c), below, W, 0, m_de[s - 1].data(), st.outer.c, 0, true);
      else
        m_be.axpby(static_cast<size_t>(rows) * st.outer.size(), T(1), below, T(1), m_de[s - 1].data());
      continue;
    }
    // The stem (no activation): weights and bias only, nothing flows into x.
    conv_backward(L.stem(), params, grads, x, rows, m_stem_pre.data(), m_stem_pre.data(), below, A, nullptr,
                  grads_ready);
  }
}

template class Hvae<float>;
template class Hvae<double>;

}  // namespace elbo
