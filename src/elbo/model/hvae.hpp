// The hierarchical VAE (model.type: hierarchical), VDVAE's structure at small scale:
// a bottom-up deterministic encoder, and a top-down decoder that shares its path with
// the prior, with groups of latents at several resolutions. Parameters are named
// views into ONE flat buffer (PyTorch-like names); forward and backward are written
// out here over the backend's ops.
// Rule for backward: parameter gradients accumulate (+=), activation gradients are
// written (=).
//
//   x (C, H, W)                           stages s = 0..S-1, input resolution first;
//    | encoder.in: conv3x3 C -> W_0         W_s: stage s's stream width (model.width unless
//    v                                      the stage sets width), B_s its bottleneck
//   [stage 0] avg_pool(down_0) -> blocks_0 x ResBlock --> e_0 ------------------------.
//   [stage 1] avg_pool(down_1) -> resize(W_0 -> W_1) -> blocks_1 x ResBlock --> e_1 -. |
//    ...                                                                            | |
//   decoder: h = decoder.h_top (learned, W_{S-1} at the lowest resolution)           | |
//   [stage S-1 .. 0] groups_s x DecGroup(h, e_s) <-----------------------------------'-'
//                    -> dec_blocks_s x ResBlock -> unpool(down_s) -> resize(W_s -> W_{s-1})
//    | decoder.out: conv1x1 W_0 -> C (2C for a learned-variance Gaussian)
//    v
//   p(x | z_1..z_L) through the likelihood ops, as the Vae's
//
//   resize(a -> b): the stream between stages of different widths, without parameters
//     (VDVAE): its first b channels, or b - a zero channels appended. Its backward is
//     the reverse resize. It commutes with pooling and unpooling (all act per channel),
//     so the code resizes at the lower resolution: the decoder before unpooling.
//   A stage with resample: conv replaces avg_pool + resize by a learned Conv2d
//     (kernel = stride = down; 1x1 where only the width changes) and resize + unpool
//     by its ConvTranspose2d (encoder.stages.{s}.down, decoder.stages.{s}.up).
//   ResBlock(h)  = h + c3(act(c2(act(c1(act(h))))))   c1, c3: 1x1, c2: 3x3, bottleneck B_s
//   DecGroup(h, e), group l with zc channels per position, at stage s's width W = W_s:
//     [mu_q | r_q]        = q(concat(h, e))            (a ResBlock-shaped branch, no skip)
//     [mu_p | r_p | h_p]  = prior(h)                   (likewise; h_p: W channels)
//     sigma = softplus(r)                              (softplus-bounded scales)
//     z_l   = mu_q + sigma_q * eps_l  (posterior; from the prior: mu_p + sigma_p * eps_l)
//     KL_l  = sum over (zc, h, w) of log(sigma_p/sigma_q) + (sigma_q^2 + (mu_q - mu_p)^2) / (2 sigma_p^2) - 1/2
//     h'    = ResBlock(h + h_p + z_proj(z_l))          z_proj: 1x1 zc -> W
//   The decoder's own ResBlocks (dec_blocks) add capacity without latents, e.g. at
//   full resolution where a stage without groups would otherwise only unpool.
//   rec = -log p(x | z), kl = sum_l KL_l; -ELBO = rec + kl.
//   log q(z|x) - log p(z) = sum_l [log N(z_l; mu_q, sigma_q) - log N(z_l; mu_p, sigma_p)] (one sample),
//   for the importance-weighted bound.
//
// Parameters in the flat buffer (and the pass's order): encoder.in, the encoder's
// blocks stage by stage, decoder.h_top, then per stage from the top its groups and its
// decoder blocks (decoder.stages.{s}.blocks.{i}), decoder.out.
//
// Initialization: PyTorch's Conv2d defaults, then VDVAE's residual scaling: the last
// conv of each residual branch (and z_proj) has its weights scaled by 1/sqrt(N), N
// the number of residual blocks in its half of the network (encoder blocks, or decoder
// groups plus decoder blocks). The stream then grows like 1 + N * v/N instead of
// 1 + N * v with depth, so the initial output and its gradient stay O(1) however deep
// the model. The prior's last conv starts at zero with sigma_p's bias at
// softplus^-1(1) = log(e - 1), so every prior starts as N(0, I) and adds nothing to the
// stream; decoder.h_top starts at zero.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "elbo/backend/backend.hpp"
#include "elbo/config/spec.hpp"
#include "elbo/model/model.hpp"
#include "elbo/model/vae.hpp"  // Layer

namespace elbo {

// act(x) -> c1 (1x1) -> act -> c2 (3x3) -> act -> c3 (1x1): a residual block's branch,
// or (without the skip) the posterior and prior heads.
struct HvaeBranch {
  Layer c1, c2, c3;
  int in_channels() const { return c1.in.c; }
  int out_channels() const { return c3.out.c; }
};

// A residual block (with the skip) of the encoder or, without a latent, the decoder.
struct HvaeBlock {
  int stage = 0;
  HvaeBranch branch;  // W_s -> W_s at the stage's resolution
};

// One latent group of the top-down path, in sampling order.
struct HvaeGroup {
  int stage = 0;
  TensorShape shape;      // (W_s, h, w): the stream's shape at this resolution
  int zc = 0;             // latent channels per position
  size_t eps_offset = 0;  // where its eps start in a row of eps
  size_t numel() const { return static_cast<size_t>(zc) * shape.h * shape.w; }
  HvaeBranch q;       // concat(h, e) (2 W_s) -> [mu_q | r_q] (2 zc)
  HvaeBranch prior;   // h (W_s) -> [mu_p | r_p | h_p] (2 zc + W_s)
  Layer z_proj;       // z (zc) -> W_s, 1x1
  HvaeBranch resnet;  // W_s -> W_s, with the skip
};

struct HvaeStage {
  int down = 1;
  TensorShape shape;  // (W_s, h, w) after pooling: the stream at this stage
  // The stream at the previous stage's resolution (the input's for stage 0) and width
  // (W_{s-1}; W_0 for stage 0): what the encoder pools, what the decoder's unpooling
  // and resize give back.
  TensorShape outer;
  int bottleneck = 0;           // B_s
  std::vector<int> blocks;      // indices into encoder_blocks()
  std::vector<int> groups;      // indices into groups(), in sampling order
  std::vector<int> dec_blocks;  // indices into decoder_blocks()
  // resample: conv. `down_conv`: Conv2d (kernel = stride = down) from `outer` to
  // `shape`, in place of the avg-pool and the resize; `up_conv`: ConvTranspose2d back,
  // in place of the resize and the unpooling. Absent for pool, and where the stage
  // changes neither resolution nor width.
  bool learned = false;
  Layer down_conv, up_conv;
  // The parameter-free resize between widths (hvae.hpp's top), where no conv does it.
  bool resizes() const { return outer.c != shape.c && !learned; }
};

class HvaeLayout final : public ModelLayout {
 public:
  // `input_shape` is [C, H, W] from the data. Errors name the stage (model.stages[i]).
  HvaeLayout(const ModelSpec& spec, const std::vector<int>& input_shape);

  const ModelSpec& spec() const override { return m_spec; }
  const TensorShape& input_shape() const override { return m_input; }
  // Width of the decoder output: D, or 2D ([mean | logvar]) for a learned variance.
  int output_width() const override { return static_cast<int>(m_out.out.size()); }
  int num_groups() const { return static_cast<int>(m_groups.size()); }
  // Latent values per sample: the length of a row of eps.
  size_t latent_size() const { return m_latent_size; }
  size_t eps_per_row() const override { return m_latent_size; }
  int kl_parts() const override { return num_groups(); }  // one KL weight per group
  size_t num_params() const override { return m_num_params; }
  size_t num_values() const override { return m_num_values; }
  const std::vector<ParamView>& views() const override { return m_views; }

  const Layer& stem() const { return m_stem; }
  const std::vector<HvaeStage>& stages() const { return m_stages; }
  const std::vector<HvaeBlock>& encoder_blocks() const { return m_enc; }
  const std::vector<HvaeGroup>& groups() const { return m_groups; }       // top (lowest resolution) first
  const std::vector<HvaeBlock>& decoder_blocks() const { return m_dec; }  // top first, as the groups
  size_t h_top() const { return m_h_top; }                                // offset of decoder.h_top
  const TensorShape& top_shape() const { return m_stages.back().shape; }
  const Layer& out() const { return m_out; }
  // The largest per-sample tensor any layer reads or writes (channels x positions).
  size_t max_width() const { return m_max_width; }
  // The largest per-sample stream tensor, and its gradient, between the layers: a
  // stage's stream, its outer shape, and the mixed shapes around pooling and resizing
  // (W_{s-1} channels at stage s's resolution, W_s channels at the outer one).
  size_t max_stream() const { return m_max_stream; }

  // PyTorch's Conv2d defaults (U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and
  // biases) with the residual scaling and the prior's start described at the top of
  // this file; drawn from Philox keyed by (seed, the value's index): identical on
  // every rank.
  std::vector<double> init_params(uint64_t seed) const override;

 private:
  Layer conv(TensorShape in, int out_channels, int kernel, Activation act, const std::string& name);
  // resample: conv's layers: kernel = stride = `down`, no padding, no activation.
  Layer resample(LayerKind kind, TensorShape in, TensorShape out, int down, const std::string& name);
  HvaeBranch branch(TensorShape in, int bottleneck, int out_channels, const std::string& name);
  size_t place(size_t n);

  ModelSpec m_spec;
  TensorShape m_input;
  size_t m_num_params = 0, m_num_values = 0, m_latent_size = 0, m_max_width = 0, m_max_stream = 0;
  size_t m_h_top = 0;
  Layer m_stem, m_out;
  std::vector<HvaeStage> m_stages;
  std::vector<HvaeBlock> m_enc;
  std::vector<HvaeGroup> m_groups;
  std::vector<HvaeBlock> m_dec;
  std::vector<ParamView> m_views;
};

// A forward/backward workspace for up to `max_rows` samples, allocated once.
template <class T>
class Hvae final : public Model<T> {
 public:
  Hvae(const HvaeLayout& layout, Backend<T>& backend, int max_rows);

  const HvaeLayout& layout() const { return m_layout; }
  const ModelLayout& model_layout() const override { return m_layout; }
  int max_rows() const override { return m_max_rows; }

  // x (rows, D), eps (rows, latent_size()) -> rec[r] = -log p(x_r | z), kl[r] = sum of
  // kl_groups()[r, l], log_ratio[r] = log q(z|x_r) - log p(z) at the sampled z.
  // `params_needed(end)` as in Vae::forward: layers run in flat-buffer order.
  void forward(const T* params, const T* x, const T* eps, int rows,
               const std::function<void(size_t)>& params_needed = {}) override;
  // grads += d/dparams [ rec_weight * sum_r rec[r] + sum_l kl_weights[l] * sum_r KL_l[r] ]
  // for the last forward pass (same params, x, eps, rows); kl_weights (num_groups(),
  // backend memory): free bits' per-group weights. `grads_ready(offset)` after each
  // layer: grads[offset, P) are final (offsets decrease), for the bucketed all-reduce.
  void backward(const T* params, T* grads, const T* x, const T* eps, int rows, T rec_weight, const T* kl_weights,
                const std::function<void(size_t)>& grads_ready = {}) override;
  // The same with one KL weight for every group.
  void backward(const T* params, T* grads, const T* x, const T* eps, int rows, T rec_weight, T kl_weight,
                const std::function<void(size_t)>& grads_ready = {}) override;
  // Top-down from the prior: z_l = mu_p + sigma_p * eps_l; output() then holds the
  // decoder output (likelihood_mean gives E[x|z]).
  void sample(const T* params, const T* eps, int rows);
  void sample_prior(const T* params, const T* eps, int rows) override { sample(params, eps, rows); }

  // Results of the last pass, in backend memory.
  const T* rec() const override { return m_rec.data(); }
  const T* kl() const override { return m_kl.data(); }
  const T* kl_groups() const { return m_kl_groups.data(); }  // (rows, num_groups())
  const T* log_ratio() const { return m_log_ratio.data(); }
  // Group l's posterior head from the last forward pass, (rows, 2 * numel): mu_q (zc
  // channels), then r_q; evaluation counts active units from mu_q.
  const T* posterior(int l) const { return m_group_acts[static_cast<size_t>(l)].q.out.data(); }
  const T* output() const override { return m_output.data(); }  // (rows, output_width())

 private:
  // The activations a branch keeps for its backward pass.
  struct BranchActs {
    Buffer<T> a0, p1, a1, p2, a2, out;
  };
  struct GroupActs {
    Buffer<T> qin;  // concat(h, e): (2 W_s)
    BranchActs q, prior, resnet;
    Buffer<T> h1, z, zp, h2, h3;
    const T* in = nullptr;  // the stream entering the group
  };
  BranchActs make_branch(const HvaeBranch& b);
  void conv_forward(const Layer& l, const T* params, const T* in, int rows, T* pre, T* out);
  // The backward of conv_forward: g = d(out) -> dpre (may alias g) -> the layer's bias
  // and filter gradients, and d(in) into din (overwritten) unless din is null (the stem:
  // nothing flows into x). pre/out are conv_forward's.
  void conv_backward(const Layer& l, const T* params, T* grads, const T* in, int rows, const T* pre, const T* out,
                     const T* g, T* dpre, T* din, const std::function<void(size_t)>& grads_ready);
  // A stage's learned down_conv or up_conv (no activation) into `out`; `saved_in` keeps
  // its input for the backward pass. Returns out.
  const T* resample_forward(const Layer& l, const T* params, const T* in, int rows, const T*& saved_in, T* out,
                            const std::function<void(size_t)>& params_needed);
  void branch_forward(const HvaeBranch& b, const T* params, const T* in, int rows, BranchActs& a,
                      const std::function<void(size_t)>& params_needed);
  // out = in + branch(in): a residual block of the encoder or the decoder.
  void residual_forward(const HvaeBranch& b, const T* params, const T* in, int rows, BranchActs& a, T* out,
                        const std::function<void(size_t)>& params_needed);
  // dst (rows, dst_c, hw) = the first dst_c channels of src (rows, src_c, hw), zeros
  // after its src_c channels: the stream between stages of different widths, and
  // (dst_c and src_c swapped) its backward.
  void resize(int rows, int hw, int src_c, const T* src, int dst_c, T* dst);
  // d(in) (+= when accumulate, else =) and the branch's parameter gradients from g =
  // d(out), which is only read; uses the scratch buffers.
  void branch_backward(const HvaeBranch& b, const T* params, T* grads, const T* in, int rows, BranchActs& a, const T* g,
                       T* din, bool accumulate, const std::function<void(size_t)>& grads_ready);
  void decoder_forward(const T* params, const T* eps, int rows, bool posterior,
                       const std::function<void(size_t)>& params_needed);
  size_t hw(const TensorShape& s) const { return static_cast<size_t>(s.h) * s.w; }

  const HvaeLayout& m_layout;
  Backend<T>& m_be;
  int m_max_rows;
  Buffer<T> m_stem_pre;                   // (W_0, H, W)
  std::vector<Buffer<T>> m_pooled;        // per stage: avg-pool (W_{s-1}, h, w) or down_conv (W_s, h, w) output
  std::vector<Buffer<T>> m_resized;       // per stage: (W_s, h, w) (empty where no resize)
  std::vector<BranchActs> m_enc_acts;     // per encoder block
  std::vector<Buffer<T>> m_enc_out;       // per encoder block: its output stream
  std::vector<const T*> m_block_in;       // per encoder block: the stream entering it
  std::vector<const T*> m_stage_in;       // per stage: the stream entering its blocks
  std::vector<const T*> m_stage_out;      // per stage: e_s
  std::vector<const T*> m_down_in;        // per stage: the stream entering its down_conv (resample: conv)
  std::vector<const T*> m_up_in;          // per stage: the stream entering its up_conv (resample: conv)
  Buffer<T> m_top;                        // decoder.h_top repeated over the rows
  std::vector<GroupActs> m_group_acts;    // per group
  std::vector<BranchActs> m_dec_acts;     // per decoder block
  std::vector<Buffer<T>> m_dec_out;       // per decoder block: its output stream
  std::vector<const T*> m_dec_in;         // per decoder block: the stream entering it
  std::vector<Buffer<T>> m_dec_resized;   // per stage: (W_{s-1}, h, w) (empty where no resize)
  std::vector<Buffer<T>> m_unpooled;      // per stage: the stream after unpooling or up_conv (empty where neither)
  const T* m_final = nullptr;             // the stream entering decoder.out
  Buffer<T> m_output;                     // (rows, output_width())
  Buffer<T> m_rec, m_kl, m_log_ratio;     // (rows)
  Buffer<T> m_kl_groups, m_ratio_groups;  // (rows, groups)
  Buffer<T> m_ones;                       // max(rows, groups) ones: broadcasts and row sums as GEMMs
  Buffer<T> m_kl_weights;                 // (groups): the scalar backward's weight, repeated
  Buffer<T> m_scratch_a, m_scratch_b;     // (rows, max_width): branch gradients, ping-pong
  Buffer<T> m_gstate_a, m_gstate_b;       // (rows, max_stream): d(stream), ping-pong across unpooling and resizing
  Buffer<T> m_dq, m_dp, m_dz, m_dqin;     // (rows, largest group's sizes)
  std::vector<Buffer<T>> m_de;            // per stage: d(e_s), then d(stream) through the encoder
  Buffer<T> m_pool_grad;                  // (rows, max_stream): d(the pooling's input), W_s channels
};

}  // namespace elbo
