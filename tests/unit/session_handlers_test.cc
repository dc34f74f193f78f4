#include "server/rpc/session_handlers.h"

#include <google/protobuf/util/message_differencer.h>

#include "gtest/gtest.h"

namespace sessionledger {
namespace {

storage::v1::StoredSession SampleStored() {
  storage::v1::StoredSession stored;
  stored.set_session_id("Zm9vYmFyYmF6cXV4cXV1eA");
  stored.set_user_id("a-user-id-longer-than-the-small-string-buffer");
  stored.set_created_at_unix_micros(1'700'000'000'123'456);
  stored.set_expires_at_unix_micros(1'700'000'900'000'001);
  stored.set_absolute_expires_at_unix_micros(1'700'086'400'999'999);
  stored.set_ttl_seconds(900);
  stored.set_version(7);
  (*stored.mutable_attributes())["role"] = "admin";
  (*stored.mutable_attributes())["device"] = std::string(100, 'd');
  return stored;
}

TEST(ToApiSessionTest, CopiesEveryField) {
  const storage::v1::StoredSession stored = SampleStored();
  v1::Session api;
  ToApiSession(stored, &api);
  EXPECT_EQ(api.session_id(), "Zm9vYmFyYmF6cXV4cXV1eA");
  EXPECT_EQ(api.user_id(), "a-user-id-longer-than-the-small-string-buffer");
  EXPECT_EQ(api.created_at().seconds(), 1'700'000'000);
  EXPECT_EQ(api.created_at().nanos(), 123'456'000);
  EXPECT_EQ(api.expires_at().seconds(), 1'700'000'900);
  EXPECT_EQ(api.expires_at().nanos(), 1'000);
  EXPECT_EQ(api.absolute_expires_at().seconds(), 1'700'086'400);
  EXPECT_EQ(api.absolute_expires_at().nanos(), 999'999'000);
  EXPECT_EQ(api.ttl_seconds(), 900);
  EXPECT_EQ(api.version(), 7);
  ASSERT_EQ(api.attributes().size(), 2u);
  EXPECT_EQ(api.attributes().at("role"), "admin");
  EXPECT_EQ(api.attributes().at("device"), std::string(100, 'd'));
  EXPECT_TRUE(api.token().empty());
}

// Before the epoch (only a corrupt or forged stored value gets there) the nanos must stay
// non-negative: a Timestamp with negative nanos is invalid, and JSON clients refuse the answer.
TEST(ToApiSessionTest, TimesBeforeTheEpochAreValidTimestamps) {
  storage::v1::StoredSession stored = SampleStored();
  stored.set_created_at_unix_micros(-1);
  stored.set_expires_at_unix_micros(-1'500'000);
  stored.set_absolute_expires_at_unix_micros(-2'000'000);
  v1::Session api;
  ToApiSession(stored, &api);
  EXPECT_EQ(api.created_at().seconds(), -1);
  EXPECT_EQ(api.created_at().nanos(), 999'999'000);
  EXPECT_EQ(api.expires_at().seconds(), -2);
  EXPECT_EQ(api.expires_at().nanos(), 500'000'000);
  EXPECT_EQ(api.absolute_expires_at().seconds(), -2);
  EXPECT_EQ(api.absolute_expires_at().nanos(), 0);
}

// The hot paths move the stored session into the answer; it must say exactly what the copy
// says.
TEST(ToApiSessionTest, MovingGivesTheSameAnswerAsCopying) {
  const storage::v1::StoredSession stored = SampleStored();
  v1::Session copied;
  ToApiSession(stored, &copied);
  storage::v1::StoredSession moved_from = stored;
  v1::Session moved;
  ToApiSession(std::move(moved_from), &moved);
  EXPECT_TRUE(google::protobuf::util::MessageDifferencer::Equals(copied, moved))
      << "copied: " << copied.ShortDebugString() << "\nmoved: " << moved.ShortDebugString();
}

}  // namespace
}  // namespace sessionledger
