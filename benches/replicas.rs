//! Benchmarks of two relay replicas sharing a real PostgreSQL state, against a real Dovecot and
//! the fake SeaTable and Telegram servers. Prints, in one run:
//!
//! 1. append-to-send latency with the mailbox watched by the replica that does not deliver
//!    (the outbox `NOTIFY` wakes the other), next to the single-process figure (SQLite);
//! 2. failover after `kill -9` of the replica holding `delivery` and one mailbox: kill → the
//!    first send by the survivor of a report to the survivor's own mailbox (the `delivery`
//!    failover) and of a report to the killed replica's mailbox (the mailbox failover), next to
//!    `state.lease_secs`;
//! 3. the span of a fan-out to 123 chats (first send to last, the fake Telegram enforcing its
//!    limits over every sliding window) with two replicas next to one process: the same, since
//!    one replica delivers and the budget is shared, not multiplied.
//!
//! Run with `cargo bench --bench replicas` (needs Dovecot and PostgreSQL:
//! `scripts/test-deps.sh`).

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::Duration;

use serde_json::json;
use support::postgres::Postgres;
use support::replicas::{Replica, holds, mailboxes, spawn, spawn_pair, wait_leases, wait_ready};
use support::stack::{ADDRESS, PASSWORD, Stack, Tuning, fixture};
use support::telegram::RateLimits;
use tokio::time::Instant;

const SAMPLES: usize = 10;
const LEASE_SECS: u64 = 5;
const SECOND: &str = "ops@example.com";

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Appends a report to `address` and waits for the next accepted send to `chat`: the latency.
async fn append_to_send(stack: &Stack, address: &str, chat: i64) -> Duration {
    let before = stack.ok_sends_to(chat).len();
    let started = Instant::now();
    stack
        .dovecot
        .append(address, "INBOX", &support::dovecot::message("Latency"))
        .await
        .unwrap();
    stack
        .wait_for_sends(&[chat], before + 1, Duration::from_secs(120))
        .await;
    started.elapsed()
}

/// A stack whose mailbox fans out to 120 users and 3 supergroups, against Telegram's limits.
async fn fan_out_stack() -> (Stack, Vec<i64>) {
    let stack = Stack::new().await;
    stack.telegram.set_rate_limits(Some(RateLimits::telegram()));
    let chats = stack.add_fan_out(120, 3);
    (stack, chats)
}

/// Delivers a PDF report to the fan-out and waits for every chat: first-to-last send, 429s.
async fn fan_out_span(stack: &Stack, chats: &[i64]) -> (Duration, usize) {
    stack.deliver(&fixture("03_dashboard_pdf_report.eml")).await;
    stack
        .wait_for_sends(chats, 1, Duration::from_secs(120))
        .await;
    (
        stack.telegram.ok_send_span(chats),
        stack.telegram.rate_violations().len(),
    )
}

/// The stack with two mailboxes: the default (chat 1000) and `SECOND` (chat 2000).
async fn two_mailboxes() -> Stack {
    let stack = Stack::new().await;
    stack.add_user("Ann", Some(1000), &[stack.mailbox_row.as_str()]);
    stack.dovecot.add_user(SECOND, PASSWORD).unwrap();
    let row = stack.seatable.add_row(
        "mailboxes",
        json!({"Name": "ops", "email": SECOND, "imap_password": PASSWORD}),
    );
    stack.add_user("Bob", Some(2000), &[row.as_str()]);
    stack
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        // 1a. One process on SQLite.
        let stack = two_mailboxes().await;
        let relay = stack.start(&Tuning::default());
        stack.wait_ready(2).await;
        let mut single = Vec::new();
        for _ in 0..SAMPLES {
            single.push(append_to_send(&stack, ADDRESS, 1000).await);
            // The per-chat spacing (1 message/s) must not add to the next sample.
            tokio::time::sleep(Duration::from_millis(1100)).await;
        }
        relay.stop().await;
        drop(stack);

        // 1b. Two replicas: one holds delivery and a mailbox, the other the other mailbox.
        let postgres = Postgres::start().await.unwrap();
        let stack = two_mailboxes().await;
        let first = spawn(&stack, &postgres, "r1", LEASE_SECS);
        wait_ready(&first).await;
        let second = spawn(&stack, &postgres, "r2", LEASE_SECS);
        let held = wait_leases(
            &[&first, &second],
            "the replicas did not split the two mailboxes",
            Duration::from_secs(120),
            |held| held.iter().all(|h| mailboxes(h) == 1),
        )
        .await;
        wait_ready(&first).await;
        wait_ready(&second).await;
        let first_delivers = holds(&held[0], "delivery");
        let (held_by_deliverer, held_by_watcher) = if first_delivers {
            (&held[0], &held[1])
        } else {
            (&held[1], &held[0])
        };
        let (remote, remote_chat) = if holds(held_by_watcher, &format!("mailbox:{ADDRESS}")) {
            (ADDRESS, 1000)
        } else {
            (SECOND, 2000)
        };
        let (local, local_chat) = if remote == ADDRESS {
            (SECOND, 2000)
        } else {
            (ADDRESS, 1000)
        };
        assert!(holds(held_by_deliverer, &format!("mailbox:{local}")));
        let mut remote_samples = Vec::new();
        for _ in 0..SAMPLES {
            remote_samples.push(append_to_send(&stack, remote, remote_chat).await);
            tokio::time::sleep(Duration::from_millis(1100)).await;
        }
        let single_ms = ms(median(single));
        let remote_ms = ms(median(remote_samples));
        println!(
            "append-to-send p50: single process (SQLite) {single_ms:.0} ms; remote watcher \
             (PostgreSQL, NOTIFY) {remote_ms:.0} ms; difference {:+.0} ms (issue bound: +20 ms)",
            remote_ms - single_ms
        );

        // 2. kill -9 of the replica holding delivery and `local`.
        let (mut killed, survivor): (Replica, Replica) = if first_delivers {
            (first, second)
        } else {
            (second, first)
        };
        let before_remote = stack.ok_sends_to(remote_chat).len();
        let before_local = stack.ok_sends_to(local_chat).len();
        killed.child.kill().unwrap();
        let kill = Instant::now();
        killed.child.wait().unwrap();
        // Appended at once: each waits for its lease to move.
        for address in [remote, local] {
            stack
                .dovecot
                .append(address, "INBOX", &support::dovecot::message("Failover"))
                .await
                .unwrap();
        }
        stack
            .wait_for_sends(&[remote_chat], before_remote + 1, Duration::from_secs(120))
            .await;
        let delivery_failover = kill.elapsed();
        stack
            .wait_for_sends(&[local_chat], before_local + 1, Duration::from_secs(120))
            .await;
        let mailbox_failover = kill.elapsed();
        println!(
            "failover after kill -9 (state.lease_secs {LEASE_SECS} s, renewed every {:.1} s): \
             delivery {:.2} s, mailbox {:.2} s (kill -> first send by the survivor)",
            LEASE_SECS as f64 / 3.0,
            delivery_failover.as_secs_f64(),
            mailbox_failover.as_secs_f64(),
        );
        drop(survivor);
        drop(killed);
        drop(stack);

        // 3a. A fan-out from one process.
        let (stack, chats) = fan_out_stack().await;
        let relay = stack.start(&Tuning::default());
        stack.wait_ready(1).await;
        let (single_span, single_429s) = fan_out_span(&stack, &chats).await;
        relay.stop().await;
        let minimum = RateLimits::telegram().min_span(chats.len() as u32);
        drop(stack);

        // 3b. The same from two replicas.
        let postgres = Postgres::start().await.unwrap();
        let (stack, chats) = fan_out_stack().await;
        let (first, second, _) = spawn_pair(&stack, &postgres, LEASE_SECS).await;
        let (replicas_span, replicas_429s) = fan_out_span(&stack, &chats).await;
        println!(
            "fan-out to {} chats, first to last send: one process {:.3} s ({single_429s} 429s); \
             two replicas {:.3} s ({replicas_429s} 429s); the windows allow {:.3} s at least",
            chats.len(),
            single_span.as_secs_f64(),
            replicas_span.as_secs_f64(),
            minimum.as_secs_f64(),
        );
        drop((first, second));
    });
}
