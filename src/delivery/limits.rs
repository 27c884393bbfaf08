//! The pacer: when a send to a chat may start so that Telegram's flood limits hold over every
//! sliding window (`telegram.limits`).
//!
//! Telegram does not publish its algorithm; the Bots FAQ ("My bot is hitting limits, how do I
//! avoid this?") says no more than one message per second in a chat, 20 per minute in a group
//! and about 30 per second in total, and it answers a flood with 429 and a `retry_after` that
//! grows while a bot keeps flooding. A token bucket (GCRA with a burst) keeps a *rate* but lets
//! twice the limit into the window right after a burst, so the pacer is plain **spacing with no
//! burst**: every message takes one cell of `1 / rate` (stretched by [`SAFETY`] for the
//! network's jitter), and a send starts only at an instant when its cells are free in all three
//! schedules at once. An album of N arrives as N messages at one instant, so it needs the N - 1
//! cells before that instant free as well as the N after it: then every window still holds at
//! most `rate × window`, whether it ends at the album or starts there.
//!
//! - **global:** one cell of `1 s / global_per_second` per message (an album of N takes N);
//! - **chat:** one cell of `1 s / chat_per_second` per request (an album is one request);
//! - **group** (a negative `chat_id`): one cell of `60 s / group_per_minute` per message.
//!
//! Any window of length W then holds at most `W × rate` messages, whatever the mix of chats.
//! No burst also bounds what is in flight: about `global_per_second × round-trip` sends, which is
//! what a `kill -9` can repeat (nothing in the Bot API makes a send idempotent).
//!
//! The three schedules are reserved together, under one lock, at one instant; governor's
//! limiters cannot do that (each would consume its cell on its own, and a send waiting on the
//! second would start after the first's cell had passed), which is why this is our own code.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::config::TelegramLimits;

/// Every cell is this much longer than `1 / rate`: a margin for the jitter between when a send
/// starts here and when Telegram counts it (2 %: 0.67 ms a cell at 30/s, 20 ms a second).
pub const SAFETY: f64 = 1.02;

/// How late a send task may wake after its reserved instant and still send: later than this
/// (a loaded scheduler), it would bunch with the next send that woke on time, so it takes new
/// cells instead ([`Pacer::start_at`]). Half a global cell at 30/s; the rest of the 20 ms a
/// second that [`SAFETY`] leaves covers it.
pub const LATE_WAKE: Duration = Duration::from_millis(10);

/// How long a 429 pauses every chat (on top of `retry_after` for its own chat): Telegram does
/// not say whether a 429 is for the chat or for the bot, and sending on at full rate into a
/// global flood turns one 429 into a stream of them.
pub const GLOBAL_PAUSE_ON_429: Duration = Duration::from_secs(1);

/// The cells of `telegram.limits`. Cheap to share behind an `Arc`; every method is sync and
/// holds the lock for a few map operations.
#[derive(Debug)]
pub struct Pacer {
    global_cell: Duration,
    chat_cell: Duration,
    group_cell: Duration,
    schedule: Mutex<Schedule>,
}

/// The first free instant of each schedule.
#[derive(Debug)]
struct Schedule {
    global: Instant,
    chats: HashMap<i64, Instant>,
    groups: HashMap<i64, Instant>,
}

impl Pacer {
    /// Cells for `limits`; a zero rate (rejected by config validation) counts as 1.
    pub fn new(limits: &TelegramLimits) -> Self {
        let cell = |period: Duration, rate: u32| (period / rate.max(1)).mul_f64(SAFETY);
        Self {
            global_cell: cell(Duration::from_secs(1), limits.global_per_second),
            chat_cell: cell(Duration::from_secs(1), limits.chat_per_second),
            group_cell: cell(Duration::from_secs(60), limits.group_per_minute),
            schedule: Mutex::new(Schedule {
                // Nothing was sent before the start: an album may go at once.
                global: Instant::now()
                    .checked_sub(Duration::from_secs(60))
                    .unwrap_or_else(Instant::now),
                chats: HashMap::new(),
                groups: HashMap::new(),
            }),
        }
    }

    /// Reserves the cells of one request of `messages` messages (at least 1) to `chat_id` if it
    /// may start by `now + lead`, and returns the instant it may start (never before `now`).
    /// Otherwise reserves nothing and returns `Err` with the instant it could start.
    pub fn try_reserve(
        &self,
        chat_id: i64,
        messages: usize,
        now: Instant,
        lead: Duration,
    ) -> Result<Instant, Instant> {
        let mut schedule = self.lock();
        let start = self.earliest(&schedule, chat_id, messages, now);
        if start > now + lead {
            return Err(start);
        }
        self.take(&mut schedule, chat_id, messages, start);
        Ok(start)
    }

    /// Reserves the cells of one request at the earliest instant they are free and waits for
    /// it. For the sends a task makes on its own (a migrated group, a photo resent as a
    /// document); the worker's first attempts go through [`Pacer::try_reserve`].
    pub async fn admit(&self, chat_id: i64, messages: usize) {
        let start = {
            let mut schedule = self.lock();
            let start = self.earliest(&schedule, chat_id, messages, Instant::now());
            self.take(&mut schedule, chat_id, messages, start);
            start
        };
        tokio::time::sleep_until(start).await;
    }

    /// Waits for `start`, the instant [`Pacer::try_reserve`] gave a request of `messages`
    /// messages to `chat_id`. A task that wakes more than [`LATE_WAKE`] after it takes new
    /// global cells at the earliest free instant and waits for that, so the late send never
    /// lands next to the one after it. Returns the instant it may send.
    pub async fn start_at(&self, chat_id: i64, messages: usize, start: Instant) -> Instant {
        tokio::time::sleep_until(start).await;
        let now = Instant::now();
        if now <= start + LATE_WAKE {
            return start;
        }
        let again = self.reserve_again(chat_id, messages, now);
        tokio::time::sleep_until(again).await;
        again
    }

    /// Reserves the cells of a request already reserved for an instant now past (its task woke
    /// late). Only the global schedule constrains it: the chat's and the group's cells after
    /// the old instant are its own, since nothing else goes to a chat while a send to it is in
    /// flight, and everything before is older still.
    fn reserve_again(&self, chat_id: i64, messages: usize, now: Instant) -> Instant {
        let mut schedule = self.lock();
        let before = cells(messages) - 1;
        let start = now.max(schedule.global + self.global_cell * before);
        self.take(&mut schedule, chat_id, messages, start);
        start
    }

    /// Counts `sent` (recipient `chat_id`, messages, instant sent) as already in Telegram's
    /// windows: a worker that starts after another stopped (a restart, a takeover of the
    /// `delivery` lease) seeds its schedule from the sends done in the last minute
    /// ([`crate::state::State::recent_sends`]). Each chat, group and the global schedule gets
    /// one cell more than the sends take: one more send may have reached Telegram and not been
    /// marked done before the other worker died.
    pub fn seed(&self, sent: impl IntoIterator<Item = (i64, usize, Instant)>) {
        let mut schedule = self.lock();
        for (chat_id, messages, at) in sent {
            let messages = cells(messages) + 1;
            schedule.global = schedule.global.max(at + self.global_cell * messages);
            let chat = schedule.chats.entry(chat_id).or_insert(at);
            *chat = (*chat).max(at + self.chat_cell * 2);
            if chat_id < 0 {
                let group = schedule.groups.entry(chat_id).or_insert(at);
                *group = (*group).max(at + self.group_cell * messages);
            }
        }
    }

    /// Telegram answered 429 for `chat_id`: nothing goes to that chat for `retry_after`, and
    /// nothing at all for up to [`GLOBAL_PAUSE_ON_429`].
    pub fn penalize(&self, chat_id: i64, retry_after: Duration) {
        let now = Instant::now();
        let mut schedule = self.lock();
        let chat = schedule.chats.entry(chat_id).or_insert(now);
        *chat = (*chat).max(now + retry_after);
        schedule.global = schedule
            .global
            .max(now + retry_after.min(GLOBAL_PAUSE_ON_429));
    }

    /// Forgets chats whose cells are all in the past and groups that sent nothing in the last
    /// minute (an album looks back up to N - 1 cells).
    pub fn retain_recent(&self) {
        let now = Instant::now();
        let mut schedule = self.lock();
        schedule.chats.retain(|_, free| *free > now);
        schedule
            .groups
            .retain(|_, free| *free + Duration::from_secs(60) > now);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Schedule> {
        // The schedule holds only instants: a panic elsewhere cannot leave it inconsistent.
        self.schedule
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The first instant at which `messages` messages to `chat_id` may start: each schedule's
    /// free instant, plus `messages - 1` cells for an album.
    fn earliest(
        &self,
        schedule: &Schedule,
        chat_id: i64,
        messages: usize,
        now: Instant,
    ) -> Instant {
        let before = cells(messages) - 1;
        let mut start = now.max(schedule.global + self.global_cell * before);
        if let Some(&free) = schedule.chats.get(&chat_id) {
            start = start.max(free);
        }
        if chat_id < 0
            && let Some(&free) = schedule.groups.get(&chat_id)
        {
            start = start.max(free + self.group_cell * before);
        }
        start
    }

    fn take(&self, schedule: &mut Schedule, chat_id: i64, messages: usize, start: Instant) {
        let messages = cells(messages);
        schedule.global = start + self.global_cell * messages;
        schedule.chats.insert(chat_id, start + self.chat_cell);
        if chat_id < 0 {
            schedule
                .groups
                .insert(chat_id, start + self.group_cell * messages);
        }
    }
}

/// The cells of a request of `messages` messages: at least one (a text message).
fn cells(messages: usize) -> u32 {
    u32::try_from(messages.max(1)).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn telegram() -> TelegramLimits {
        TelegramLimits {
            global_per_second: 30,
            chat_per_second: 1,
            group_per_minute: 20,
        }
    }

    /// The most messages any window of `window` holds, over the (start, messages) log.
    fn most_in_any_window(log: &[(Instant, u32)], window: Duration) -> u32 {
        log.iter()
            .map(|&(from, _)| {
                log.iter()
                    .filter(|(at, _)| *at >= from && *at < from + window)
                    .map(|(_, n)| n)
                    .sum()
            })
            .max()
            .unwrap_or(0)
    }

    /// Reserves every request as soon as it may start, like the worker does, and logs it.
    fn run(pacer: &Pacer, requests: &[(i64, u32)]) -> Vec<(i64, Instant, u32)> {
        let mut now = Instant::now();
        let mut pending: Vec<(i64, u32)> = requests.to_vec();
        let mut log = Vec::new();
        while !pending.is_empty() {
            let mut next = None::<Instant>;
            pending.retain(|&(chat, n)| {
                match pacer.try_reserve(chat, n as usize, now, Duration::ZERO) {
                    Ok(start) => {
                        log.push((chat, start, n));
                        false
                    }
                    Err(at) => {
                        next = Some(next.map_or(at, |t| t.min(at)));
                        true
                    }
                }
            });
            if let Some(at) = next {
                now = at;
            }
        }
        log
    }

    #[test]
    fn a_fan_out_keeps_every_sliding_window_and_has_no_burst() {
        let pacer = Pacer::new(&telegram());
        let mut requests: Vec<(i64, u32)> = (1..=120).map(|chat| (chat, 1)).collect();
        requests.extend([(-1001, 1), (-1002, 1), (-1003, 1)]);
        let log = run(&pacer, &requests);
        assert_eq!(log.len(), 123);
        let all: Vec<(Instant, u32)> = log.iter().map(|&(_, at, n)| (at, n)).collect();
        assert!(most_in_any_window(&all, Duration::from_secs(1)) <= 30);
        assert!(
            most_in_any_window(&all, Duration::from_millis(100)) <= 3,
            "no burst"
        );
        let first = all.iter().map(|e| e.0).min().unwrap();
        let last = all.iter().map(|e| e.0).max().unwrap();
        let span = (last - first).as_secs_f64();
        // The sliding windows allow 4.0 s for 123 messages at 30/s.
        assert!((4.0..=4.2).contains(&span), "{span}");
    }

    #[test]
    fn chats_and_groups_keep_their_own_windows() {
        let pacer = Pacer::new(&telegram());
        // Ten sends to one user; 25 single messages, a 10-item album and 5 more to one group;
        // singles to others around a 10-item album to another user.
        let mut requests: Vec<(i64, u32)> = vec![(7, 1); 10];
        requests.extend(vec![(-5, 1); 25]);
        requests.push((-5, 10));
        requests.extend(vec![(-5, 1); 5]);
        requests.extend((100..140).map(|chat| (chat, 1)));
        requests.push((8, 10));
        requests.extend((200..240).map(|chat| (chat, 1)));
        let log = run(&pacer, &requests);
        let of = |chat: i64| -> Vec<(Instant, u32)> {
            log.iter()
                .filter(|e| e.0 == chat)
                .map(|&(_, at, n)| (at, n))
                .collect()
        };
        let user: Vec<(Instant, u32)> = of(7).iter().map(|&(at, _)| (at, 1)).collect();
        assert_eq!(most_in_any_window(&user, Duration::from_secs(1)), 1);
        let group = of(-5);
        assert!(most_in_any_window(&group, Duration::from_secs(60)) <= 20);
        let requests_per_second: Vec<(Instant, u32)> =
            group.iter().map(|&(at, _)| (at, 1)).collect();
        assert_eq!(
            most_in_any_window(&requests_per_second, Duration::from_secs(1)),
            1
        );
        let all: Vec<(Instant, u32)> = log.iter().map(|&(_, at, n)| (at, n)).collect();
        assert!(most_in_any_window(&all, Duration::from_secs(1)) <= 30);
    }

    #[test]
    fn an_album_takes_one_cell_per_item_of_the_global_budget() {
        let pacer = Pacer::new(&telegram());
        let now = Instant::now();
        let first = pacer.try_reserve(1, 10, now, Duration::ZERO).unwrap();
        assert_eq!(first, now);
        let next = pacer.try_reserve(2, 1, now, Duration::ZERO).unwrap_err();
        let gap = (next - now).as_secs_f64();
        assert!((0.33..0.35).contains(&gap), "{gap}");
    }

    #[test]
    fn a_seeded_schedule_keeps_the_windows_across_a_takeover() {
        // The old worker sent 19 messages to a group in the last minute, the last one 4 s ago,
        // and 30 to users in the last second; one more to the group reached Telegram a cell
        // later, but the worker died before marking it done.
        let pacer = Pacer::new(&telegram());
        let now = Instant::now();
        let old: Vec<(i64, usize, Instant)> = (0..19)
            .map(|i| {
                (
                    -7,
                    1,
                    now - Duration::from_secs(4) - Duration::from_millis(3060) * i,
                )
            })
            .chain((0..30).map(|i| (i64::from(i) + 1, 1, now - Duration::from_millis(34) * i)))
            .collect();
        pacer.seed(old.iter().copied());
        let in_flight = now - Duration::from_millis(940);
        let log = run(&pacer, &[(-7, 1), (-7, 1), (1, 1), (99, 1)]);
        let group: Vec<(Instant, u32)> = old
            .iter()
            .filter(|s| s.0 == -7)
            .map(|s| (s.2, 1))
            .chain([(in_flight, 1)])
            .chain(log.iter().filter(|e| e.0 == -7).map(|e| (e.1, e.2)))
            .collect();
        assert!(most_in_any_window(&group, Duration::from_secs(60)) <= 20);
        let all: Vec<(Instant, u32)> = old
            .iter()
            .map(|s| (s.2, 1))
            .chain(log.iter().map(|e| (e.1, e.2)))
            .collect();
        assert!(most_in_any_window(&all, Duration::from_secs(1)) <= 30);
        let user = log.iter().find(|e| e.0 == 1).unwrap().1;
        assert!(user >= now + Duration::from_secs(1), "chat 1 sent just now");
    }

    #[test]
    fn a_late_task_takes_new_cells_after_the_ones_reserved() {
        let pacer = Pacer::new(&telegram());
        let now = Instant::now();
        let starts: Vec<Instant> = (1..=5)
            .map(|chat| {
                pacer
                    .try_reserve(chat, 1, now, Duration::from_secs(1))
                    .unwrap()
            })
            .collect();
        // The first task wakes 50 ms late, after the second's instant: it goes after the fifth.
        let again = pacer.reserve_again(1, 1, starts[0] + Duration::from_millis(50));
        let cell = Duration::from_secs(1).mul_f64(SAFETY) / 30;
        assert!(again >= starts[4] + cell, "{again:?} {starts:?}");
        let next = pacer.try_reserve(6, 1, again, Duration::ZERO).unwrap_err();
        assert!(next >= again + cell);
    }

    #[test]
    fn a_429_holds_its_chat_and_pauses_the_rest_briefly() {
        let pacer = Pacer::new(&telegram());
        pacer.penalize(9, Duration::from_secs(5));
        let now = Instant::now();
        let chat = pacer.try_reserve(9, 1, now, Duration::ZERO).unwrap_err();
        assert!(chat >= now + Duration::from_millis(4900));
        let other = pacer.try_reserve(10, 1, now, Duration::ZERO).unwrap_err();
        assert!(other <= now + GLOBAL_PAUSE_ON_429);
        assert!(other >= now + Duration::from_millis(900));
    }
}
