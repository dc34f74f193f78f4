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
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
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

// A listening TCP socket on `address`; an IPv6 one with IPV6_V6ONLY off, so that [::] takes
// IPv4 too, as gRPC's does. -1 with errno set when it cannot listen.
int ListenOn(const sockaddr* address, socklen_t length) {
  const int fd = socket(address->sa_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  if (address->sa_family == AF_INET6) {
    const int off = 0;
    setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &off, sizeof off);
  }
  // A restarted server takes its port back while the old connections sit in TIME_WAIT.
  const int on = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &on, sizeof on);
  if (bind(fd, address, length) != 0 || listen(fd, 16) != 0) {
    const int err = errno;
    close(fd);
    errno = err;
    return -1;
  }
  return fd;
}

int ListenOnIpv4(const in_addr& host, int port) {
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr = host;
  address.sin_port = htons(static_cast<uint16_t>(port));
  return ListenOn(reinterpret_cast<const sockaddr*>(&address), sizeof address);
}

int ListenOnIpv6(const in6_addr& host, int port) {
  sockaddr_in6 address{};
  address.sin6_family = AF_INET6;
  address.sin6_addr = host;
  address.sin6_port = htons(static_cast<uint16_t>(port));
  return ListenOn(reinterpret_cast<const sockaddr*>(&address), sizeof address);
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

// The listening sockets for `listen_address` (LISTEN_ADDRESS as ParseListenAddress in
// server/config/config.h writes it), as gRPC listens there: [::] is every IPv6 and IPv4 address
// (0.0.0.0 where the kernel has no IPv6); localhost is 127.0.0.1 and, where the kernel has
// IPv6, ::1 on the same port; an IPv4 literal or a bracketed IPv6 one is that address alone.
// Empty with errno set when it cannot listen (EINVAL: not such an address).
std::vector<int> ListenOnAddress(absl::string_view listen_address, int port) {
  if (listen_address == "[::]") {
    const int fd = ListenOnIpv6(in6addr_any, port);
    if (fd >= 0) return {fd};
    if (errno != EAFNOSUPPORT) return {};
    in_addr any{};
    any.s_addr = htonl(INADDR_ANY);
    const int v4 = ListenOnIpv4(any, port);
    if (v4 < 0) return {};
    return {v4};
  }
  if (listen_address == "localhost") {
    in_addr loopback{};
    loopback.s_addr = htonl(INADDR_LOOPBACK);
    const int v4 = ListenOnIpv4(loopback, port);
    if (v4 < 0) return {};
    const int v6 = ListenOnIpv6(in6addr_loopback, BoundPort(v4));
    if (v6 >= 0) return {v4, v6};
    // No IPv6 in this kernel, or no ::1 on its loopback: 127.0.0.1 alone, as gRPC then does.
    if (errno == EAFNOSUPPORT || errno == EADDRNOTAVAIL) return {v4};
    const int err = errno;
    close(v4);
    errno = err;
    return {};
  }
  absl::string_view host = listen_address;
  const bool bracketed = absl::ConsumePrefix(&host, "[") && absl::ConsumeSuffix(&host, "]");
  const std::string literal(host);
  int fd = -1;
  in_addr v4{};
  in6_addr v6{};
  if (!bracketed && inet_pton(AF_INET, literal.c_str(), &v4) == 1) {
    fd = ListenOnIpv4(v4, port);
  } else if (bracketed && inet_pton(AF_INET6, literal.c_str(), &v6) == 1) {
    fd = ListenOnIpv6(v6, port);
  } else {
    errno = EINVAL;
  }
  if (fd < 0) return {};
  return {fd};
}

}  // namespace

absl::StatusOr<std::unique_ptr<MetricsHttpServer>> MetricsHttpServer::Start(
    absl::string_view listen_address, int port, const ServerMetrics& metrics) {
  std::vector<int> listen_fds = ListenOnAddress(listen_address, port);
  if (listen_fds.empty()) {
    return absl::UnavailableError(absl::StrCat("METRICS_PORT: cannot listen on port ", port,
                                               " of LISTEN_ADDRESS ", listen_address, ": ",
                                               std::strerror(errno)));
  }
  const int stop_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (stop_fd < 0) {
    const int err = errno;
    for (const int fd : listen_fds) close(fd);
    return absl::InternalError(absl::StrCat("metrics: eventfd: ", std::strerror(err)));
  }
  const int bound_port = BoundPort(listen_fds.front());
  return std::unique_ptr<MetricsHttpServer>(
      new MetricsHttpServer(metrics, std::move(listen_fds), stop_fd, bound_port));
}

MetricsHttpServer::MetricsHttpServer(const ServerMetrics& metrics, std::vector<int> listen_fds,
                                     int stop_fd, int port)
    : metrics_(metrics), listen_fds_(std::move(listen_fds)), stop_fd_(stop_fd), port_(port) {
  thread_ = std::thread([this] {
    NameThisThread("sl-metrics-http");
    Run();
  });
}

MetricsHttpServer::~MetricsHttpServer() {
  const uint64_t one = 1;
  (void)!write(stop_fd_, &one, sizeof one);
  thread_.join();
  for (const int fd : listen_fds_) close(fd);
  close(stop_fd_);
}

void MetricsHttpServer::Run() {
  // The listening sockets, then the stop.
  std::vector<pollfd> waiting;
  for (const int fd : listen_fds_) waiting.push_back({fd, POLLIN, 0});
  waiting.push_back({stop_fd_, POLLIN, 0});
  for (;;) {
    for (pollfd& p : waiting) p.revents = 0;
    if (poll(waiting.data(), static_cast<nfds_t>(waiting.size()), -1) <= 0) continue;
    if (waiting.back().revents != 0) return;
    for (size_t i = 0; i + 1 < waiting.size(); ++i) {
      if (waiting[i].revents == 0) continue;
      const int fd = accept4(waiting[i].fd, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
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
