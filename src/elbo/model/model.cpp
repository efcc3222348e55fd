// The model factories: model.type picks the layout, the layout's type the model.
#include "elbo/model/model.hpp"

#include "elbo/model/hvae.hpp"
#include "elbo/model/vae.hpp"
#include "elbo/util/error.hpp"

namespace elbo {

const ParamView& ModelLayout::view(const std::string& name) const {
  for (const auto& v : views())
    if (v.name == name) return v;
  throw model_error("no parameter named '" + name + "' in this model");
}

std::unique_ptr<ModelLayout> make_layout(const ModelSpec& spec, const std::vector<int>& input_shape) {
  if (spec.type == ModelType::Hierarchical) return std::make_unique<HvaeLayout>(spec, input_shape);
  return std::make_unique<VaeLayout>(spec, input_shape);
}

template <class T>
std::unique_ptr<Model<T>> make_model(const ModelLayout& layout, Backend<T>& backend, int max_rows) {
  if (const auto* h = dynamic_cast<const HvaeLayout*>(&layout)) return std::make_unique<Hvae<T>>(*h, backend, max_rows);
  if (const auto* v = dynamic_cast<const VaeLayout*>(&layout)) return std::make_unique<Vae<T>>(*v, backend, max_rows);
  throw model_error("make_model: a layout of no known model type");
}

template std::unique_ptr<Model<float>> make_model(const ModelLayout&, Backend<float>&, int);
template std::unique_ptr<Model<double>> make_model(const ModelLayout&, Backend<double>&, int);

}  // namespace elbo
