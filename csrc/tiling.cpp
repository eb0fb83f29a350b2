// Zero-copy strided patch tiling and normalization for defectscope.
//
// The frame is read in place through the buffer protocol (any strides, read-only
// views and np.memmap included) and float32 NCHW patches are written straight
// into a caller-provided buffer. Work is split over windows with std::thread
// while the GIL is released. The z-score does not depend on the frame's scale or
// offset: windows are scaled by a power of two and shifted by a reference pixel before
// their statistics, and the constant rule is relative (is_flat). Every argument is
// checked, with an error naming it, before the GIL is released.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <new>
#include <sstream>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <type_traits>
#include <vector>

namespace py = pybind11;

namespace {

enum class Mode { kZScore, kMinMax, kImageNet };
enum class NanPolicy { kRaise, kZero, kPropagate };

constexpr std::array<double, 3> kImageNetMean = {0.485, 0.456, 0.406};
constexpr std::array<double, 3> kImageNetStd = {0.229, 0.224, 0.225};
// A window (or a dense footprint) is constant, and maps to zeros, when its standard
// deviation is at most kStdRelFloor times the magnitude of its mean: contrast that small
// is below what float64 statistics resolve (their rounding is ~1e-13 of the mean), yet far
// below any contrast a float32 or integer frame can hold. Relative, so a frame x1e-10 or
// + 1e9 is normalized like the frame itself. kStdAbsFloor (the smallest normal double)
// only catches true constants whose mean is 0 (all-zero windows): windows are scaled to
// magnitudes near 1 before their statistics, so no real contrast comes near it.
constexpr double kStdRelFloor = 1e-12;
constexpr double kStdAbsFloor = std::numeric_limits<double>::min();

inline bool is_flat(double sd, double level) {
  return sd <= kStdRelFloor * std::abs(level) || sd <= kStdAbsFloor;
}

// Multiplies v[0 .. n) by 2**-exponent. A power of two only moves the exponent, so this is
// exact (no rounding), and a frame x2**k gives bit-identical windows. Squares of the
// scaled values (magnitude below 1) neither overflow nor underflow.
inline void scale_pow2(double* v, py::ssize_t n, int exponent) {
  if (exponent == 0) return;
  if (exponent < -1000) {  // subnormal magnitudes: 2**-exponent is not a double; two steps
    for (py::ssize_t i = 0; i < n; ++i) v[i] *= 0x1p1000;
    exponent += 1000;
  }
  const double factor = std::ldexp(1.0, -exponent);
  for (py::ssize_t i = 0; i < n; ++i) v[i] *= factor;
}

// frexp's exponent of the largest magnitude: 2**-exponent scales it into [0.5, 1).
inline int magnitude_exponent(double largest) {
  int exponent = 0;
  if (largest > 0.0 && std::isfinite(largest)) std::frexp(largest, &exponent);
  return exponent;
}

struct Job {
  const char* frame = nullptr;
  py::ssize_t height = 0, width = 0;
  py::ssize_t stride_bytes_y = 0, stride_bytes_x = 0;
  const int64_t* origins = nullptr;  // (n, 2) row, col
  py::ssize_t n_windows = 0;
  int patch = 0;
  int channels = 1;
  Mode mode = Mode::kZScore;
  NanPolicy nan_policy = NanPolicy::kRaise;
  double lo = 0.0, hi = 1.0;
  float* out = nullptr;
};

// One value of a frame. numpy hands over unaligned views (a memmap at an odd offset, a
// field of a packed record), where dereferencing a T* would be undefined behaviour; a
// memcpy of sizeof(T) bytes compiles to the same single load.
template <typename T>
inline T load(const char* at) {
  T value;
  std::memcpy(&value, at, sizeof(T));
  return value;
}

// Sum with four accumulators: independent chains the CPU can overlap.
inline double sum4(const double* v, py::ssize_t n) {
  double a = 0, b = 0, c = 0, d = 0;
  py::ssize_t i = 0;
  for (; i + 4 <= n; i += 4) {
    a += v[i];
    b += v[i + 1];
    c += v[i + 2];
    d += v[i + 3];
  }
  for (; i < n; ++i) a += v[i];
  return (a + b) + (c + d);
}

inline double centered_ss4(const double* v, py::ssize_t n, double mean) {
  double a = 0, b = 0, c = 0, d = 0;
  py::ssize_t i = 0;
  for (; i + 4 <= n; i += 4) {
    const double e0 = v[i] - mean, e1 = v[i + 1] - mean, e2 = v[i + 2] - mean,
                 e3 = v[i + 3] - mean;
    a += e0 * e0;
    b += e1 * e1;
    c += e2 * e2;
    d += e3 * e3;
  }
  for (; i < n; ++i) a += (v[i] - mean) * (v[i] - mean);
  return (a + b) + (c + d);
}

// Normalizes one gathered window with some non-finite pixels (the rare, slow path).
// For 'zscore', src holds the window scaled and minus `reference` (process_range).
void normalize_with_nonfinite(const Job& job, const double* src, float* out,
                              double reference) {
  const py::ssize_t plane = static_cast<py::ssize_t>(job.patch) * job.patch;
  const bool zero = job.nan_policy == NanPolicy::kZero;
  double offset = job.lo, scale = 1.0 / (job.hi - job.lo);
  if (job.mode == Mode::kZScore) {
    if (!zero) {
      offset = std::numeric_limits<double>::quiet_NaN();
    } else {
      double sum = 0.0, ss = 0.0;
      py::ssize_t n = 0;
      for (py::ssize_t i = 0; i < plane; ++i)
        if (std::isfinite(src[i])) sum += src[i], ++n;
      const double mean = n > 0 ? sum / static_cast<double>(n) : 0.0;
      for (py::ssize_t i = 0; i < plane; ++i)
        if (std::isfinite(src[i])) ss += (src[i] - mean) * (src[i] - mean);
      const double sd = n > 0 ? std::sqrt(ss / static_cast<double>(n)) : 0.0;
      offset = mean;
      // src is already shifted by the window's reference (see process_range).
      scale = is_flat(sd, reference + mean) ? 0.0 : 1.0 / sd;
    }
  }
  for (int c = 0; c < job.channels; ++c) {
    const bool imagenet = job.mode == Mode::kImageNet;
    const double c_offset = imagenet ? kImageNetMean[c] : 0.0;
    const double c_scale = imagenet ? 1.0 / kImageNetStd[c] : 1.0;
    float* dst = out + c * plane;
    for (py::ssize_t i = 0; i < plane; ++i) {
      if (zero && !std::isfinite(src[i])) {
        dst[i] = 0.0f;
        continue;
      }
      double r = (src[i] - offset) * scale;
      if (imagenet) r = (r - c_offset) * c_scale;
      dst[i] = static_cast<float>(r);
    }
  }
}

// Returns the index of the first window holding a non-finite value, or -1.
template <typename T>
py::ssize_t process_range(const Job& job, py::ssize_t begin, py::ssize_t end,
                          std::vector<double>& scratch) {
  const int p = job.patch;
  const py::ssize_t plane = static_cast<py::ssize_t>(p) * p;
  const bool unit_x = job.stride_bytes_x == static_cast<py::ssize_t>(sizeof(T));
  scratch.resize(plane);
  double* src = scratch.data();
  for (py::ssize_t w = begin; w < end; ++w) {
    const py::ssize_t oy = job.origins[2 * w], ox = job.origins[2 * w + 1];
    // Gather the window once as doubles; later passes run on this cache-resident copy.
    for (int y = 0; y < p; ++y) {
      const char* row = job.frame + (oy + y) * job.stride_bytes_y + ox * job.stride_bytes_x;
      double* dst = src + static_cast<py::ssize_t>(y) * p;
      if (unit_x) {
        for (int x = 0; x < p; ++x)
          dst[x] = static_cast<double>(load<T>(row + static_cast<py::ssize_t>(x) * sizeof(T)));
      } else {
        for (int x = 0; x < p; ++x)
          dst[x] = static_cast<double>(load<T>(row + x * job.stride_bytes_x));
      }
    }
    float* out = job.out + w * job.channels * plane;
    bool finite = true;
    double largest = 0.0;  // of the finite pixels
    if constexpr (std::is_floating_point_v<T>) {
      for (py::ssize_t i = 0; i < plane; ++i) {
        const bool ok = std::isfinite(src[i]);
        finite &= ok;
        largest = ok ? std::max(largest, std::abs(src[i])) : largest;
      }
    } else if (job.mode == Mode::kZScore) {
      for (py::ssize_t i = 0; i < plane; ++i) largest = std::max(largest, std::abs(src[i]));
    }
    if (!finite && job.nan_policy == NanPolicy::kRaise) return w;
    double reference = 0.0;
    if (job.mode == Mode::kZScore) {
      // Scaled by a power of two to magnitudes below 1 (exact; squares cannot overflow or
      // underflow), then shifted by the first finite pixel: the statistics see the window's
      // contrast, not its scale or its offset, and a constant window becomes exact zeros.
      scale_pow2(src, plane, magnitude_exponent(largest));
      py::ssize_t first = 0;
      while (first < plane && !std::isfinite(src[first])) ++first;
      reference = first < plane ? src[first] : 0.0;
      for (py::ssize_t i = 0; i < plane; ++i) src[i] -= reference;
    }
    if (!finite) {
      normalize_with_nonfinite(job, src, out, reference);
      continue;
    }
    double offset = job.lo, scale = 1.0 / (job.hi - job.lo);
    if (job.mode == Mode::kZScore) {
      const double mean = sum4(src, plane) / static_cast<double>(plane);
      const double sd = std::sqrt(centered_ss4(src, plane, mean) / static_cast<double>(plane));
      if (is_flat(sd, reference + mean)) {
        std::fill(out, out + job.channels * plane, 0.0f);
        continue;
      }
      offset = mean;
      scale = 1.0 / sd;
    }
    if (job.mode == Mode::kImageNet) {
      for (int c = 0; c < job.channels; ++c) {
        // ((v - lo) * s - m_c) / s_c folded into one multiply-add per pixel.
        const double c_scale = scale / kImageNetStd[c];
        const double c_shift = -(offset * scale + kImageNetMean[c]) / kImageNetStd[c];
        float* dst = out + c * plane;
        for (py::ssize_t i = 0; i < plane; ++i)
          dst[i] = static_cast<float>(src[i] * c_scale + c_shift);
      }
    } else {
      for (py::ssize_t i = 0; i < plane; ++i) out[i] = static_cast<float>((src[i] - offset) * scale);
      // Gray replicated into the other channels.
      for (int c = 1; c < job.channels; ++c)
        std::memcpy(out + c * plane, out, sizeof(float) * static_cast<size_t>(plane));
    }
  }
  return -1;
}

// Runs work(0 .. n_threads - 1) on std::threads; where the system refuses a thread, the
// calling thread does the remaining ranges. work must not throw (it catches its own).
template <typename Work>
void run_on_threads(int n_threads, Work&& work) {
  std::vector<std::thread> pool;
  pool.reserve(n_threads);
  int started = 1;
  for (int t = 1; t < n_threads; ++t) {
    try {
      pool.emplace_back(work, t);
      ++started;
    } catch (const std::system_error&) {
      break;
    }
  }
  work(0);
  for (int t = started; t < n_threads; ++t) work(t);
  for (auto& th : pool) th.join();
}

template <typename T>
py::ssize_t run_threads(const Job& job, int n_threads) {
  const py::ssize_t n = job.n_windows;
  n_threads = static_cast<int>(std::max<py::ssize_t>(1, std::min<py::ssize_t>(n_threads, n)));
  std::vector<py::ssize_t> bad(n_threads, -1);
  std::vector<char> failed(n_threads, 0);
  // An exception escaping a std::thread calls std::terminate: each range catches its own.
  auto work = [&](int t) noexcept {
    try {
      std::vector<double> scratch;
      const py::ssize_t begin = n * t / n_threads, end = n * (t + 1) / n_threads;
      bad[t] = process_range<T>(job, begin, end, scratch);
    } catch (...) {
      failed[t] = 1;
    }
  };
  run_on_threads(n_threads, work);
  for (int t = 0; t < n_threads; ++t)
    if (failed[t]) throw std::bad_alloc();
  for (py::ssize_t b : bad)
    if (b >= 0) return b;
  return -1;
}

std::string shape_str(const py::buffer_info& info) {
  std::ostringstream os;
  os << "(";
  for (size_t i = 0; i < info.shape.size(); ++i) os << (i ? ", " : "") << info.shape[i];
  os << (info.shape.size() == 1 ? ",)" : ")");
  return os.str();
}

bool little_endian_host() {
  const uint16_t probe = 1;
  unsigned char first = 0;
  std::memcpy(&first, &probe, 1);
  return first == 1;
}

// Maps a buffer's format to a dtype name, or "" if unsupported.
std::string dtype_name(const py::buffer_info& info) {
  if (info.format.empty()) return "";
  // Strip byte-order prefixes that denote the native order.
  std::string f = info.format;
  if (f[0] == '@' || f[0] == '=') f = f.substr(1);
  if (f[0] == '<') {
    if (!little_endian_host()) return "";
    f = f.substr(1);
  }
  if (f.size() != 1) return "";
  const char c = f[0];
  const auto size = info.itemsize;
  if (c == 'B' && size == 1) return "uint8";
  if (c == 'H' && size == 2) return "uint16";
  if (c == 'h' && size == 2) return "int16";
  if ((c == 'i' || c == 'l') && size == 4) return "int32";
  if ((c == 'I' || c == 'L') && size == 4) return "uint32";
  if (c == 'f' && size == 4) return "float32";
  if (c == 'd' && size == 8) return "float64";
  return "";
}

Mode parse_mode(const std::string& s) {
  if (s == "zscore") return Mode::kZScore;
  if (s == "minmax") return Mode::kMinMax;
  if (s == "imagenet") return Mode::kImageNet;
  throw py::value_error("normalization must be 'zscore', 'minmax' or 'imagenet', got '" + s + "'");
}

NanPolicy parse_nan_policy(const std::string& s) {
  if (s == "raise") return NanPolicy::kRaise;
  if (s == "zero") return NanPolicy::kZero;
  if (s == "propagate") return NanPolicy::kPropagate;
  throw py::value_error("nan_policy must be 'raise', 'zero' or 'propagate', got '" + s + "'");
}

py::ssize_t tile_into(const py::buffer& frame, const py::buffer& out,
                      const py::array_t<int64_t, py::array::c_style>& origins, int patch,
                      const std::string& normalization, int channels, double lo, double hi,
                      const std::string& nan_policy, int n_threads) {
  Job job;
  job.mode = parse_mode(normalization);
  job.nan_policy = parse_nan_policy(nan_policy);
  if (patch <= 0) throw py::value_error("patch size must be positive, got " + std::to_string(patch));
  if (channels != 1 && channels != 3)
    throw py::value_error("channels must be 1 or 3, got " + std::to_string(channels));
  if (job.mode == Mode::kImageNet && channels != 3)
    throw py::value_error("'imagenet' normalization replicates gray into 3 channels; channels must be 3, got " +
                          std::to_string(channels));
  if (job.mode != Mode::kZScore) {
    if (!std::isfinite(lo) || !std::isfinite(hi) || !(hi > lo) || !std::isfinite(hi - lo)) {
      std::ostringstream os;
      os << "value range must be finite with high > low, got (" << lo << ", " << hi << ")";
      throw py::value_error(os.str());
    }
  }
  job.lo = lo;
  job.hi = hi;
  job.patch = patch;
  job.channels = channels;

  py::buffer_info fi = frame.request();
  if (fi.ndim != 2) throw py::value_error("frame must be 2-D, got shape " + shape_str(fi));
  const std::string fdtype = dtype_name(fi);
  if (fdtype.empty() && !fi.format.empty() && (fi.format[0] == '>' || fi.format[0] == '!'))
    throw py::type_error("frame is big-endian (buffer format '" + fi.format +
                         "'); convert it to native byte order, e.g. "
                         "frame.astype(frame.dtype.newbyteorder('='))");
  if (fdtype.empty())
    throw py::type_error("frame dtype (buffer format '" + fi.format +
                         "') is not supported; use uint8, uint16, int16, int32, uint32, float32 or float64");
  job.frame = static_cast<const char*>(fi.ptr);
  job.height = fi.shape[0];
  job.width = fi.shape[1];
  job.stride_bytes_y = fi.strides[0];
  job.stride_bytes_x = fi.strides[1];
  if (patch > job.height || patch > job.width) {
    std::ostringstream os;
    os << "patch size " << patch << " is larger than the frame " << shape_str(fi);
    throw py::value_error(os.str());
  }

  if (origins.ndim() != 2 || origins.shape(1) != 2) {
    std::ostringstream os;
    os << "origins must have shape (n, 2), got " << origins.ndim() << "-D";
    throw py::value_error(os.str());
  }
  job.origins = origins.data();
  job.n_windows = origins.shape(0);
  for (py::ssize_t i = 0; i < job.n_windows; ++i) {
    const int64_t oy = job.origins[2 * i], ox = job.origins[2 * i + 1];
    // Compared as origin <= size - patch: origin + patch overflows for origins near 2**63.
    if (oy < 0 || ox < 0 || oy > job.height - patch || ox > job.width - patch) {
      std::ostringstream os;
      os << "window " << i << " at origin (" << oy << ", " << ox << ") with patch size " << patch
         << " does not fit in the frame " << shape_str(fi);
      throw py::value_error(os.str());
    }
  }

  py::buffer_info oi = out.request(true);
  if (dtype_name(oi) != "float32")  // "f", or "=f" as numpy writes unaligned buffers
    throw py::type_error("out must be a float32 buffer, got format '" + oi.format + "'");
  if (oi.ndim != 4 || oi.shape[1] != channels || oi.shape[2] != patch || oi.shape[3] != patch ||
      oi.shape[0] < job.n_windows) {
    std::ostringstream os;
    os << "out must have shape (>=" << job.n_windows << ", " << channels << ", " << patch << ", "
       << patch << "), got " << shape_str(oi);
    throw py::value_error(os.str());
  }
  const py::ssize_t plane = static_cast<py::ssize_t>(patch) * patch;
  if (oi.strides[3] != 4 || oi.strides[2] != 4 * patch || oi.strides[1] != 4 * plane ||
      oi.strides[0] != 4 * plane * channels)
    throw py::value_error("out must be C-contiguous");
  if (reinterpret_cast<std::uintptr_t>(oi.ptr) % alignof(float) != 0)
    throw py::value_error("out must be aligned to 4 bytes (np.empty gives such a buffer)");
  job.out = static_cast<float*>(oi.ptr);

  if (n_threads <= 0) n_threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  py::ssize_t bad = -1;
  {
    py::gil_scoped_release release;
    if (fdtype == "uint8") bad = run_threads<uint8_t>(job, n_threads);
    else if (fdtype == "uint16") bad = run_threads<uint16_t>(job, n_threads);
    else if (fdtype == "int16") bad = run_threads<int16_t>(job, n_threads);
    else if (fdtype == "int32") bad = run_threads<int32_t>(job, n_threads);
    else if (fdtype == "uint32") bad = run_threads<uint32_t>(job, n_threads);
    else if (fdtype == "float32") bad = run_threads<float>(job, n_threads);
    else bad = run_threads<double>(job, n_threads);
  }
  if (bad >= 0) {
    std::ostringstream os;
    os << "window " << bad << " at origin (" << job.origins[2 * bad] << ", " << job.origins[2 * bad + 1]
       << ") contains NaN or infinite values; clean the frame or pass nan_policy='zero'";
    throw py::value_error(os.str());
  }
  return job.n_windows;
}


// ---------------------------------------------------------------------------
// Frame-consistent normalization for dense maps. A dense pass cannot z-score each
// window by its own statistics (windows overlap), so every pixel is z-scored by the
// mean and standard deviation of the box x box footprint around it, clipped at the
// frame's edges: the statistics of the window centred on it. Box sums slide along rows
// and columns, and the same constant rule as the windows' (is_flat) applies.
//
// Integer frames: the sums are exact integers (64-bit, 128-bit for the squares of 32-bit
// values) and each pixel is (n v - S1) / sqrt(n S2 - S1^2), formed from exact integers.
// No offset can cancel precision (a uint32 frame + 1e9 gives the same bits as the frame),
// and a region normalized alone equals the same pixels of the whole frame, bit for bit,
// whatever the thread count.
// Float frames: the footprint is scaled by a power of two (exact) to magnitudes below 1,
// so no value is too large to square, and shifted by a reference (the median of a sample
// of the footprint) before the sums, so they hold the contrast rather than an offset.
struct RegionJob {
  const char* frame = nullptr;
  py::ssize_t height = 0, width = 0;
  py::ssize_t stride_bytes_y = 0, stride_bytes_x = 0;
  py::ssize_t y0 = 0, x0 = 0, h = 0, w = 0;
  py::ssize_t box = 64, half = 32;
  // Rows [fy0, fy1) and columns [fx0, fx1): the union of the region's footprints.
  py::ssize_t fy0 = 0, fy1 = 0, fx0 = 0, fx1 = 0;
  int channels = 1;
  Mode mode = Mode::kZScore;
  double lo = 0.0, hi = 1.0;
  // Float z-score: a value v enters the sums as v * 2**-exponent - reference.
  int exponent = 0;
  double factor = 1.0;  // 2**-exponent, or 0 where that is not a double (std::ldexp then)
  double reference = 0.0;
  float* out = nullptr;
};

// The largest footprint side: box**2 * 2**32 must stay below 2**63 (the integer sums).
constexpr int kMaxBox = 32768;

template <typename T>
inline T raw_pixel(const RegionJob& job, py::ssize_t y, py::ssize_t x) {
  return load<T>(job.frame + y * job.stride_bytes_y + x * job.stride_bytes_x);
}

template <typename T>
inline double pixel(const RegionJob& job, py::ssize_t y, py::ssize_t x) {
  return static_cast<double>(raw_pixel<T>(job, y, x));
}

// A float pixel as it enters the z-score sums (see RegionJob).
template <typename T>
inline double shifted(const RegionJob& job, py::ssize_t y, py::ssize_t x) {
  const double v = pixel<T>(job, y, x);
  return (job.factor != 0.0 ? v * job.factor : std::ldexp(v, -job.exponent)) - job.reference;
}

inline void write_pixel(const RegionJob& job, py::ssize_t i, py::ssize_t j, double value) {
  const py::ssize_t plane = job.h * job.w;
  float* dst = job.out + i * job.w + j;
  if (job.mode == Mode::kImageNet) {
    for (int c = 0; c < job.channels; ++c)
      dst[c * plane] = static_cast<float>((value - kImageNetMean[c]) / kImageNetStd[c]);
  } else {
    const float v = static_cast<float>(value);
    for (int c = 0; c < job.channels; ++c) dst[c * plane] = v;
  }
}

// 'minmax' and 'imagenet': per-pixel maps of output rows [r0, r1); false at a non-finite
// value (the dense path then gives way to the per-window one).
template <typename T>
bool range_rows(const RegionJob& job, py::ssize_t r0, py::ssize_t r1) {
  const double scale = 1.0 / (job.hi - job.lo);
  for (py::ssize_t i = r0; i < r1; ++i)
    for (py::ssize_t j = 0; j < job.w; ++j) {
      const double v = pixel<T>(job, job.y0 + i, job.x0 + j);
      if (!std::isfinite(v)) return false;
      write_pixel(job, i, j, (v - job.lo) * scale);
    }
  return true;
}

// The sliding box sums shared by both z-score paths. Column sums over the rows of the
// current box live in s1/s2 (index = column - fx0); add(y, sign) adds or removes row y;
// emit(i, j, y, x, n, h1, h2) writes one pixel from the box's count and sums.
template <typename Sum, typename Square, typename Add, typename Emit>
void slide_boxes(const RegionJob& job, py::ssize_t r0, py::ssize_t r1, std::vector<Sum>& s1,
                 std::vector<Square>& s2, Add&& add, Emit&& emit) {
  const py::ssize_t c0 = job.fx0;
  auto add_row = [&](py::ssize_t y, int sign) {
    if (y >= 0 && y < job.height) add(y, sign);
  };
  const py::ssize_t first = job.y0 + r0 - job.half;
  for (py::ssize_t y = first; y < first + job.box; ++y) add_row(y, 1);
  for (py::ssize_t i = r0; i < r1; ++i) {
    const py::ssize_t y = job.y0 + i;
    if (i > r0) {
      add_row(y - job.half - 1, -1);
      add_row(y - job.half + job.box - 1, 1);
    }
    const py::ssize_t rows = std::min(job.height, y - job.half + job.box) -
                             std::max<py::ssize_t>(0, y - job.half);
    Sum h1 = 0;
    Square h2 = 0;
    py::ssize_t left = job.x0 - job.half, right = left + job.box;  // columns [left, right)
    for (py::ssize_t x = std::max<py::ssize_t>(0, left); x < std::min(job.width, right); ++x)
      h1 += s1[x - c0], h2 += s2[x - c0];
    for (py::ssize_t j = 0; j < job.w; ++j) {
      if (j > 0) {
        if (left >= 0) h1 -= s1[left - c0], h2 -= s2[left - c0];
        if (right < job.width) h1 += s1[right - c0], h2 += s2[right - c0];
        ++left, ++right;
      }
      const py::ssize_t n =
          rows * (std::min(job.width, right) - std::max<py::ssize_t>(0, left));
      emit(i, j, y, job.x0 + j, n, h1, h2);
    }
  }
}

// Float frames: z-score of output rows [r0, r1) (prepare_float has set the scale and
// reference and checked that every value is finite).
template <typename T>
bool zscore_rows_float(const RegionJob& job, py::ssize_t r0, py::ssize_t r1) {
  const py::ssize_t n_cols = job.fx1 - job.fx0;
  std::vector<double> s1(n_cols, 0.0), s2(n_cols, 0.0);
  auto add = [&](py::ssize_t y, int sign) {
    const double sg = sign;
    for (py::ssize_t k = 0; k < n_cols; ++k) {
      const double d = shifted<T>(job, y, job.fx0 + k);
      s1[k] += sg * d;
      s2[k] += sg * (d * d);
    }
  };
  auto emit = [&](py::ssize_t i, py::ssize_t j, py::ssize_t y, py::ssize_t x, py::ssize_t n,
                  double h1, double h2) {
    const double count = static_cast<double>(n);
    const double mean = h1 / count;
    const double sd = std::sqrt(std::max(0.0, h2 / count - mean * mean));
    write_pixel(job, i, j,
                is_flat(sd, job.reference + mean) ? 0.0 : (shifted<T>(job, y, x) - mean) / sd);
  };
  slide_boxes(job, r0, r1, s1, s2, add, emit);
  return true;
}

#if defined(__SIZEOF_INT128__)
using Wide = __int128;

inline double wide_to_double(Wide v) {
  // Most values fit 64 bits, whose conversion is one instruction.
  if (v >= std::numeric_limits<int64_t>::min() && v <= std::numeric_limits<int64_t>::max())
    return static_cast<double>(static_cast<int64_t>(v));
  return static_cast<double>(v);
}

// Integer frames: exact sums, z-score of output rows [r0, r1).
template <typename T>
bool zscore_rows_exact(const RegionJob& job, py::ssize_t r0, py::ssize_t r1) {
  // Squares of 8- and 16-bit values and their box sums fit 64 bits; of 32-bit ones, 128.
  using Square = std::conditional_t<(sizeof(T) <= 2), int64_t, Wide>;
  const py::ssize_t n_cols = job.fx1 - job.fx0;
  std::vector<int64_t> s1(n_cols, 0);
  std::vector<Square> s2(n_cols, 0);
  auto add = [&](py::ssize_t y, int sign) {
    for (py::ssize_t k = 0; k < n_cols; ++k) {
      const int64_t v = static_cast<int64_t>(raw_pixel<T>(job, y, job.fx0 + k));
      s1[k] += sign * v;
      s2[k] += sign * (static_cast<Square>(v) * v);
    }
  };
  auto emit = [&](py::ssize_t i, py::ssize_t j, py::ssize_t y, py::ssize_t x, py::ssize_t n,
                  int64_t h1, Square h2) {
    // n**2 times the variance, exactly; zero for a constant footprint.
    const Wide spread = static_cast<Wide>(n) * h2 - static_cast<Wide>(h1) * h1;
    if (spread <= 0) return write_pixel(job, i, j, 0.0);
    const double root = std::sqrt(wide_to_double(spread));  // n * sd
    // is_flat(sd, mean) with sd = root / n and mean = h1 / n.
    if (root <= kStdRelFloor * std::abs(static_cast<double>(h1)))
      return write_pixel(job, i, j, 0.0);
    const int64_t v = static_cast<int64_t>(raw_pixel<T>(job, y, x));
    write_pixel(job, i, j, static_cast<double>(static_cast<int64_t>(n) * v - h1) / root);
  };
  slide_boxes(job, r0, r1, s1, s2, add, emit);
  return true;
}
#endif

template <typename T>
bool normalize_rows(const RegionJob& job, py::ssize_t r0, py::ssize_t r1) {
  if (job.mode != Mode::kZScore) return range_rows<T>(job, r0, r1);
#if defined(__SIZEOF_INT128__)
  if constexpr (std::is_integral_v<T>) return zscore_rows_exact<T>(job, r0, r1);
#endif
  return zscore_rows_float<T>(job, r0, r1);
}

// Float z-score: checks that the footprint is finite (false if not) and sets the job's
// power-of-two scale and reference (the median of up to 64 x 64 sampled pixels).
template <typename T>
bool prepare_float(RegionJob& job, int n_threads) {
  const py::ssize_t rows = job.fy1 - job.fy0, cols = job.fx1 - job.fx0;
  n_threads = static_cast<int>(std::max<py::ssize_t>(1, std::min<py::ssize_t>(n_threads, rows)));
  std::vector<char> finite(n_threads, 1);
  std::vector<double> largest(n_threads, 0.0);
  auto work = [&](int t) noexcept {
    bool ok = true;
    double big = 0.0;
    for (py::ssize_t y = job.fy0 + rows * t / n_threads; y < job.fy0 + rows * (t + 1) / n_threads;
         ++y)
      for (py::ssize_t x = job.fx0; x < job.fx1; ++x) {
        const double v = pixel<T>(job, y, x);
        ok &= std::isfinite(v);
        big = std::max(big, std::abs(v));
      }
    finite[t] = ok;
    largest[t] = big;
  };
  run_on_threads(n_threads, work);
  if (!std::all_of(finite.begin(), finite.end(), [](char v) { return v != 0; })) return false;
  job.exponent = magnitude_exponent(*std::max_element(largest.begin(), largest.end()));
  job.factor = job.exponent >= -1000 ? std::ldexp(1.0, -job.exponent) : 0.0;
  job.reference = 0.0;
  const py::ssize_t ny = std::min<py::ssize_t>(rows, 64), nx = std::min<py::ssize_t>(cols, 64);
  std::vector<double> sample;
  sample.reserve(static_cast<size_t>(ny * nx));
  for (py::ssize_t a = 0; a < ny; ++a)
    for (py::ssize_t b = 0; b < nx; ++b)
      sample.push_back(shifted<T>(job, job.fy0 + a * rows / ny, job.fx0 + b * cols / nx));
  auto middle = sample.begin() + static_cast<std::ptrdiff_t>(sample.size() / 2);
  std::nth_element(sample.begin(), middle, sample.end());
  job.reference = *middle;
  return true;
}

template <typename T>
bool normalize_threads(RegionJob& job, int n_threads) {
  if constexpr (std::is_floating_point_v<T>) {
    if (job.mode == Mode::kZScore && !prepare_float<T>(job, n_threads)) return false;
  }
#if !defined(__SIZEOF_INT128__)
  if constexpr (std::is_integral_v<T>) {
    if (job.mode == Mode::kZScore) prepare_float<T>(job, n_threads);  // always finite
  }
#endif
  n_threads = static_cast<int>(std::max<py::ssize_t>(1, std::min<py::ssize_t>(n_threads, job.h)));
  std::vector<char> ok(n_threads, 1), failed(n_threads, 0);
  auto work = [&](int t) noexcept {
    try {
      ok[t] = normalize_rows<T>(job, job.h * t / n_threads, job.h * (t + 1) / n_threads);
    } catch (...) {
      failed[t] = 1;
    }
  };
  run_on_threads(n_threads, work);
  for (int t = 0; t < n_threads; ++t)
    if (failed[t]) throw std::bad_alloc();
  return std::all_of(ok.begin(), ok.end(), [](char v) { return v != 0; });
}

bool normalize_region_into(const py::buffer& frame, const py::buffer& out, py::ssize_t y0,
                           py::ssize_t x0, int box, const std::string& normalization,
                           int channels, double lo, double hi, int n_threads) {
  RegionJob job;
  job.mode = parse_mode(normalization);
  if (channels != 1 && channels != 3)
    throw py::value_error("channels must be 1 or 3, got " + std::to_string(channels));
  if (job.mode == Mode::kImageNet && channels != 3)
    throw py::value_error("'imagenet' normalization needs 3 channels, got " + std::to_string(channels));
  if (box < 2 || box % 2 || box > kMaxBox)
    throw py::value_error("box must be an even size from 2 to " + std::to_string(kMaxBox) +
                          ", got " + std::to_string(box));
  if (job.mode != Mode::kZScore &&
      (!std::isfinite(lo) || !std::isfinite(hi) || !(hi > lo) || !std::isfinite(hi - lo))) {
    std::ostringstream os;
    os << "value range must be finite with high > low, got (" << lo << ", " << hi << ")";
    throw py::value_error(os.str());
  }
  job.lo = lo, job.hi = hi, job.box = box, job.half = box / 2, job.channels = channels;
  py::buffer_info fi = frame.request();
  if (fi.ndim != 2) throw py::value_error("frame must be 2-D, got shape " + shape_str(fi));
  const std::string fdtype = dtype_name(fi);
  if (fdtype.empty() && !fi.format.empty() && (fi.format[0] == '>' || fi.format[0] == '!'))
    throw py::type_error("frame is big-endian (buffer format '" + fi.format +
                         "'); convert it to native byte order, e.g. "
                         "frame.astype(frame.dtype.newbyteorder('='))");
  if (fdtype.empty())
    throw py::type_error("frame dtype (buffer format '" + fi.format +
                         "') is not supported in native byte order; use uint8, uint16, int16, "
                         "int32, uint32, float32 or float64");
  job.frame = static_cast<const char*>(fi.ptr);
  job.height = fi.shape[0], job.width = fi.shape[1];
  job.stride_bytes_y = fi.strides[0], job.stride_bytes_x = fi.strides[1];
  py::buffer_info oi = out.request(true);
  if (dtype_name(oi) != "float32")  // "f", or "=f" as numpy writes unaligned buffers
    throw py::type_error("out must be a float32 buffer, got format '" + oi.format + "'");
  if (oi.ndim != 3 || oi.shape[0] != channels)
    throw py::value_error("out must have shape (" + std::to_string(channels) + ", h, w), got " +
                          shape_str(oi));
  job.h = oi.shape[1], job.w = oi.shape[2];
  if (oi.strides[2] != 4 || oi.strides[1] != 4 * job.w || oi.strides[0] != 4 * job.w * job.h)
    throw py::value_error("out must be C-contiguous");
  if (reinterpret_cast<std::uintptr_t>(oi.ptr) % alignof(float) != 0)
    throw py::value_error("out must be aligned to 4 bytes (np.empty gives such a buffer)");
  // Compared without adding to the origin: origins near 2**63 must not overflow.
  if (y0 < 0 || x0 < 0 || job.h < 1 || job.w < 1 || y0 > job.height - job.h ||
      x0 > job.width - job.w) {
    std::ostringstream os;
    os << "region at (" << y0 << ", " << x0 << ") of size (" << job.h << ", " << job.w
       << ") does not fit in the frame " << shape_str(fi);
    throw py::value_error(os.str());
  }
  job.y0 = y0, job.x0 = x0;
  // The footprint of pixel (y, x) is rows [y - half, y - half + box), columns alike.
  job.fy0 = std::max<py::ssize_t>(0, y0 - job.half);
  job.fy1 = std::min(job.height, y0 + job.h - 1 - job.half + job.box);
  job.fx0 = std::max<py::ssize_t>(0, x0 - job.half);
  job.fx1 = std::min(job.width, x0 + job.w - 1 - job.half + job.box);
  job.out = static_cast<float*>(oi.ptr);
  if (n_threads <= 0) n_threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  py::gil_scoped_release release;
  if (fdtype == "uint8") return normalize_threads<uint8_t>(job, n_threads);
  if (fdtype == "uint16") return normalize_threads<uint16_t>(job, n_threads);
  if (fdtype == "int16") return normalize_threads<int16_t>(job, n_threads);
  if (fdtype == "int32") return normalize_threads<int32_t>(job, n_threads);
  if (fdtype == "uint32") return normalize_threads<uint32_t>(job, n_threads);
  if (fdtype == "float32") return normalize_threads<float>(job, n_threads);
  return normalize_threads<double>(job, n_threads);
}

}  // namespace

PYBIND11_MODULE(_tiling, m) {
  m.doc() = "Zero-copy strided patch tiling and normalization (C++).";
  m.def("tile_into", &tile_into, py::arg("frame"), py::arg("out"), py::arg("origins"), py::arg("patch"),
        py::arg("normalization"), py::arg("channels"), py::arg("low"), py::arg("high"),
        py::arg("nan_policy"), py::arg("threads"),
        "Write normalized float32 NCHW patches of `frame` at `origins` into `out`; returns the count.");
  m.def("normalize_region_into", &normalize_region_into, py::arg("frame"), py::arg("out"),
        py::arg("y0"), py::arg("x0"), py::arg("box"), py::arg("normalization"), py::arg("channels"),
        py::arg("low"), py::arg("high"), py::arg("threads"),
        "Write the frame-consistent normalization of the region at (y0, x0) of `frame` into `out` "
        "(channels, h, w); False when the region's footprint holds a non-finite value.");
  m.attr("STD_RELATIVE_FLOOR") = kStdRelFloor;
  m.attr("STD_FLOOR") = kStdAbsFloor;
  m.attr("SUPPORTED_DTYPES") =
      py::make_tuple("uint8", "uint16", "int16", "int32", "uint32", "float32", "float64");
}
