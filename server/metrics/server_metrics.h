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
#include <unordered_map>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace prometheus {
class Exposer;
}

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
  friend class MetricsHttpServer;
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

// Serves GET /metrics on 0.0.0.0:port (civetweb, inside prometheus-cpp-pull). Stops on
// destruction.
class MetricsHttpServer {
 public:
  // UNAVAILABLE when the port cannot be bound (the library's exception does not escape).
  static absl::StatusOr<std::unique_ptr<MetricsHttpServer>> Start(int port,
                                                                  const ServerMetrics& metrics);
  ~MetricsHttpServer();
  int port() const { return port_; }

 private:
  MetricsHttpServer(std::unique_ptr<prometheus::Exposer> exposer, int port);
  std::unique_ptr<prometheus::Exposer> exposer_;
  int port_;
};

}  // namespace sessionledger

#endif  // SESSIONLEDGER_SERVER_METRICS_SERVER_METRICS_H_
