// Values in error messages written as Python writes them, so that a kernel's TORCH_CHECK and the
// pure-PyTorch twin of its checks (implicit_torch/ops/_reference.py, _qp_reference.py) raise
// the same message: dtypes as `torch.int64` (not `Long`), layouts as `torch.sparse_coo`,
// shapes as tuples `(3, 4, 5)` / `(3,)` (not `[3, 4, 5]`), floats as Python's repr (`1e-06`,
// `0.0001`, `1e+16`, `2.0`, `nan`, `-inf`).
#pragma once

#include <ATen/ATen.h>

#include <charconv>
#include <cmath>
#include <cstdlib>
#include <string>
#include <system_error>

namespace implicit_torch {
namespace py {

// str(dtype): "torch." + the dtype's primary name (the name Python gives it).
inline std::string dtype(at::ScalarType t) {
  return "torch." + std::string(c10::getDtypeNames(t).first);
}

// str(layout).
inline std::string layout(at::Layout l) {
  switch (l) {
    case at::kStrided:
      return "torch.strided";
    case at::kSparse:
      return "torch.sparse_coo";
    case at::kSparseCsr:
      return "torch.sparse_csr";
    case at::kSparseCsc:
      return "torch.sparse_csc";
    case at::kSparseBsr:
      return "torch.sparse_bsr";
    case at::kSparseBsc:
      return "torch.sparse_bsc";
    case at::kMkldnn:
      return "torch._mkldnn";
    case at::kJagged:
      return "torch.jagged";
    default:
      return c10::str(l);
  }
}

// str(tuple(shape)): "()", "(3,)", "(3, 4, 5)".
inline std::string shape(at::IntArrayRef sizes) {
  std::string s = "(";
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (i > 0) s += ", ";
    s += std::to_string(sizes[i]);
  }
  return s + (sizes.size() == 1 ? ",)" : ")");
}

// str(device): "cpu", "cuda:0", "meta".
inline std::string device(const at::Device& d) { return d.str(); }

// repr(float(v)): the shortest digits that round-trip (std::to_chars), laid out by Python's
// rule: positional with at least one digit after the point ("2.0", "0.0001") while the decimal
// exponent e of d.ddd×10^e satisfies -5 < e < 16, scientific with a signed exponent of at least
// two digits ("1e-05", "1.5e+16") otherwise.
inline std::string real(double v) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  if (v == 0) return std::signbit(v) ? "-0.0" : "0.0";
  char buf[64];
  const auto res = std::to_chars(buf, buf + sizeof buf, v, std::chars_format::scientific);
  if (res.ec != std::errc()) return c10::str(v);
  const std::string text(buf, res.ptr);  // "-d.ddde±xx"
  const size_t e = text.find('e');
  std::string sign, digits;
  for (size_t i = 0; i < e; ++i) {
    if (text[i] == '-') {
      sign = "-";
    } else if (text[i] != '.') {
      digits += text[i];
    }
  }
  const int exponent = std::atoi(text.c_str() + e + 1);
  const int point = exponent + 1;  // digits[:point] come before the decimal point
  const int count = static_cast<int>(digits.size());
  std::string out;
  if (point <= -4 || point > 16) {
    out = digits.substr(0, 1);
    if (count > 1) out += "." + digits.substr(1);
    const std::string magnitude = std::to_string(std::abs(exponent));
    out += std::string(exponent < 0 ? "e-" : "e+") + (magnitude.size() < 2 ? "0" : "") +
           magnitude;
  } else if (point <= 0) {
    out = "0." + std::string(-point, '0') + digits;
  } else if (point >= count) {
    out = digits + std::string(point - count, '0') + ".0";
  } else {
    out = digits.substr(0, point) + "." + digits.substr(point);
  }
  return sign + out;
}

}  // namespace py
}  // namespace implicit_torch
