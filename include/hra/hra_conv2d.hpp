// A frozen 2-D convolution adapted by Householder reflections: y = conv(x, W H) + b.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <iterator>
#include <limits>
#include <optional>
#include <utility>
#include <vector>

#include "conv_layer.hpp"
#include "detail/low_rank_reflector.hpp"
#include "detail/thin_kernels.hpp"
#include "hra_adapter_layer.hpp"

namespace hra {

/// \brief y = conv(x, W H_a H_b ...) + b: a frozen convolution whose C_out x D weight (PyTorch's
/// `weight.view(C_out, -1)`, D = C_in/groups kh kw) is multiplied on the right by a stack of HRA
/// adapters, as PEFT's HRA does for `nn.Conv2d` (its `hra_u`, D x r, is this layer's U). With
/// groups > 1 the same H acts on every group's fan-in. Unlike PEFT, every geometry parameter is
/// honoured (Conv2dGeometry: non-square kernels, per-axis or asymmetric padding, stride,
/// dilation, groups).
///
/// Layout, weight and bias are Conv2d's; the adapters (symmetric or random init, both variants,
/// regulariser, bias modes none/all/hra_only, stacking in PEFT's order, merge, LIFO unmerge,
/// safe merge) are HraAdapterLayer's, exactly as for HraLinear.
///
/// With P the D x L patches of one image and group (L = H_out W_out) the layer computes
/// Y_g = W_g H P_g (+ b). H is never formed; it is applied in one of three forms (all agree to
/// rounding; the tests check it). Per adapter of rank r, with N = n L patch positions per
/// channel, C = C_out, G groups, the extra flops of one training step (forward + backward with
/// dX) over the frozen convolution, the model estimated_flops() implements, are:
///
///   low_rank H on every patch (SPEC 10): Y = W P - (W V) K, dP = W^T dY - V Z, dU from the sums
///           dY K^T, P Z^T, Z K^T accumulated over images and finished once.
///           r N (6 G D + 6 C + 2 G r) + 6 C D r.   Keeps K (r x G N) between the passes.
///   hybrid  W' = W H once per step (ReflectorChain::apply_right), products with W'; dU from the
///           same r-sized sums (K and Z recomputed per image in backward).
///           r N (4 G D + 4 C + 2 G r) + 8 C D r.   Keeps W' (C x D).
///   weight  W' = W H once per step, products with W'; dU from dW' = sum dY P^T (C x D, the
///           cost of a weight gradient), pulled back through the chain once (O(C D r)).
///           2 N D C + 12 C D r.                     Keeps W' (C x D).
///
/// (V = U and K = S^{-1} U^T P for the chain, V = Q and K = 2 Q^T P for Gram-Schmidt; with
/// stacked adapters each sees the patches of the ones after it, W H_a ... of the ones before.)
/// HraForm::automatic (the default) takes the cheapest for the batch at hand: the weight
/// form wins when r (D + C) >~ D C / 2 (few channels: a network's first layers), the hybrid
/// nearly everywhere else, the low-rank form only for a handful of patches (n L below about
/// D C / (D + C)), where W' costs more than the patches. set_form() forces one (tests,
/// benchmarks). predict() compares the forward costs alone: r N (2 G D + 2 C) + 2 C D r for the
/// low-rank form against 4 C D r for W'.
///
/// Kept between forward and backward: the input X (backward rebuilds each image's patches from
/// it; a batch's patches would be D/C_in kh kw times larger), Y, the factors of every U (O(r D)),
/// and K (low-rank form) or W' (the others). Never anything D x D or n L x D.
template <typename Scalar_>
class HraConv2d final : public detail::ConvLayer<HraAdapterLayer<Scalar_>> {
  using Base = detail::ConvLayer<HraAdapterLayer<Scalar_>>;
  using typename Base::Op;

 public:
  using typename Base::Adapter;
  using typename Base::Chain;
  HRA_LAYER_TYPES(Base);

  /// Wraps the convolution `geometry` with weight W (C_out x D) and optional bias b (C_out), with
  /// one adapter "default" made from `options`. Throws std::invalid_argument for a bad geometry
  /// (Conv2dGeometry::validate), a W that is not C_out x D or not finite, a bad bias, r > D, or
  /// other bad adapter options (as HraLinear).
  HraConv2d(const Conv2dGeometry& geometry, WeightMatrix<Scalar> weight, std::optional<Vector> bias,
            const HraOptions& options, BiasMode bias_mode = BiasMode::none)
      : Base("HraConv2d", geometry, checked(geometry, std::move(weight), options), std::move(bias),
             options, bias_mode) {}

  /// Convenience: own a copy of W, no bias.
  HraConv2d(const Conv2dGeometry& geometry, Matrix weight, const HraOptions& options)
      : HraConv2d(geometry, WeightMatrix<Scalar>::owned(std::move(weight)), std::nullopt, options) {
  }

  /// The form a forward() with n images uses (never automatic); set_form() chooses it
  /// (HraForm::chain is refused: on a convolution, H on the patches is the low-rank form).
  HraForm form_for_batch(Index n) const;

  /// The cost model of the class comment: extra flops of one training step with n images in
  /// `form` (automatic: the form form_for_batch() picks) over the frozen convolution, summed over
  /// the unmerged adapters (0 when there are none).
  double estimated_flops(HraForm form, Index n) const {
    return estimated_flops(form, n, Pass::training);
  }
  /// What the model counts: a training step (forward + backward), or predict()'s forward alone
  /// (r N (2 G D + 2 C) + 2 C D r for the low-rank form against 4 C D r for W' H in the others).
  enum class Pass { training, inference };
  double estimated_flops(HraForm form, Index n, Pass pass) const;

  /// Y = conv(X, W H) + b for X (C_in H W x n).
  const Matrix& forward(const ConstRef& x) override;

  /// Assigns dU of every unmerged adapter and db (when trainable); returns dX (empty when
  /// compute_input_gradient is false, which skips the transposed convolution).
  const Matrix& backward(const ConstRef& dy, bool compute_input_gradient = true) override;

  void predict(const ConstRef& x, Matrix& y) const override;

  std::size_t saved_bytes() const override;

 private:
  static constexpr HraForm forms[] = {HraForm::low_rank, HraForm::weight, HraForm::hybrid};
  std::pair<const HraForm*, const HraForm*> available_forms() const override {
    return {std::begin(forms), std::end(forms)};
  }
  using LowRank = detail::LowRankReflector<Scalar>;

  using Thin = detail::ThinKernels<Scalar>;

  // Per-worker buffers and partial sums of the per-image loops (kp: T V with the columns of V
  // padded to whole register blocks of the thin kernel, Thin::padded(r)).
  struct Workspace {
    Matrix patches, patch_grad, kt, kp, zt, e;
    std::vector<Matrix> ek, xz, zk;  // per adapter: sum dY K^T (C x r), P Z^T (D x r), Z K^T
  };

  // predict() into y, which does not alias x.
  void predict_into(const ConstRef& x, Matrix& y) const;

  static WeightMatrix<Scalar> checked(const Conv2dGeometry& g, WeightMatrix<Scalar> w,
                                      const HraOptions& o) {
    g.validate("HraConv2d");  // before fan_in() is used; the base checks W
    if (o.rank > g.fan_in())
      detail::throw_invalid("HraConv2d: rank r=", o.rank,
                            " exceeds D = C_in/groups*kh*kw = ", g.group_in_channels(), "*",
                            g.kernel_h(), "*", g.kernel_w(), " = ", g.fan_in(),
                            " (the reflections act on the weight's D columns)");
    return w;
  }

  // W' = W H_a H_b ... (stacking order), O(C D r) per adapter.
  void adapted_weight(const std::vector<typename Chain::Factors>& factors, Matrix& weff) const;

  // The patches of image b in ws.patches (a copy even for a pointwise geometry: the stacked
  // forms update them in place).
  void own_patches(const Scalar* image, Workspace& ws) const {
    const Conv2dGeometry& g = geometry_;
    const auto t = detail::image_patches(g, image, ws.patches);
    if (t.data() != ws.patches.data()) ws.patches = t;
  }

  // K^T (G L x r, rows g L + l) of one adapter from the patches T (L x G D): K_g^T = T_g V C^T,
  // T_g V streamed over the patches by the thin kernel (Eigen's GEMM would pack T_g first).
  void coefficients(const detail::ConvBlockRef<Scalar>& t, const LowRank& lr, Matrix& kt,
                    Matrix& kp) const;

  // T_g <- T_g - K_g^T V^T: the patches as the previous adapter of the stack sees them (H P).
  template <typename Kt>
  void reflect_patches(Matrix& t, const LowRank& lr, const Kt& kt) const;

  // Y = W P - sum_j (W V_j) K_j (+ b) image by image; with `keep`, K_j^T of every image is kept
  // in the adapters' caches for backward.
  void patch_forward(const ConstRef& x, const std::vector<LowRank>& lr, Matrix& y,
                     std::vector<Workspace>& workspaces, bool keep);

  void patch_forward_into(const ConstRef& x, const std::vector<LowRank>& lr, Matrix& y,
                          std::vector<Workspace>& workspaces,
                          const std::vector<Matrix*>* kept) const;

  // dX = conv^T(dY, W) alone (no adapter left unmerged).
  void input_gradient_only(const ConstRef& dy, const detail::ConvWeightRef<Scalar>& w);

  // A_j = W H_{a_0} ... H_{a_{j-1}} V_j (C x r): what adapter j's V looks like through W and the
  // adapters before it.
  std::vector<Matrix> projected_reflectors(
      const std::vector<std::size_t>& applied, const std::vector<LowRank>& lr,
      const std::vector<const typename Chain::Factors*>& f) const;

  // dU_j from its three sums; ek is sum dY K_j^T (C x r): G K^T = W_j^T ek with
  // W_j^T = H_{a_{j-1}}^T ... H_{a_0}^T W^T.
  void finish_gradient(const std::vector<std::size_t>& applied, const std::vector<LowRank>& lr,
                       const std::vector<const typename Chain::Factors*>& f, std::size_t j,
                       const Matrix& ek, const Matrix& xz, const Matrix& zk);

  // Backward of the low-rank and hybrid forms: per image the patches (rebuilt from X), K_j and Z_j
  // of every adapter and their sums; dX with W (low-rank form, minus sum V_j Z_j) or W'.
  void sums_backward(const ConstRef& dy, const std::vector<std::size_t>& applied,
                     const std::vector<LowRank>& lr,
                     const std::vector<const typename Chain::Factors*>& f, bool want_dx);

  void sum_parts(int workers, std::size_t j, Matrix& ek, Matrix& xz, Matrix& zk) const;

  // Backward of the weight form: E = sum dY P^T (C x D) over the images, dX with W'; then per
  // adapter (last first) with F_j = E H_{a_{k-1}}^T ... H_{a_{j+1}}^T = dL/d(W_j H_j):
  //   ek = F_j V_j C_j^T,  xz = F_j^T A_j C_j,  zk = (A_j C_j)^T ek
  // (the sums of the other forms, written through F_j), and dU_j from them.
  void weight_form_backward(const ConstRef& dy, const std::vector<std::size_t>& applied,
                            const std::vector<LowRank>& lr,
                            const std::vector<const typename Chain::Factors*>& f, bool want_dx);

  using Base::form_, Base::last_form_;
  using Base::geometry_, Base::chunks_;
  Matrix x_, y_, dx_, weff_, dy_copy_;
  std::vector<Workspace> workspaces_;
};

template <typename Scalar_>
auto HraConv2d<Scalar_>::form_for_batch(Index n) const -> HraForm {
  if (form_ != HraForm::automatic) return form_;
  HraForm best = HraForm::hybrid;
  for (HraForm f : {HraForm::low_rank, HraForm::weight})
    if (estimated_flops(f, n) < estimated_flops(best, n)) best = f;
  return best;
}

template <typename Scalar_>
double HraConv2d<Scalar_>::estimated_flops(HraForm form, Index n, Pass pass) const {
  if (form == HraForm::automatic) form = form_for_batch(n);
  const Conv2dGeometry& g = geometry_;
  const double nl = double(n) * double(g.out_positions()), gd = double(g.groups() * g.fan_in());
  const double c = double(g.out_channels()), d = double(g.fan_in()), grp = double(g.groups());
  double total = 0, ranks = 0;
  for (std::size_t i : this->applied()) {
    const double r = double(this->adapters()[i].rank());
    ranks += r;
    if (pass == Pass::inference)
      total +=
          form == HraForm::low_rank ? r * nl * (2 * gd + 2 * c) + 2 * c * d * r : 4 * c * d * r;
    else if (form == HraForm::low_rank)
      total += r * nl * (6 * gd + 6 * c + 2 * grp * r) + 6 * c * d * r;
    else if (form == HraForm::hybrid)
      total += r * nl * (4 * gd + 4 * c + 2 * grp * r) + 8 * c * d * r;
    else
      total += 12 * c * d * r;
  }
  if (pass == Pass::training && form == HraForm::weight && ranks > 0) total += 2 * nl * d * c;
  return total;
}

template <typename Scalar_>
auto HraConv2d<Scalar_>::forward(const ConstRef& x) -> const Matrix& {
  this->check_conv_input(x, "forward");
  this->forget_forward();
  // Every U is validated before anything is written.
  std::vector<typename Chain::Factors> factors = this->factorize_applied();
  const std::vector<std::size_t> applied = this->applied();
  const Index n = x.cols();
  last_form_ = form_for_batch(n);
  std::vector<detail::LowRankReflector<Scalar>> lr;
  for (std::size_t i : applied) lr.emplace_back(this->adapters()[i].chain(), factors[i]);
  // From here on only the copy x_ is read: x may be (part of) y_, the layer's last output.
  x_ = x;
  y_.resize(geometry_.output_size(), n);
  if (applied.empty()) {
    weff_.resize(0, 0);
    this->frozen_forward(x_, y_, workspaces_);
  } else if (last_form_ == HraForm::low_rank) {
    weff_.resize(0, 0);
    patch_forward(x_, lr, y_, workspaces_, /*keep=*/true);
  } else {
    adapted_weight(factors, weff_);
    detail::conv_forward<Scalar>(geometry_, x_, weff_, this->bias(), y_, chunks_, workspaces_);
  }
  auto& adapters = this->adapter_list();
  for (std::size_t i = 0; i < adapters.size(); ++i) {
    auto& cache = this->cache(adapters[i]);
    if (last_form_ != HraForm::low_rank || adapters[i].merged()) cache.coeffs.resize(0, 0);
    if (adapters[i].merged())
      cache.factors = {};
    else
      cache.factors = std::move(factors[i]);
  }
  this->remember_forward(n);
  return y_;
}

template <typename Scalar_>
auto HraConv2d<Scalar_>::backward(const ConstRef& dy, bool compute_input_gradient)
    -> const Matrix& {
  const Index n = this->begin_backward(dy);
  const ConstRef dyv = this->unaliased(dy, dx_, dy_copy_);  // dY may be the last dX
  const Conv2dGeometry& g = geometry_;
  if (this->bias_trainable()) this->bias_backward(detail::channel_sums<Scalar>(g, dyv));
  dx_.resize(compute_input_gradient ? g.input_size() : 0, compute_input_gradient ? n : 0);
  const std::vector<std::size_t> applied = this->applied();
  auto& adapters = this->adapter_list();
  std::vector<detail::LowRankReflector<Scalar>> lr;
  std::vector<const typename Chain::Factors*> factors;
  for (std::size_t i : applied) {
    lr.emplace_back(adapters[i].chain(), this->cache(adapters[i]).factors);
    factors.push_back(&this->cache(adapters[i]).factors);
  }
  if (applied.empty()) {
    if (compute_input_gradient) input_gradient_only(dyv, this->weight());
    return dx_;
  }
  if (last_form_ == HraForm::weight)
    weight_form_backward(dyv, applied, lr, factors, compute_input_gradient);
  else
    sums_backward(dyv, applied, lr, factors, compute_input_gradient);
  return dx_;
}

template <typename Scalar_>
void HraConv2d<Scalar_>::predict(const ConstRef& x, Matrix& y) const {
  this->predict_conv(x, y, [&](Matrix& out) { predict_into(x, out); });
}

template <typename Scalar_>
void HraConv2d<Scalar_>::predict_into(const ConstRef& x, Matrix& y) const {
  const std::vector<typename Chain::Factors> factors = this->factorize_applied();
  const std::vector<std::size_t> applied = this->applied();
  std::vector<Workspace> ws;
  y.resize(geometry_.output_size(), x.cols());
  if (applied.empty()) return this->frozen_forward(x, y, ws);
  HraForm f = form_;
  if (f == HraForm::automatic)
    f = estimated_flops(HraForm::low_rank, x.cols(), Pass::inference) <
                estimated_flops(HraForm::hybrid, x.cols(), Pass::inference)
            ? HraForm::low_rank
            : HraForm::hybrid;
  if (f == HraForm::low_rank) {
    std::vector<detail::LowRankReflector<Scalar>> lr;
    for (std::size_t i : applied) lr.emplace_back(this->adapters()[i].chain(), factors[i]);
    return patch_forward_into(x, lr, y, ws, nullptr);
  }
  Matrix weff;
  adapted_weight(factors, weff);
  detail::conv_forward<Scalar>(geometry_, x, weff, this->bias(), y, chunks_, ws);
}

template <typename Scalar_>
std::size_t HraConv2d<Scalar_>::saved_bytes() const {
  std::size_t bytes = static_cast<std::size_t>(x_.size() + y_.size() + weff_.size());
  bytes *= sizeof(Scalar);
  for (std::size_t i : this->applied()) bytes += this->cache(this->adapters()[i]).bytes();
  return bytes;
}

template <typename Scalar_>
void HraConv2d<Scalar_>::adapted_weight(const std::vector<typename Chain::Factors>& factors,
                                        Matrix& weff) const {
  weff = this->weight();
  for (std::size_t i : this->applied())
    this->adapters()[i].chain().apply_right(factors[i], weff, Apply::h);
}

template <typename Scalar_>
void HraConv2d<Scalar_>::coefficients(const detail::ConvBlockRef<Scalar>& t, const LowRank& lr,
                                      Matrix& kt, Matrix& kp) const {
  const Conv2dGeometry& g = geometry_;
  const Index l = g.out_positions(), d = g.fan_in(), gl = g.groups() * l;
  const typename Thin::RowMajor vt = Thin::row_major(lr.v());
  const Index bp = vt.cols();
  kp.setZero(gl, bp);
  for (Index k = 0; k < g.groups(); ++k)
    for (Index j0 = 0; j0 < d; j0 += Thin::KC)
      Thin::project(t.data() + (k * d + j0) * t.outerStride(), t.outerStride(), l,
                    std::min(Thin::KC, d - j0), vt.data() + j0 * bp, bp, kp.data() + k * l, gl);
  kt = kp.leftCols(lr.rank());
  lr.apply_ct_right(kt);
}

template <typename Scalar_>
template <typename Kt>
void HraConv2d<Scalar_>::reflect_patches(Matrix& t, const LowRank& lr, const Kt& kt) const {
  const Conv2dGeometry& g = geometry_;
  const Index l = g.out_positions(), d = g.fan_in();
  for (Index k = 0; k < g.groups(); ++k)
    detail::serial_product(t.middleCols(k * d, d), kt.middleRows(k * l, l), Op::n, lr.v(), Op::t,
                           Scalar(-1), true);
}

template <typename Scalar_>
void HraConv2d<Scalar_>::patch_forward(const ConstRef& x, const std::vector<LowRank>& lr, Matrix& y,
                                       std::vector<Workspace>& workspaces, bool keep) {
  std::vector<Matrix*> kept;
  if (keep) {
    auto& adapters = this->adapter_list();
    const std::vector<std::size_t> applied = this->applied();
    for (std::size_t j = 0; j < applied.size(); ++j) {
      Matrix& c = this->cache(adapters[applied[j]]).coeffs;
      c.resize(geometry_.groups() * geometry_.out_positions() * lr[j].rank(), x.cols());
      kept.push_back(&c);
    }
  }
  patch_forward_into(x, lr, y, workspaces, keep ? &kept : nullptr);
}

template <typename Scalar_>
void HraConv2d<Scalar_>::patch_forward_into(const ConstRef& x, const std::vector<LowRank>& lr,
                                            Matrix& y, std::vector<Workspace>& workspaces,
                                            const std::vector<Matrix*>* kept) const {
  const Conv2dGeometry& g = geometry_;
  const Index n = x.cols(), l = g.out_positions(), co = g.out_channels();
  const Index cg = g.group_out_channels();
  const auto w = this->weight();
  std::vector<Matrix> wv;
  for (const auto& a : lr) {
    wv.emplace_back();
    detail::serial_product(wv.back(), w, Op::n, a.v(), Op::n);
  }
  const int workers = detail::conv_workers(n, chunks_);
  this->prepare(workspaces, workers);
  const auto& bias = this->bias();
  const std::size_t k = lr.size();
  detail::for_each_image(n, workers, [&](int wk, Index b) {
    Workspace& ws = workspaces[static_cast<std::size_t>(wk)];
    auto yt = detail::image_rows(y.col(b).data(), l, co);
    // One adapter only reads the patches (a view of X for a pointwise geometry); a stack
    // reflects them in place for the adapters before the last.
    if (k > 1) own_patches(x.col(b).data(), ws);
    const auto t =
        k > 1 ? Eigen::Map<const Matrix>(ws.patches.data(), ws.patches.rows(), ws.patches.cols())
              : detail::image_patches(g, x.col(b).data(), ws.patches);
    detail::grouped_product<Scalar>(g, t, w, yt);
    // The last adapter touches the patches first.
    for (std::size_t jj = k; jj-- > 0;) {
      coefficients(t, lr[jj], ws.kt, ws.kp);
      for (Index q = 0; q < g.groups(); ++q)
        detail::serial_product(yt.middleCols(q * cg, cg), ws.kt.middleRows(q * l, l), Op::n,
                               wv[jj].middleRows(q * cg, cg), Op::t, Scalar(-1), true);
      if (kept) Eigen::Map<Matrix>((*kept)[jj]->col(b).data(), ws.kt.rows(), ws.kt.cols()) = ws.kt;
      if (jj > 0) reflect_patches(ws.patches, lr[jj], ws.kt);
    }
    if (bias) yt.rowwise() += bias->transpose();
  });
}

template <typename Scalar_>
void HraConv2d<Scalar_>::input_gradient_only(const ConstRef& dy,
                                             const detail::ConvWeightRef<Scalar>& w) {
  const Conv2dGeometry& g = geometry_;
  const Index n = dy.cols(), l = g.out_positions(), co = g.out_channels();
  const int workers = detail::conv_workers(n, chunks_);
  this->prepare(workspaces_, workers);
  detail::for_each_image(n, workers, [&](int wk, Index b) {
    Workspace& ws = workspaces_[static_cast<std::size_t>(wk)];
    detail::grouped_input_gradient<Scalar>(g, detail::image_rows(dy.col(b).data(), l, co), w,
                                           dx_.col(b).data(), ws.patch_grad);
  });
}

template <typename Scalar_>
auto HraConv2d<Scalar_>::projected_reflectors(
    const std::vector<std::size_t>& applied, const std::vector<LowRank>& lr,
    const std::vector<const typename Chain::Factors*>& f) const -> std::vector<Matrix> {
  std::vector<Matrix> a;
  for (std::size_t j = 0; j < applied.size(); ++j) {
    Matrix m = lr[j].v();
    for (std::size_t i = j; i-- > 0;)
      this->adapters()[applied[i]].chain().apply(*f[i], m, Apply::h);
    a.push_back(this->weight() * m);
  }
  return a;
}

template <typename Scalar_>
void HraConv2d<Scalar_>::finish_gradient(const std::vector<std::size_t>& applied,
                                         const std::vector<LowRank>& lr,
                                         const std::vector<const typename Chain::Factors*>& f,
                                         std::size_t j, const Matrix& ek, const Matrix& xz,
                                         const Matrix& zk) {
  Matrix gk;
  detail::serial_product(gk, this->weight(), Op::t, ek, Op::n);
  for (std::size_t i = 0; i < j; ++i)
    this->adapters()[applied[i]].chain().apply(*f[i], gk, Apply::transpose);
  lr[j].gradient(gk, xz, zk, this->adapter_gradient(this->adapter_list()[applied[j]]));
}

template <typename Scalar_>
void HraConv2d<Scalar_>::sums_backward(const ConstRef& dy, const std::vector<std::size_t>& applied,
                                       const std::vector<LowRank>& lr,
                                       const std::vector<const typename Chain::Factors*>& f,
                                       bool want_dx) {
  const Conv2dGeometry& g = geometry_;
  const Index n = dy.cols(), l = g.out_positions(), co = g.out_channels(), d = g.fan_in();
  const Index cg = g.group_out_channels(), groups = g.groups();
  const bool patch_form = last_form_ == HraForm::low_rank;
  const std::size_t k = applied.size();
  const std::vector<Matrix> a = projected_reflectors(applied, lr, f);
  std::vector<Matrix> ac = a;  // A_j C_j
  for (std::size_t j = 0; j < k; ++j) lr[j].apply_c_right(ac[j]);
  const int workers = detail::conv_workers(n, chunks_);
  this->prepare(workspaces_, workers);
  for (int wk = 0; wk < workers; ++wk) {
    Workspace& ws = workspaces_[static_cast<std::size_t>(wk)];
    ws.ek.resize(k);
    ws.xz.resize(k);
    ws.zk.resize(k);
    for (std::size_t j = 0; j < k; ++j) {
      ws.ek[j].setZero(co, lr[j].rank());
      ws.xz[j].setZero(d, lr[j].rank());
      ws.zk[j].setZero(lr[j].rank(), lr[j].rank());
    }
  }
  const auto w = this->weight();
  std::vector<const Matrix*> kept;
  for (std::size_t i : applied) kept.push_back(&this->cache(this->adapters()[i]).coeffs);
  detail::for_each_image(n, workers, [&](int wk, Index b) {
    Workspace& ws = workspaces_[static_cast<std::size_t>(wk)];
    const auto dyt = detail::image_rows(dy.col(b).data(), l, co);
    if (k > 1) own_patches(x_.col(b).data(), ws);
    const auto t =
        k > 1 ? Eigen::Map<const Matrix>(ws.patches.data(), ws.patches.rows(), ws.patches.cols())
              : detail::image_patches(g, x_.col(b).data(), ws.patches);
    if (want_dx) {
      ws.patch_grad.resize(l, g.in_channels() * g.taps());
      if (patch_form)
        detail::grouped_patch_gradient<Scalar>(g, dyt, w, ws.patch_grad);
      else
        detail::grouped_patch_gradient<Scalar>(g, dyt, weff_, ws.patch_grad);
    }
    for (std::size_t jj = k; jj-- > 0;) {
      const Index r = lr[jj].rank(), gl = groups * l;
      if (!patch_form) coefficients(t, lr[jj], ws.kt, ws.kp);
      const Eigen::Map<const Matrix> kt(patch_form ? kept[jj]->col(b).data() : ws.kt.data(), gl, r);
      ws.zt.resize(gl, r);
      const auto zt = ws.zt.leftCols(r);
      for (Index q = 0; q < groups; ++q) {
        const auto dyq = dyt.middleCols(q * cg, cg);
        const auto kq = kt.middleRows(q * l, l);
        detail::serial_product(ws.zt.middleRows(q * l, l).leftCols(r), dyq, Op::n,
                               ac[jj].middleRows(q * cg, cg), Op::n);
        detail::serial_product(ws.ek[jj].middleRows(q * cg, cg), dyq, Op::t, kq, Op::n, Scalar(1),
                               true);
      }
      for (Index q = 0; q < groups; ++q)
        detail::serial_product(ws.xz[jj], t.middleCols(q * d, d), Op::t, zt.middleRows(q * l, l),
                               Op::n, Scalar(1), true);
      detail::serial_product(ws.zk[jj], zt, Op::t, kt, Op::n, Scalar(1), true);
      if (want_dx && patch_form)
        for (Index q = 0; q < groups; ++q)
          detail::serial_product(ws.patch_grad.middleCols(q * d, d), zt.middleRows(q * l, l), Op::n,
                                 lr[jj].v(), Op::t, Scalar(-1), true);
      if (jj > 0) reflect_patches(ws.patches, lr[jj], kt);
    }
    if (want_dx) detail::col2im(g, ws.patch_grad.data(), dx_.col(b).data());
  });
  for (std::size_t j = 0; j < k; ++j) {
    Matrix ek, xz, zk;
    sum_parts(workers, j, ek, xz, zk);
    finish_gradient(applied, lr, f, j, ek, xz, zk);
  }
}

template <typename Scalar_>
void HraConv2d<Scalar_>::sum_parts(int workers, std::size_t j, Matrix& ek, Matrix& xz,
                                   Matrix& zk) const {
  detail::sum_over_workers(
      workspaces_, workers, [j](const Workspace& w) -> const Matrix& { return w.ek[j]; }, ek);
  detail::sum_over_workers(
      workspaces_, workers, [j](const Workspace& w) -> const Matrix& { return w.xz[j]; }, xz);
  detail::sum_over_workers(
      workspaces_, workers, [j](const Workspace& w) -> const Matrix& { return w.zk[j]; }, zk);
}

template <typename Scalar_>
void HraConv2d<Scalar_>::weight_form_backward(const ConstRef& dy,
                                              const std::vector<std::size_t>& applied,
                                              const std::vector<LowRank>& lr,
                                              const std::vector<const typename Chain::Factors*>& f,
                                              bool want_dx) {
  const Conv2dGeometry& g = geometry_;
  const Index n = dy.cols(), l = g.out_positions(), co = g.out_channels(), d = g.fan_in();
  const int workers = detail::conv_workers(n, chunks_);
  this->prepare(workspaces_, workers);
  for (int wk = 0; wk < workers; ++wk) workspaces_[static_cast<std::size_t>(wk)].e.setZero(co, d);
  detail::for_each_image(n, workers, [&](int wk, Index b) {
    Workspace& ws = workspaces_[static_cast<std::size_t>(wk)];
    const auto dyt = detail::image_rows(dy.col(b).data(), l, co);
    const auto t = detail::image_patches(g, x_.col(b).data(), ws.patches);
    detail::grouped_weight_gradient_add<Scalar>(g, dyt, t, ws.e);
    if (want_dx)
      detail::grouped_input_gradient<Scalar>(g, dyt, weff_, dx_.col(b).data(), ws.patch_grad);
  });
  Matrix fj;
  detail::sum_over_workers(workspaces_, workers, &Workspace::e, fj);
  const std::vector<Matrix> a = projected_reflectors(applied, lr, f);
  for (std::size_t j = applied.size(); j-- > 0;) {
    Matrix ek;
    detail::serial_product(ek, fj, Op::n, lr[j].v(), Op::n);
    lr[j].apply_ct_right(ek);
    Matrix ac = a[j];
    lr[j].apply_c_right(ac);
    Matrix xz, zk;
    detail::serial_product(xz, fj, Op::t, ac, Op::n);
    detail::serial_product(zk, ac, Op::t, ek, Op::n);
    finish_gradient(applied, lr, f, j, ek, xz, zk);
    if (j > 0) this->adapters()[applied[j]].chain().apply_right(*f[j], fj, Apply::transpose);
  }
}

using HraConv2df = HraConv2d<float>;
using HraConv2dd = HraConv2d<double>;

}  // namespace hra
