// Zero-copy strided patch tiling and normalization for defectscope.
//
// The frame is read in place through the buffer protocol (any strides, read-only
// views and np.memmap included) and float32 NCHW patches are written straight
// into a caller-provided buffer. Work is split over windows with std::thread
// while the GIL is released.
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
#include <vector>

namespace py = pybind11;

namespace {

enum class Mode { kZScore, kMinMax, kImageNet };
enum class NanPolicy { kRaise, kZero, kPropagate };

constexpr std::array<double, 3> kImageNetMean = {0.485, 0.456, 0.406};
constexpr std::array<double, 3> kImageNetStd = {0.229, 0.224, 0.225};
// Guards the z-score against flat (constant) patches, which map to zeros.
constexpr double kStdFloor = 1e-8;
// Above this magnitude a window is rescaled before its statistics (see process_range).
constexpr double kRescaleAbove = 1e100;

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
void normalize_with_nonfinite(const Job& job, const double* src, float* out) {
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
      scale = 1.0 / std::max(sd, kStdFloor);
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
        const T* r = reinterpret_cast<const T*>(row);
        for (int x = 0; x < p; ++x) dst[x] = static_cast<double>(r[x]);
      } else {
        for (int x = 0; x < p; ++x)
          dst[x] = static_cast<double>(*reinterpret_cast<const T*>(row + x * job.stride_bytes_x));
      }
    }
    float* out = job.out + w * job.channels * plane;
    if constexpr (std::is_floating_point_v<T>) {
      bool finite = true;
      double largest = 0.0;
      for (py::ssize_t i = 0; i < plane; ++i) {
        finite &= std::isfinite(src[i]);
        largest = std::max(largest, std::abs(src[i]));
      }
      if (!finite) {
        if (job.nan_policy == NanPolicy::kRaise) return w;
        normalize_with_nonfinite(job, src, out);
        continue;
      }
      // Sums of squares of values near 1e154 and above overflow a double. The z-score is
      // scale invariant, so such a window is divided by its largest magnitude first.
      if (job.mode == Mode::kZScore && largest > kRescaleAbove) {
        const double inverse = 1.0 / largest;
        for (py::ssize_t i = 0; i < plane; ++i) src[i] *= inverse;
      }
    }
    double offset = job.lo, scale = 1.0 / (job.hi - job.lo);
    if (job.mode == Mode::kZScore) {
      const double mean = sum4(src, plane) / static_cast<double>(plane);
      const double sd = std::sqrt(centered_ss4(src, plane, mean) / static_cast<double>(plane));
      offset = mean;
      scale = 1.0 / std::max(sd, kStdFloor);
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
  if (oi.format != py::format_descriptor<float>::format() || oi.itemsize != 4)
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
// mean and standard deviation of the box x box footprint around it (clipped at the
// frame's edges). Box sums slide along rows and columns: exact for integer frames up
// to 16 bits (every partial sum is an integer below 2**53), so a region normalized on
// its own equals the same pixels of the whole frame normalized at once.
struct RegionJob {
  const char* frame = nullptr;
  py::ssize_t height = 0, width = 0;
  py::ssize_t stride_bytes_y = 0, stride_bytes_x = 0;
  py::ssize_t y0 = 0, x0 = 0, h = 0, w = 0;
  py::ssize_t box = 64, half = 32;
  int channels = 1;
  Mode mode = Mode::kZScore;
  double lo = 0.0, hi = 1.0;
  float* out = nullptr;
};

template <typename T>
inline double pixel(const RegionJob& job, py::ssize_t y, py::ssize_t x) {
  return static_cast<double>(
      *reinterpret_cast<const T*>(job.frame + y * job.stride_bytes_y + x * job.stride_bytes_x));
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

// Normalizes output rows [r0, r1) of the region; returns false at a non-finite value
// or one too large to square (the dense path then gives way to the per-window one).
template <typename T>
bool normalize_rows(const RegionJob& job, py::ssize_t r0, py::ssize_t r1) {
  if (job.mode != Mode::kZScore) {
    const double scale = 1.0 / (job.hi - job.lo);
    for (py::ssize_t i = r0; i < r1; ++i)
      for (py::ssize_t j = 0; j < job.w; ++j) {
        const double v = pixel<T>(job, job.y0 + i, job.x0 + j);
        if (!std::isfinite(v)) return false;
        write_pixel(job, i, j, (v - job.lo) * scale);
      }
    return true;
  }
  // Box of pixel (y, x): rows [y - half, y - half + box) and the same for columns.
  const py::ssize_t c0 = std::max<py::ssize_t>(0, job.x0 - job.half);
  const py::ssize_t c1 = std::min(job.width, job.x0 + job.w - job.half + job.box);
  const py::ssize_t n_cols = c1 - c0;
  std::vector<double> s1(n_cols, 0.0), s2(n_cols, 0.0);
  auto add_row = [&](py::ssize_t y, double sign) -> bool {
    if (y < 0 || y >= job.height) return true;
    for (py::ssize_t k = 0; k < n_cols; ++k) {
      const double v = pixel<T>(job, y, c0 + k);
      if (!std::isfinite(v) || std::abs(v) > kRescaleAbove) return false;
      s1[k] += sign * v;
      s2[k] += sign * v * v;
    }
    return true;
  };
  const py::ssize_t first = job.y0 + r0 - job.half;
  for (py::ssize_t y = first; y < first + job.box; ++y)
    if (!add_row(y, 1.0)) return false;
  for (py::ssize_t i = r0; i < r1; ++i) {
    const py::ssize_t y = job.y0 + i;
    if (i > r0) {
      if (!add_row(y - job.half - 1, -1.0) || !add_row(y - job.half + job.box - 1, 1.0))
        return false;
    }
    const double rows = static_cast<double>(std::min(job.height, y - job.half + job.box) -
                                            std::max<py::ssize_t>(0, y - job.half));
    double h1 = 0.0, h2 = 0.0;
    py::ssize_t left = job.x0 - job.half, right = left + job.box;  // columns [left, right)
    for (py::ssize_t x = std::max<py::ssize_t>(0, left); x < std::min(job.width, right); ++x)
      h1 += s1[x - c0], h2 += s2[x - c0];
    for (py::ssize_t j = 0; j < job.w; ++j) {
      if (j > 0) {
        if (left >= 0) h1 -= s1[left - c0], h2 -= s2[left - c0];
        if (right < job.width) h1 += s1[right - c0], h2 += s2[right - c0];
        ++left, ++right;
      }
      const double n = rows * static_cast<double>(std::min(job.width, right) -
                                                   std::max<py::ssize_t>(0, left));
      const double mean = h1 / n;
      const double sd = std::sqrt(std::max(0.0, h2 / n - mean * mean));
      const double v = pixel<T>(job, y, job.x0 + j);
      write_pixel(job, i, j, sd > kStdFloor ? (v - mean) / sd : 0.0);
    }
  }
  return true;
}

template <typename T>
bool normalize_threads(const RegionJob& job, int n_threads) {
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
  if (box < 2 || box % 2) throw py::value_error("box must be an even size >= 2, got " + std::to_string(box));
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
  if (fdtype.empty())
    throw py::type_error("frame dtype (buffer format '" + fi.format +
                         "') is not supported in native byte order; use uint8, uint16, int16, "
                         "int32, uint32, float32 or float64");
  job.frame = static_cast<const char*>(fi.ptr);
  job.height = fi.shape[0], job.width = fi.shape[1];
  job.stride_bytes_y = fi.strides[0], job.stride_bytes_x = fi.strides[1];
  py::buffer_info oi = out.request(true);
  if (oi.format != py::format_descriptor<float>::format() || oi.itemsize != 4)
    throw py::type_error("out must be a float32 buffer, got format '" + oi.format + "'");
  if (oi.ndim != 3 || oi.shape[0] != channels)
    throw py::value_error("out must have shape (" + std::to_string(channels) + ", h, w), got " +
                          shape_str(oi));
  job.h = oi.shape[1], job.w = oi.shape[2];
  if (oi.strides[2] != 4 || oi.strides[1] != 4 * job.w || oi.strides[0] != 4 * job.w * job.h)
    throw py::value_error("out must be C-contiguous");
  // Compared without adding to the origin: origins near 2**63 must not overflow.
  if (y0 < 0 || x0 < 0 || job.h < 1 || job.w < 1 || y0 > job.height - job.h ||
      x0 > job.width - job.w) {
    std::ostringstream os;
    os << "region at (" << y0 << ", " << x0 << ") of size (" << job.h << ", " << job.w
       << ") does not fit in the frame " << shape_str(fi);
    throw py::value_error(os.str());
  }
  job.y0 = y0, job.x0 = x0;
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
        "(channels, h, w); False when the region's footprint holds a non-finite or too large value.");
  m.attr("SUPPORTED_DTYPES") =
      py::make_tuple("uint8", "uint16", "int16", "int32", "uint32", "float32", "float64");
}
