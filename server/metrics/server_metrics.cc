#include "server/metrics/server_metrics.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <prometheus/collectable.h>
#include <prometheus/exposer.h>
#include <prometheus/text_serializer.h>
#include <sys/socket.h>
#include <unistd.h>

#include <exception>
#include <map>
#include <mutex>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "server/common/notification.h"

namespace sessionledger {

// Builds metric families from the registered read functions at each scrape.
class ServerMetrics::SampledCollectable final : public prometheus::Collectable {
 public:
  void Add(Sampled sampled) {
    std::lock_guard<std::mutex> lock(mutex_);
    sampled_.push_back(std::move(sampled));
  }

  std::vector<prometheus::MetricFamily> Collect() const override {
    std::lock_guard<std::mutex> lock(mutex_);
    // Several samples may share a name (one per label set): one family each name.
    std::map<std::string, prometheus::MetricFamily> families;
    for (const Sampled& s : sampled_) {
      prometheus::MetricFamily& family = families[s.name];
      family.name = s.name;
      family.help = s.help;
      family.type = s.is_counter ? prometheus::MetricType::Counter : prometheus::MetricType::Gauge;
      prometheus::ClientMetric metric;
      for (const auto& [k, v] : s.labels) metric.label.push_back({k, v});
      const double value = s.read();
      if (s.is_counter) {
        metric.counter.value = value;
      } else {
        metric.gauge.value = value;
      }
      family.metric.push_back(std::move(metric));
    }
    std::vector<prometheus::MetricFamily> out;
    for (auto& [name, family] : families) out.push_back(std::move(family));
    return out;
  }

 private:
  mutable std::mutex mutex_;
  std::vector<Sampled> sampled_;
};

namespace {

// Sub-millisecond for cache hits up to seconds for calls that wait on a slow backing service.
const prometheus::Histogram::BucketBoundaries& LatencyBuckets() {
  static const auto* const kBuckets = new prometheus::Histogram::BucketBoundaries{
      0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5};
  return *kBuckets;
}

}  // namespace

ServerMetrics::ServerMetrics()
    : registry_(std::make_shared<prometheus::Registry>()),
      sampled_(std::make_shared<SampledCollectable>()),
      requests_(prometheus::BuildCounter()
                    .Name("sessionledger_rpc_requests_total")
                    .Help("Finished RPCs by full method name and gRPC status code")
                    .Register(*registry_)),
      durations_(prometheus::BuildHistogram()
                     .Name("sessionledger_rpc_duration_seconds")
                     .Help("RPC latency as the server saw it, by full method name")
                     .Register(*registry_)),
      in_flight_(prometheus::BuildGauge()
                     .Name("sessionledger_rpc_in_flight")
                     .Help("RPCs received and not yet answered")
                     .Register(*registry_)
                     .Add({})) {}

ServerMetrics::~ServerMetrics() = default;

void ServerMetrics::RpcStarted() { in_flight_.Increment(); }

void ServerMetrics::RpcFinished(const std::string& method, absl::string_view code_name,
                                double seconds) {
  in_flight_.Decrement();
  prometheus::Counter* requests = nullptr;
  prometheus::Histogram* duration = nullptr;
  {
    std::lock_guard<std::mutex> lock(series_mutex_);
    MethodSeries& series = series_[method];
    if (series.duration == nullptr) {
      series.duration = &durations_.Add({{"method", method}}, LatencyBuckets());
    }
    duration = series.duration;
    for (const auto& [code, counter] : series.requests) {
      if (code == code_name) {
        requests = counter;
        break;
      }
    }
    if (requests == nullptr) {
      requests = &requests_.Add({{"method", method}, {"code", std::string(code_name)}});
      series.requests.emplace_back(std::string(code_name), requests);
    }
  }
  requests->Increment();
  duration->Observe(seconds);
}

void ServerMetrics::AddSampled(Sampled sampled) { sampled_->Add(std::move(sampled)); }

std::string ServerMetrics::RenderText() const {
  std::vector<prometheus::MetricFamily> families = registry_->Collect();
  std::vector<prometheus::MetricFamily> sampled = sampled_->Collect();
  families.insert(families.end(), sampled.begin(), sampled.end());
  return prometheus::TextSerializer().Serialize(families);
}

absl::StatusOr<std::unique_ptr<MetricsHttpServer>> MetricsHttpServer::Start(
    int port, const ServerMetrics& metrics) {
  std::unique_ptr<prometheus::Exposer> exposer;
  try {
    // civetweb's "num_threads": scrapes are rare; two threads keep the footprint small.
    exposer = std::make_unique<prometheus::Exposer>(absl::StrCat("0.0.0.0:", port),
                                                    /*num_threads=*/2);
  } catch (const std::exception& e) {
    return absl::UnavailableError(
        absl::StrCat("METRICS_PORT: cannot listen on port ", port, ": ", e.what()));
  }
  exposer->RegisterCollectable(metrics.registry());
  exposer->RegisterCollectable(metrics.sampled_);
  const std::vector<int> ports = exposer->GetListeningPorts();
  return std::unique_ptr<MetricsHttpServer>(
      new MetricsHttpServer(std::move(exposer), ports.empty() ? port : ports.front()));
}

MetricsHttpServer::MetricsHttpServer(std::unique_ptr<prometheus::Exposer> exposer, int port)
    : exposer_(std::move(exposer)), port_(port) {}

namespace {

// Opens and closes a TCP connection to 127.0.0.1:port, without waiting for it to be accepted.
void KnockOn(int port) {
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return;
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  address.sin_port = htons(static_cast<uint16_t>(port));
  connect(fd, reinterpret_cast<const sockaddr*>(&address), sizeof(address));
  close(fd);
}

}  // namespace

MetricsHttpServer::~MetricsHttpServer() {
  // civetweb's listening thread waits for connections in 2-second poll(2) slices and sees the
  // stop only between two of them, so a plain destruction kept every shutdown waiting up to
  // 2 s more (the full 2 s right after a scrape). A connection ends the slice: knock until the
  // stop, running on its own thread, is done.
  Notification stopped;
  std::thread stopper([this, &stopped] {
    exposer_.reset();
    stopped.Notify();
  });
  while (!stopped.WaitForNotificationWithTimeout(absl::Milliseconds(20))) KnockOn(port_);
  stopper.join();
}

}  // namespace sessionledger
