#ifndef SESSIONLEDGER_SERVER_METRICS_SERVER_METRICS_H_
#define SESSIONLEDGER_SERVER_METRICS_SERVER_METRICS_H_

#include <prometheus/counter.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace sessionledger {

// The process's Prometheus metrics (prometheus-cpp, Debian's prometheus-cpp-dev).
// Thread-safe. Metrics describe this process only; they are never read back to serve requests.
//
//   sessionledger_rpc_requests_total{method,code}     counter
//   sessionledger_rpc_duration_seconds{method}         histogram
//   sessionledger_rpc_in_flight                        gauge
//   plus sampled values registered with AddSampled (pool sizes, waits, store errors, retries),
//   read at scrape time.
class ServerMetrics {
 public:
  ServerMetrics();
  ~ServerMetrics();
  ServerMetrics(const ServerMetrics&) = delete;
  ServerMetrics& operator=(const ServerMetrics&) = delete;

  void RpcStarted();
  void RpcFinished(const std::string& method, absl::string_view code_name, double seconds);

  // A value read when Prometheus scrapes, e.g. a pool's open connections.
  struct Sampled {
    std::string name;
    std::string help;
    bool is_counter = false;  // Otherwise a gauge.
    std::vector<std::pair<std::string, std::string>> labels;
    std::function<double()> read;
  };
  // Call before serving; not concurrently with scrapes.
  void AddSampled(Sampled sampled);

  // The whole registry in Prometheus text format (what /metrics serves).
  std::string RenderText() const;

  std::shared_ptr<prometheus::Registry> registry() const { return registry_; }

 private:
  class SampledCollectable;

  // One method's series, looked up once. prometheus-cpp's Family::Add builds the label set, and
  // for a histogram a whole histogram, every time before it finds the one that exists: a dozen
  // allocations per call.
  struct MethodSeries {
    prometheus::Histogram* duration = nullptr;
    // By status code name; a method sees a handful of codes.
    std::vector<std::pair<std::string, prometheus::Counter*>> requests;
  };

  std::shared_ptr<prometheus::Registry> registry_;
  std::shared_ptr<SampledCollectable> sampled_;
  prometheus::Family<prometheus::Counter>& requests_;
  prometheus::Family<prometheus::Histogram>& durations_;
  prometheus::Gauge& in_flight_;
  std::mutex series_mutex_;
  std::unordered_map<std::string, MethodSeries> series_;  // Guarded by series_mutex_.
};

// Serves GET /metrics (ServerMetrics::RenderText) over HTTP/1.x on `port` of the address the
// gRPC port listens on (LISTEN_ADDRESS): with the default [::], every local IPv6 and IPv4
// address. (Not prometheus-cpp's Exposer: Debian 12 builds its civetweb without IPv6, so it
// could listen on IPv4 only, and a scraper that reaches pods over IPv6 found nothing.) One
// thread, "sl-metrics-http", answers one connection at a time, then closes it; scrapes come
// seconds apart. A connection gets a second to send its request and five to take the answer.
// Stops on destruction, at once, even in the middle of a connection.
class MetricsHttpServer {
 public:
  // `listen_address` as ParseListenAddress (server/config/config.h) writes it: "[::]", an IPv4
  // literal, a bracketed IPv6 literal, or "localhost" (127.0.0.1, and ::1 where the kernel has
  // IPv6). UNAVAILABLE when the port cannot be bound there. Port 0 picks a free one (port()).
  static absl::StatusOr<std::unique_ptr<MetricsHttpServer>> Start(absl::string_view listen_address,
                                                                  int port,
                                                                  const ServerMetrics& metrics);
  ~MetricsHttpServer();
  MetricsHttpServer(const MetricsHttpServer&) = delete;
  MetricsHttpServer& operator=(const MetricsHttpServer&) = delete;
  int port() const { return port_; }

 private:
  MetricsHttpServer(const ServerMetrics& metrics, std::vector<int> listen_fds, int stop_fd,
                    int port);
  void Run();
  // Reads one request from `fd` and answers it; false when the server is stopping.
  bool Serve(int fd);

  const ServerMetrics& metrics_;
  const std::vector<int> listen_fds_;  // One, or two for localhost (127.0.0.1 and ::1).
  const int stop_fd_;                  // An eventfd, signalled by the destructor.
  const int port_;
  std::thread thread_;
};

}  // namespace sessionledger

#endif  // SESSIONLEDGER_SERVER_METRICS_SERVER_METRICS_H_
