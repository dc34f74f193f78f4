#include "server/rpc/health.h"

#include "absl/time/clock.h"
#include "server/common/thread_name.h"

namespace sessionledger {

using grpc::health::v1::HealthCheckRequest;
using grpc::health::v1::HealthCheckResponse;

HealthBoard::HealthBoard() {
  // NOT_SERVING until the first probe says otherwise.
  statuses_[""] = HealthCheckResponse::SERVING;
  statuses_[kSessionServiceName] = HealthCheckResponse::NOT_SERVING;
  statuses_[kTransactionServiceName] = HealthCheckResponse::NOT_SERVING;
}

void HealthBoard::Set(const std::string& service, bool serving) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (shutting_down_) return;
  const ServingStatus next =
      serving ? HealthCheckResponse::SERVING : HealthCheckResponse::NOT_SERVING;
  ServingStatus& current = statuses_[service];
  if (current != next) {
    current = next;
    changed_.notify_all();
  }
}

std::optional<HealthBoard::ServingStatus> HealthBoard::Get(const std::string& service) const {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = statuses_.find(service);
  if (it == statuses_.end()) return std::nullopt;
  return it->second;
}

void HealthBoard::Shutdown() {
  std::lock_guard<std::mutex> lock(mutex_);
  shutting_down_ = true;
  for (auto& [name, status] : statuses_) status = HealthCheckResponse::NOT_SERVING;
  changed_.notify_all();
}

bool HealthBoard::shutting_down() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return shutting_down_;
}

std::optional<HealthBoard::ServingStatus> HealthBoard::WaitForChange(const std::string& service,
                                                                     ServingStatus last,
                                                                     absl::Duration timeout) const {
  std::unique_lock<std::mutex> lock(mutex_);
  // A service the board does not know reads as SERVICE_UNKNOWN, as Watch reports it: with an
  // unknown name counted as a change, a Watch of a misspelt name spun on a core.
  changed_.wait_for(lock, absl::ToChronoNanoseconds(timeout), [&] {
    auto it = statuses_.find(service);
    const ServingStatus now =
        it == statuses_.end() ? HealthCheckResponse::SERVICE_UNKNOWN : it->second;
    return shutting_down_ || now != last;
  });
  auto it = statuses_.find(service);
  if (it == statuses_.end()) return std::nullopt;
  return it->second;
}

grpc::Status HealthService::Check(grpc::ServerContext*, const HealthCheckRequest* request,
                                  HealthCheckResponse* response) {
  std::optional<HealthBoard::ServingStatus> status = board_.Get(request->service());
  if (!status.has_value()) {
    return grpc::Status(grpc::StatusCode::NOT_FOUND,
                        "service: unknown service name '" + request->service() + "'");
  }
  response->set_status(*status);
  return grpc::Status::OK;
}

grpc::Status HealthService::Watch(grpc::ServerContext* context, const HealthCheckRequest* request,
                                  grpc::ServerWriter<HealthCheckResponse>* writer) {
  std::optional<HealthBoard::ServingStatus> status = board_.Get(request->service());
  HealthCheckResponse response;
  response.set_status(status.value_or(HealthCheckResponse::SERVICE_UNKNOWN));
  if (!writer->Write(response)) return grpc::Status::OK;
  while (!context->IsCancelled() && !board_.shutting_down()) {
    // Wake up now and then to notice a cancelled stream.
    std::optional<HealthBoard::ServingStatus> next =
        board_.WaitForChange(request->service(), response.status(), absl::Seconds(1));
    const auto next_status = next.value_or(HealthCheckResponse::SERVICE_UNKNOWN);
    if (next_status == response.status()) continue;
    response.set_status(next_status);
    if (!writer->Write(response)) break;
  }
  // A stream that outlives shutdown would hold the drain for the whole grace period; it ends
  // with NOT_SERVING sent, and the client reconnects elsewhere.
  if (board_.shutting_down() && response.status() != HealthCheckResponse::NOT_SERVING) {
    response.set_status(HealthCheckResponse::NOT_SERVING);
    writer->Write(response);
  }
  return grpc::Status::OK;
}

HealthMonitor::HealthMonitor(HealthBoard& board, Probes probes, absl::Duration interval,
                             Logger& logger)
    : board_(board), probes_(std::move(probes)), interval_(interval), logger_(logger) {
  thread_ = std::thread([this] {
    NameThisThread("sl-health-probe");
    Run();
  });
}

HealthMonitor::~HealthMonitor() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_ = true;
  }
  stop_cv_.notify_all();
  thread_.join();
}

void HealthMonitor::ProbeOnce() {
  const bool memcached_ok = probes_.memcached_ok();
  const bool postgres_ok = probes_.postgres_ok();
  board_.Set(kSessionServiceName, memcached_ok);
  board_.Set(kTransactionServiceName, memcached_ok && postgres_ok);
  std::lock_guard<std::mutex> lock(mutex_);
  if (memcached_ok != last_memcached_ok_) {
    logger_.Log(memcached_ok ? LogLevel::kInfo : LogLevel::kWarn,
                memcached_ok ? "memcached reachable again" : "memcached unreachable");
    last_memcached_ok_ = memcached_ok;
  }
  if (postgres_ok != last_postgres_ok_) {
    logger_.Log(postgres_ok ? LogLevel::kInfo : LogLevel::kWarn,
                postgres_ok ? "postgres reachable again" : "postgres unreachable");
    last_postgres_ok_ = postgres_ok;
  }
}

void HealthMonitor::Run() {
  std::unique_lock<std::mutex> lock(mutex_);
  while (!stop_) {
    stop_cv_.wait_for(lock, absl::ToChronoMilliseconds(interval_), [this] { return stop_; });
    if (stop_) break;
    lock.unlock();
    ProbeOnce();
    lock.lock();
  }
}

}  // namespace sessionledger
