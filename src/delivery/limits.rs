//! The pacer: governor limiters for `telegram.limits` (global, per chat, per group).

use std::num::NonZeroU32;
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::config::TelegramLimits;

/// The governor limiters of `telegram.limits`.
pub struct Limiters {
    global: DefaultDirectRateLimiter,
    chat: DefaultKeyedRateLimiter<i64>,
    group: DefaultKeyedRateLimiter<i64>,
}

impl std::fmt::Debug for Limiters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Limiters")
    }
}

impl Limiters {
    /// Builds the limiters; zero rates were rejected by config validation and become 1.
    pub fn new(limits: &TelegramLimits) -> Self {
        let nonzero = |n: u32| NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN);
        let per_group = Duration::from_secs(60) / limits.group_per_minute.max(1);
        let group_quota = Quota::with_period(per_group)
            .unwrap_or_else(|| Quota::per_minute(nonzero(limits.group_per_minute)))
            .allow_burst(NonZeroU32::MIN);
        Self {
            global: RateLimiter::direct(Quota::per_second(nonzero(limits.global_per_second))),
            chat: RateLimiter::keyed(Quota::per_second(nonzero(limits.chat_per_second))),
            group: RateLimiter::keyed(group_quota),
        }
    }

    /// Waits for `cells` messages' worth of room towards `chat_id`, one cell at a time.
    pub async fn until_ready(&self, chat_id: i64, cells: usize) {
        for _ in 0..cells {
            self.chat.until_key_ready(&chat_id).await;
            if chat_id < 0 {
                self.group.until_key_ready(&chat_id).await;
            }
            self.global.until_ready().await;
        }
    }

    /// Drops the state of keys that are back at full capacity.
    pub fn retain_recent(&self) {
        self.chat.retain_recent();
        self.group.retain_recent();
    }
}
