// peftc_run: run a peftc export from C++ (LibTorch) and print its logits.
//
//   peftc_run MODEL --ids "ROW;ROW;..." [--mask "ROW;..."] [--inputs NAMES] [--padding left|right]
//             [--pad-id N] [--threads N] [--bench N]
//
// MODEL is either a TorchScript file (model.pt, loaded with torch::jit::load) or an AOTInductor
// package (model.pt2, loaded with torch::inductor::AOTIModelPackageLoader); the suffix decides.
//
// Inputs. --ids gives token ids, rows separated by ';', ids by ',' ("15,3,9;4,7"). Without --mask,
// rows may differ in length: shorter rows are padded with --pad-id (default 0) on the left (default,
// what decoder models expect) or the right, and attention_mask is 1 on real tokens, 0 on padding.
// With --mask (same layout, 0/1), every row of --ids must already have the same length.
// The model's input names, in order, come from the artifact itself: the forward() schema of a .pt
// (peftc names the arguments input_ids, attention_mask, ...), the "peftc.input_names" metadata of a
// .pt2. --inputs "input_ids,attention_mask" overrides both. Known names: input_ids,
// attention_mask, token_type_ids (zeros), position_ids ((mask.cumsum(-1) - 1).clamp(min=0), as
// peftc feeds causal-lm programs).
//
// Output (stdout, machine-readable): a first line "shape D0 D1 ..." then the logits, one innermost
// row per line, values separated by spaces, printed with 9 significant digits (exact for float32).
// --bench N runs the model N more times and prints "latency_ms median=... mean=... min=... runs=N" to stderr.
// Errors go to stderr as one line "peftc_run: error: ..." with exit code 2 (usage) or 1 (runtime).

#include <ATen/Parallel.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/script.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <iomanip>
#include <iostream>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

using Matrix = std::vector<std::vector<int64_t>>;

const char* kUsage =
    "usage: peftc_run MODEL(.pt|.pt2) --ids \"1,2,3;4,5\" [--mask \"1,1,1;0,1\"] [--inputs a,b,...]\n"
    "                 [--padding left|right] [--pad-id N] [--threads N] [--bench N]";

std::vector<std::string> split(const std::string& text, char sep) {
  std::vector<std::string> parts;
  std::string part;
  std::istringstream stream(text);
  while (std::getline(stream, part, sep)) {
    parts.push_back(part);
  }
  return parts;
}

int64_t parse_int(const std::string& text, const std::string& what) {
  std::size_t used = 0;
  int64_t value = 0;
  try {
    value = std::stoll(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used == 0 || used != text.size()) {
    throw UsageError(what + ": '" + text + "' is not an integer");
  }
  return value;
}

Matrix parse_matrix(const std::string& text, const std::string& what) {
  Matrix rows;
  for (const auto& row_text : split(text, ';')) {
    std::vector<int64_t> row;
    for (const auto& cell : split(row_text, ',')) {
      row.push_back(parse_int(cell, what));
    }
    if (row.empty()) {
      throw UsageError(what + ": empty row in '" + text + "'; separate rows with ';' and ids with ','");
    }
    rows.push_back(std::move(row));
  }
  if (rows.empty()) {
    throw UsageError(what + " is empty; give at least one row of ids, e.g. --ids 15,3,9");
  }
  return rows;
}

torch::Tensor to_tensor(const Matrix& rows) {
  const auto batch = static_cast<int64_t>(rows.size());
  const auto seq = static_cast<int64_t>(rows[0].size());
  auto out = torch::empty({batch, seq}, torch::kLong);
  auto acc = out.accessor<int64_t, 2>();
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t s = 0; s < seq; ++s) {
      acc[b][s] = rows[b][s];
    }
  }
  return out;
}

struct Options {
  std::string model;
  std::string ids;
  std::string mask;
  std::string inputs;
  std::string padding = "left";
  int64_t pad_id = 0;
  int64_t threads = 0;
  int64_t bench = 0;
};

Options parse_args(int argc, char** argv) {
  Options opt;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) {
        throw UsageError(arg + " needs a value");
      }
      return argv[++i];
    };
    if (arg == "--ids") {
      opt.ids = value();
    } else if (arg == "--mask") {
      opt.mask = value();
    } else if (arg == "--inputs") {
      opt.inputs = value();
    } else if (arg == "--padding") {
      opt.padding = value();
    } else if (arg == "--pad-id") {
      opt.pad_id = parse_int(value(), "--pad-id");
    } else if (arg == "--threads") {
      opt.threads = parse_int(value(), "--threads");
    } else if (arg == "--bench") {
      opt.bench = parse_int(value(), "--bench");
    } else if (arg == "-h" || arg == "--help") {
      std::cout << kUsage << "\n";
      std::exit(0);
    } else if (!arg.empty() && arg[0] == '-') {
      throw UsageError("unknown option " + arg);
    } else if (opt.model.empty()) {
      opt.model = arg;
    } else {
      throw UsageError("unexpected argument '" + arg + "' (the model path is already " + opt.model + ")");
    }
  }
  if (opt.model.empty()) {
    throw UsageError("no model given; pass the path of a model.pt or model.pt2");
  }
  if (opt.ids.empty()) {
    throw UsageError("no --ids given, e.g. --ids \"15,3,9;4,7\"");
  }
  if (opt.padding != "left" && opt.padding != "right") {
    throw UsageError("--padding must be left or right, got '" + opt.padding + "'");
  }
  return opt;
}

// input_ids and attention_mask from --ids (and --mask), padding ragged rows.
std::pair<torch::Tensor, torch::Tensor> make_ids_and_mask(const Options& opt) {
  Matrix ids = parse_matrix(opt.ids, "--ids");
  std::size_t longest = 0;
  for (const auto& row : ids) {
    longest = std::max(longest, row.size());
  }
  Matrix mask;
  if (!opt.mask.empty()) {
    mask = parse_matrix(opt.mask, "--mask");
    if (mask.size() != ids.size()) {
      throw UsageError("--mask has " + std::to_string(mask.size()) + " rows but --ids has " +
                       std::to_string(ids.size()));
    }
    for (std::size_t r = 0; r < ids.size(); ++r) {
      if (ids[r].size() != longest || mask[r].size() != longest) {
        throw UsageError("with --mask every row of --ids and --mask needs " + std::to_string(longest) +
                         " entries; row " + std::to_string(r) + " differs");
      }
    }
  } else {
    for (auto& row : ids) {
      const std::size_t pad = longest - row.size();
      std::vector<int64_t> keep(row.size(), 1);
      std::vector<int64_t> fill(pad, 0);
      std::vector<int64_t> pads(pad, opt.pad_id);
      std::vector<int64_t> m;
      if (opt.padding == "left") {
        row.insert(row.begin(), pads.begin(), pads.end());
        m = fill;
        m.insert(m.end(), keep.begin(), keep.end());
      } else {
        row.insert(row.end(), pads.begin(), pads.end());
        m = keep;
        m.insert(m.end(), fill.begin(), fill.end());
      }
      mask.push_back(std::move(m));
    }
  }
  return {to_tensor(ids), to_tensor(mask)};
}

std::vector<torch::Tensor> make_inputs(const std::vector<std::string>& names, const torch::Tensor& ids,
                                       const torch::Tensor& mask) {
  std::vector<torch::Tensor> inputs;
  for (const auto& name : names) {
    if (name == "input_ids") {
      inputs.push_back(ids);
    } else if (name == "attention_mask") {
      inputs.push_back(mask);
    } else if (name == "token_type_ids") {
      inputs.push_back(torch::zeros_like(ids));
    } else if (name == "position_ids") {
      inputs.push_back((mask.cumsum(-1) - 1).clamp_min(0));
    } else {
      throw UsageError("the model takes an input named '" + name +
                       "' that peftc_run cannot make; known: input_ids, attention_mask, token_type_ids, position_ids");
    }
  }
  return inputs;
}

bool ends_with(const std::string& text, const std::string& suffix) {
  return text.size() >= suffix.size() && text.compare(text.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// One loaded model, whichever the format: names of its inputs and a run function.
class Runner {
 public:
  explicit Runner(const std::string& path) : aoti_(ends_with(path, ".pt2")) {
    if (!std::filesystem::exists(path)) {
      throw std::runtime_error("model file '" + path + "' does not exist; pass the model.pt or model.pt2 of an export");
    }
    if (aoti_) {
      package_ = std::make_unique<torch::inductor::AOTIModelPackageLoader>(path);
    } else if (ends_with(path, ".pt")) {
      module_ = torch::jit::load(path);
      module_.eval();
    } else {
      throw UsageError("model '" + path + "' must end in .pt (TorchScript) or .pt2 (AOTInductor)");
    }
  }

  std::vector<std::string> input_names() {
    std::vector<std::string> names;
    if (aoti_) {
      auto metadata = package_->get_metadata();
      auto it = metadata.find("peftc.input_names");
      if (it == metadata.end() || it->second.empty()) {
        throw UsageError("the package has no peftc.input_names metadata; pass --inputs input_ids,attention_mask,...");
      }
      names = split(it->second, ',');
    } else {
      const auto& schema = module_.get_method("forward").function().getSchema();
      for (const auto& argument : schema.arguments()) {
        if (argument.name() != "self") {
          names.push_back(argument.name());
        }
      }
    }
    return names;
  }

  torch::Tensor run(const std::vector<torch::Tensor>& inputs) {
    if (aoti_) {
      auto outputs = package_->run(inputs);
      if (outputs.empty()) {
        throw std::runtime_error("the package returned no output");
      }
      return outputs[0];
    }
    std::vector<torch::jit::IValue> args(inputs.begin(), inputs.end());
    auto output = module_.forward(args);
    if (output.isTensor()) {
      return output.toTensor();
    }
    if (output.isTuple()) {
      return output.toTupleRef().elements().at(0).toTensor();
    }
    if (output.isList()) {
      return output.toListRef().at(0).toTensor();
    }
    throw std::runtime_error("forward() returned " + output.tagKind() + ", expected a tensor");
  }

 private:
  bool aoti_;
  torch::jit::script::Module module_;
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> package_;
};

void print_tensor(const torch::Tensor& tensor) {
  auto values = tensor.to(torch::kFloat).contiguous();
  std::cout << "shape";
  for (auto d : values.sizes()) {
    std::cout << ' ' << d;
  }
  std::cout << '\n';
  const int64_t row = values.dim() > 0 ? values.size(-1) : 1;
  const int64_t total = values.numel();
  const float* data = values.data_ptr<float>();
  std::cout << std::setprecision(9);
  for (int64_t i = 0; i < total; ++i) {
    std::cout << data[i] << ((i + 1) % row == 0 ? '\n' : ' ');
  }
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const Options opt = parse_args(argc, argv);
    if (opt.threads > 0) {
      at::set_num_threads(static_cast<int>(opt.threads));
    }
    c10::InferenceMode guard;
    Runner runner(opt.model);
    auto names = opt.inputs.empty() ? runner.input_names() : split(opt.inputs, ',');
    auto [ids, mask] = make_ids_and_mask(opt);
    auto inputs = make_inputs(names, ids, mask);
    auto logits = runner.run(inputs);
    print_tensor(logits);
    if (opt.bench > 0) {
      std::vector<double> times;
      for (int64_t i = 0; i < opt.bench; ++i) {
        auto start = std::chrono::steady_clock::now();
        runner.run(inputs);
        times.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count());
      }
      std::sort(times.begin(), times.end());
      double total = 0.0;
      for (double t : times) {
        total += t;
      }
      const double mean = total / static_cast<double>(times.size());
      std::cerr << "latency_ms median=" << times[times.size() / 2] << " mean=" << mean << " min=" << times.front()
                << " runs=" << opt.bench << '\n';
    }
    return 0;
  } catch (const UsageError& e) {
    std::cerr << "peftc_run: error: " << e.what() << "\n" << kUsage << '\n';
    return 2;
  } catch (const c10::Error& e) {
    std::cerr << "peftc_run: error: " << e.what_without_backtrace() << '\n';
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "peftc_run: error: " << e.what() << '\n';
    return 1;
  }
}
