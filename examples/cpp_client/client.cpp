// Minimal C++ client of `defectscope serve`: ping, info, then ROIs of a frame.
//
//   defectscope_client tcp://127.0.0.1:5555 [FRAME.u16 HEIGHT WIDTH]
//
// Without a raw uint16 file it sends a synthetic 256x256 lattice with one vacancy.
// Exit code 0 when every reply is ok and echoes its request id.
#include <chrono>
#include <cmath>
#include <cstdint>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>
#include <zmq.hpp>

using json = nlohmann::json;

namespace {

std::vector<uint16_t> synthetic_lattice(int height, int width) {
  std::vector<uint16_t> frame(static_cast<size_t>(height) * width);
  const double spacing = 8.0, sigma = 1.5;
  for (int y = 0; y < height; ++y) {
    for (int x = 0; x < width; ++x) {
      double v = 0.0;
      const int iy = static_cast<int>(y / spacing), ix = static_cast<int>(x / spacing);
      for (int i = iy - 1; i <= iy + 1; ++i) {
        for (int j = ix - 1; j <= ix + 1; ++j) {
          if (i == 12 && j == 12) continue;  // the vacancy
          const double cy = (i + 0.5) * spacing, cx = (j + 0.5) * spacing;
          v += std::exp(-((y - cy) * (y - cy) + (x - cx) * (x - cx)) / (2 * sigma * sigma));
        }
      }
      frame[static_cast<size_t>(y) * width + x] = static_cast<uint16_t>(1000 + 20000 * v);
    }
  }
  return frame;
}

json request(zmq::socket_t& socket, const json& header, const void* data = nullptr,
             size_t bytes = 0) {
  const std::string text = header.dump();
  if (data != nullptr) {
    socket.send(zmq::buffer(text), zmq::send_flags::sndmore);
    socket.send(zmq::const_buffer(data, bytes), zmq::send_flags::none);
  } else {
    socket.send(zmq::buffer(text), zmq::send_flags::none);
  }
  zmq::message_t reply;
  if (!socket.recv(reply, zmq::recv_flags::none)) throw std::runtime_error("no reply (timeout)");
  json parsed = json::parse(reply.to_string());
  if (parsed.value("id", json()) != header["id"]) throw std::runtime_error("reply id mismatch");
  if (!parsed.value("ok", false))
    throw std::runtime_error("service error: " + parsed.value("error", std::string("?")));
  return parsed;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string endpoint = argc > 1 ? argv[1] : "tcp://127.0.0.1:5555";
  int height = 256, width = 256;
  std::vector<uint16_t> frame;
  if (argc > 4) {
    height = std::stoi(argv[3]);
    width = std::stoi(argv[4]);
    frame.resize(static_cast<size_t>(height) * width);
    std::ifstream in(argv[2], std::ios::binary);
    if (!in.read(reinterpret_cast<char*>(frame.data()), frame.size() * sizeof(uint16_t))) {
      std::cerr << "error: cannot read " << height << "x" << width << " uint16 from " << argv[2]
                << "\n";
      return 2;
    }
  } else {
    frame = synthetic_lattice(height, width);
  }
  try {
    zmq::context_t context;
    zmq::socket_t socket(context, zmq::socket_type::req);
    socket.set(zmq::sockopt::rcvtimeo, 120000);
    socket.set(zmq::sockopt::linger, 0);
    socket.connect(endpoint);
    request(socket, {{"op", "ping"}, {"id", 1}});
    const json info = request(socket, {{"op", "info"}, {"id", 2}});
    std::cout << "classes: " << info["classes"].dump() << ", backend " << info["backend"] << "\n";
    const auto start = std::chrono::steady_clock::now();
    const json header = {{"op", "rois"},        {"id", "cpp-3"},      {"dtype", "uint16"},
                         {"shape", {height, width}}, {"pixel_size", 0.02}, {"unit", "nm"},
                         {"stride", 16},          {"top", 3}};
    const json reply = request(socket, header, frame.data(), frame.size() * sizeof(uint16_t));
    const double ms = std::chrono::duration<double, std::milli>(
                          std::chrono::steady_clock::now() - start).count();
    std::cout << "regions: " << reply["regions"].size() << ", rois: " << reply["rois"].size()
              << ", round trip " << ms << " ms\n";
    for (const auto& roi : reply["rois"]) {
      std::cout << "  rank " << roi["rank"] << " " << roi["label"] << " score " << roi["score"]
                << " center_norm (y, x) " << roi["center_norm"].dump() << "\n";
    }
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
