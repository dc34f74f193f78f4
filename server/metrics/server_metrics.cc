#include "server/metrics/server_metrics.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <prometheus/collectable.h>
#include <prometheus/text_serializer.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <map>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/time.h"
#include "server/common/clock.h"
#include "server/common/thread_name.h"

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

namespace {

// Connections are served one at a time. A scrape's request is a few hundred bytes sent at
// once, so a client that has not sent all of it within a second (or never) is dropped: a few
// such connections cannot hold up a scrape past Prometheus's 10 s timeout. The answer may take
// longer to go out to a slow reader.
constexpr absl::Duration kMetricsRequestTimeout = absl::Seconds(1);
constexpr absl::Duration kMetricsAnswerTimeout = absl::Seconds(5);
// After an accept that failed for want of descriptors or memory: the connection stays queued,
// so accepting again at once would spin on a core until one is free.
constexpr absl::Duration kAcceptRetryPause = absl::Milliseconds(100);
// A scrape's request is a request line and a few headers.
constexpr size_t kMaxRequestBytes = 8192;

// Waits until `fd` is ready for `events` or `stop_fd` is signalled, until `give_up` (none: no
// end). 1: ready; 0: timed out (or failed); -1: stopping. On the steady clock, as every timeout
// kept inside the process: a wall-clock step back would stretch a silent client's second.
int WaitFor(int fd, short events, int stop_fd, std::optional<SteadyTime> give_up) {
  for (;;) {
    int timeout_ms = -1;  // No end: waiting for the next connection.
    if (give_up.has_value()) {
      const int64_t ms =
          std::chrono::ceil<std::chrono::milliseconds>(*give_up - SteadyNow()).count();
      if (ms <= 0) return 0;
      timeout_ms = static_cast<int>(std::min<int64_t>(ms, INT32_MAX));
    }
    pollfd fds[2] = {{fd, events, 0}, {stop_fd, POLLIN, 0}};
    const int ready = poll(fds, 2, timeout_ms);
    if (ready < 0 && errno != EINTR) return 0;
    if (ready <= 0) continue;
    if (fds[1].revents != 0) return -1;
    if (fds[0].revents != 0) return 1;
  }
}

std::string Response(absl::string_view status, absl::string_view content_type,
                     absl::string_view body, bool with_body) {
  return absl::StrCat("HTTP/1.1 ", status, "\r\nContent-Type: ", content_type,
                      "\r\nContent-Length: ", body.size(), "\r\nConnection: close\r\n\r\n",
                      with_body ? body : "");
}

// A listening TCP socket on every address: [::] with IPV6_V6ONLY off takes IPv4 too, as gRPC's
// does; where the kernel has no IPv6, 0.0.0.0. -1 with errno set when it cannot listen.
int ListenOnEveryAddress(int port) {
  int family = AF_INET6;
  int fd = socket(family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd >= 0) {
    const int off = 0;
    setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &off, sizeof off);
  } else if (errno == EAFNOSUPPORT) {
    family = AF_INET;
    fd = socket(family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  }
  if (fd < 0) return -1;
  // A restarted server takes its port back while the old connections sit in TIME_WAIT.
  const int on = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &on, sizeof on);
  sockaddr_in6 any6{};
  any6.sin6_family = AF_INET6;
  any6.sin6_addr = in6addr_any;
  any6.sin6_port = htons(static_cast<uint16_t>(port));
  sockaddr_in any4{};
  any4.sin_family = AF_INET;
  any4.sin_addr.s_addr = htonl(INADDR_ANY);
  any4.sin_port = htons(static_cast<uint16_t>(port));
  const int bound = family == AF_INET6
                        ? bind(fd, reinterpret_cast<const sockaddr*>(&any6), sizeof any6)
                        : bind(fd, reinterpret_cast<const sockaddr*>(&any4), sizeof any4);
  if (bound != 0 || listen(fd, 16) != 0) {
    const int err = errno;
    close(fd);
    errno = err;
    return -1;
  }
  return fd;
}

int BoundPort(int fd) {
  sockaddr_storage address{};
  socklen_t length = sizeof address;
  if (getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length) != 0) return 0;
  if (address.ss_family == AF_INET6) {
    return ntohs(reinterpret_cast<const sockaddr_in6*>(&address)->sin6_port);
  }
  return ntohs(reinterpret_cast<const sockaddr_in*>(&address)->sin_port);
}

}  // namespace

absl::StatusOr<std::unique_ptr<MetricsHttpServer>> MetricsHttpServer::Start(
    int port, const ServerMetrics& metrics) {
  const int listen_fd = ListenOnEveryAddress(port);
  if (listen_fd < 0) {
    return absl::UnavailableError(
        absl::StrCat("METRICS_PORT: cannot listen on port ", port, ": ", std::strerror(errno)));
  }
  const int stop_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (stop_fd < 0) {
    const int err = errno;
    close(listen_fd);
    return absl::InternalError(absl::StrCat("metrics: eventfd: ", std::strerror(err)));
  }
  return std::unique_ptr<MetricsHttpServer>(
      new MetricsHttpServer(metrics, listen_fd, stop_fd, BoundPort(listen_fd)));
}

MetricsHttpServer::MetricsHttpServer(const ServerMetrics& metrics, int listen_fd, int stop_fd,
                                     int port)
    : metrics_(metrics), listen_fd_(listen_fd), stop_fd_(stop_fd), port_(port) {
  thread_ = std::thread([this] {
    NameThisThread("sl-metrics-http");
    Run();
  });
}

MetricsHttpServer::~MetricsHttpServer() {
  const uint64_t one = 1;
  (void)!write(stop_fd_, &one, sizeof one);
  thread_.join();
  close(listen_fd_);
  close(stop_fd_);
}

void MetricsHttpServer::Run() {
  for (;;) {
    const int ready = WaitFor(listen_fd_, POLLIN, stop_fd_, std::nullopt);
    if (ready < 0) return;
    const int fd = accept4(listen_fd_, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
        // The stop still ends the pause at once.
        const SteadyTime pause_end = SteadyNow() + ToSteadyDuration(kAcceptRetryPause);
        if (WaitFor(stop_fd_, POLLIN, stop_fd_, pause_end) < 0) return;
      }
      continue;  // Otherwise it went away before we took it.
    }
    const bool go_on = Serve(fd);
    close(fd);
    if (!go_on) return;
  }
}

bool MetricsHttpServer::Serve(int fd) {
  const SteadyTime accepted = SteadyNow();
  const SteadyTime give_up = accepted + ToSteadyDuration(kMetricsRequestTimeout);
  std::string request;
  char buffer[2048];
  while (request.find("\r\n\r\n") == std::string::npos &&
         request.find("\n\n") == std::string::npos) {
    if (request.size() > kMaxRequestBytes) return true;
    const int ready = WaitFor(fd, POLLIN, stop_fd_, give_up);
    if (ready <= 0) return ready == 0;
    const ssize_t n = read(fd, buffer, sizeof buffer);
    if (n == 0) return true;
    if (n < 0) {
      if (errno == EAGAIN || errno == EINTR) continue;
      return true;
    }
    request.append(buffer, static_cast<size_t>(n));
  }
  // "GET /metrics?x=y HTTP/1.1": the method and the path are all that is read.
  const absl::string_view line =
      absl::string_view(request).substr(0, request.find_first_of("\r\n"));
  const std::vector<absl::string_view> parts = absl::StrSplit(line, ' ');
  std::string answer;
  if (parts.size() != 3 || !absl::StartsWith(parts[2], "HTTP/1.")) {
    answer = Response("400 Bad Request", "text/plain", "bad request\n", true);
  } else if (parts[0] != "GET" && parts[0] != "HEAD") {
    answer = Response("405 Method Not Allowed", "text/plain", "only GET\n", true);
  } else if (parts[1].substr(0, parts[1].find('?')) != "/metrics") {
    answer = Response("404 Not Found", "text/plain", "see /metrics\n", parts[0] == "GET");
  } else {
    answer = Response("200 OK", "text/plain; version=0.0.4; charset=utf-8", metrics_.RenderText(),
                      parts[0] == "GET");
  }
  size_t sent = 0;
  while (sent < answer.size()) {
    const ssize_t n = send(fd, answer.data() + sent, answer.size() - sent, MSG_NOSIGNAL);
    if (n > 0) {
      sent += static_cast<size_t>(n);
      continue;
    }
    if (n < 0 && errno != EAGAIN && errno != EINTR) return true;
    const int ready =
        WaitFor(fd, POLLOUT, stop_fd_, accepted + ToSteadyDuration(kMetricsAnswerTimeout));
    if (ready <= 0) return ready == 0;
  }
  return true;
}

}  // namespace sessionledger
