//! Replicas sharing one real PostgreSQL state: they split the mailboxes by lease, one of them
//! delivers, and a survivor takes over from a killed (`kill -9`) or stopped (SIGTERM) one, in
//! the middle of a fan-out too, without a 429 from the fake Telegram's sliding windows.

mod support;

use std::time::Duration;

use serde_json::json;
use support::postgres::Postgres;
use support::replicas::{
    append, holds, leases, mailboxes, pending_sends, readyz, signal, spawn, spawn_holding_all,
    spawn_pair, wait_leases, wait_ready,
};
use support::stack::{PASSWORD, Stack, fixture};
use support::telegram::{Call, RateLimits};

/// `state.lease_secs` in the kill -9 test (renewed every second).
const LEASE_SECS: u64 = 3;
/// `state.lease_secs` in the SIGTERM test: long, so a takeover well within it shows the release.
const LONG_LEASE_SECS: u64 = 30;

/// The stack with six mailboxes in Dovecot and SeaTable, one subscriber each (chat 1000 + i).
async fn six_mailboxes() -> (Stack, Vec<String>) {
    let stack = Stack::new().await;
    let mut addresses = vec![support::stack::ADDRESS.to_owned()];
    stack.add_user("First", Some(1000), &[stack.mailbox_row.as_str()]);
    for i in 1..6 {
        let address = format!("reports{i}@example.com");
        stack.dovecot.add_user(&address, PASSWORD).unwrap();
        let row = stack.seatable.add_row(
            "mailboxes",
            json!({"Name": format!("box{i}"), "email": address, "imap_password": PASSWORD}),
        );
        stack.add_user(&format!("User {i}"), Some(1000 + i), &[row.as_str()]);
        addresses.push(address);
    }
    (stack, addresses)
}

#[tokio::test]
async fn two_replicas_split_six_mailboxes_and_a_survivor_takes_over_after_kill_9() {
    let postgres = Postgres::start().await.unwrap();
    let (stack, addresses) = six_mailboxes().await;
    let first = spawn(&stack, &postgres, "r1", LEASE_SECS);
    let second = spawn(&stack, &postgres, "r2", LEASE_SECS);
    let held = wait_leases(
        &[&first, &second],
        "the replicas did not split the six mailboxes 3 and 3",
        Duration::from_secs(60),
        |held| held.iter().all(|h| mailboxes(h) == 3),
    )
    .await;
    assert_eq!(
        held.iter().filter(|h| holds(h, "delivery")).count(),
        1,
        "exactly one replica delivers: {held:?}"
    );
    assert_eq!(
        held.iter().filter(|h| holds(h, "updates")).count(),
        1,
        "exactly one replica polls getUpdates: {held:?}"
    );
    // Every mailbox is leased once, and watched with one connection.
    let mut all: Vec<&String> = held
        .iter()
        .flatten()
        .filter(|n| n.starts_with("mailbox:"))
        .collect();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 6, "{held:?}");
    // `doveadm who`: one line per user, its second column the number of connections.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let who = stack.dovecot.doveadm(&["who"]).await.unwrap_or_default();
        let counts: Vec<Option<&str>> = addresses
            .iter()
            .map(|address| {
                who.lines()
                    .find(|line| line.split_whitespace().next() == Some(address.as_str()))
                    .and_then(|line| line.split_whitespace().nth(1))
            })
            .collect();
        if counts.iter().all(|count| *count == Some("1")) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "each mailbox has one IMAP connection: {who}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A report to each mailbox reaches its subscriber, whichever replica watches it.
    for address in &addresses {
        stack
            .dovecot
            .append(address, "INBOX", &support::dovecot::message("Daily"))
            .await
            .unwrap();
    }
    let chats: Vec<i64> = (1000..1006).collect();
    stack
        .wait_for_sends(&chats, 1, Duration::from_secs(60))
        .await;

    // kill -9 of the delivery holder: the survivor takes every lease within a few lease
    // periods, and a report appended meanwhile is delivered.
    let (mut holder, survivor) = if holds(&held[0], "delivery") {
        (first, second)
    } else {
        (second, first)
    };
    holder.child.kill().unwrap();
    holder.child.wait().unwrap();
    stack
        .dovecot
        .append(&addresses[0], "INBOX", &support::dovecot::message("After"))
        .await
        .unwrap();
    wait_leases(
        &[&survivor],
        "the survivor did not take every lease",
        Duration::from_secs(LEASE_SECS * 4 + 30),
        |held| {
            mailboxes(&held[0]) == 6 && holds(&held[0], "delivery") && holds(&held[0], "updates")
        },
    )
    .await;
    stack
        .wait_for_sends(&[1000], 2, Duration::from_secs(LEASE_SECS + 30))
        .await;
    drop(holder);
}

#[tokio::test]
async fn sigterm_hands_the_leases_over_at_once() {
    let postgres = Postgres::start().await.unwrap();
    let stack = Stack::new().await;
    stack.add_user("First", Some(1000), &[stack.mailbox_row.as_str()]);
    let first = spawn_holding_all(&stack, &postgres, "r1", LONG_LEASE_SECS).await;
    let second = spawn(&stack, &postgres, "r2", LONG_LEASE_SECS);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while readyz(second.port).await.is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the second replica did not start"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        leases(&[&second]).await,
        [Vec::<String>::new()],
        "it waits: the first holds all"
    );
    let stopped = tokio::time::Instant::now();
    signal(&first, "TERM");
    wait_leases(
        &[&second],
        "the second replica did not take over",
        Duration::from_secs(LONG_LEASE_SECS),
        |held| holds(&held[0], "delivery") && mailboxes(&held[0]) == 1,
    )
    .await;
    let took = stopped.elapsed();
    eprintln!("SIGTERM to takeover: {took:?} (lease_secs {LONG_LEASE_SECS})");
    // Without the release the leases would wait out lease_secs after the last renewal, and
    // without its announcement the next round, lease_secs / 3 away.
    assert!(
        took < Duration::from_secs(LONG_LEASE_SECS / 6),
        "the takeover took {took:?}, not less than lease_secs"
    );
    append(&stack, "After").await;
    stack
        .wait_for_sends(&[1000], 1, Duration::from_secs(30))
        .await;
    drop(first);
}

/// Sends accepted for `chat` so far.
fn sends_to(stack: &Stack, chat: i64) -> usize {
    stack.ok_sends_to(chat).len()
}

#[tokio::test]
async fn a_replica_paused_past_its_lease_neither_sends_nor_advances_anything() {
    let postgres = Postgres::start().await.unwrap();
    let stack = Stack::new().await;
    stack.add_user("First", Some(1000), &[stack.mailbox_row.as_str()]);
    let first = spawn_holding_all(&stack, &postgres, "r1", LEASE_SECS).await;
    let second = spawn(&stack, &postgres, "r2", LEASE_SECS);
    // SIGSTOP the holder past its lease; the other takes everything over and relays a report
    // appended meanwhile.
    signal(&first, "STOP");
    append(&stack, "Paused").await;
    wait_leases(
        &[&second],
        "the second replica did not take over from the paused one",
        Duration::from_secs(LEASE_SECS * 4 + 30),
        |held| holds(&held[0], "delivery") && mailboxes(&held[0]) == 1,
    )
    .await;
    stack
        .wait_for_sends(&[1000], 1, Duration::from_secs(LEASE_SECS + 30))
        .await;
    let checkpoint = postgres
        .psql("SELECT uid_validity, last_uid FROM checkpoints ORDER BY mailbox")
        .await
        .unwrap();
    // SIGCONT: the resumed replica finds its leases expired; it sends nothing and moves no
    // checkpoint, and gives way (it takes no lease while the other one renews).
    signal(&first, "CONT");
    let until = tokio::time::Instant::now() + Duration::from_secs(LEASE_SECS * 2);
    while tokio::time::Instant::now() < until {
        assert_eq!(sends_to(&stack, 1000), 1, "the resumed replica sent again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        postgres
            .psql("SELECT uid_validity, last_uid FROM checkpoints ORDER BY mailbox")
            .await
            .unwrap(),
        checkpoint
    );
    let held = leases(&[&first, &second]).await;
    assert!(
        mailboxes(&held[0]) == 0 && !holds(&held[0], "delivery"),
        "{held:?}"
    );
    assert!(holds(&held[1], "delivery"), "{held:?}");
}

#[tokio::test]
async fn a_postgresql_restart_is_survived_with_nothing_lost() {
    let postgres = Postgres::start().await.unwrap();
    let stack = Stack::new().await;
    stack.add_user("First", Some(1000), &[stack.mailbox_row.as_str()]);
    let (first, second, _) = spawn_pair(&stack, &postgres, LEASE_SECS).await;
    append(&stack, "Before").await;
    stack
        .wait_for_sends(&[1000], 1, Duration::from_secs(30))
        .await;
    // Down for longer than a lease: every lease lapses; a report arrives meanwhile.
    postgres.stop().await.unwrap();
    append(&stack, "During").await;
    tokio::time::sleep(Duration::from_secs(LEASE_SECS + 1)).await;
    postgres.start_again().await.unwrap();
    stack
        .wait_for_sends(&[1000], 2, Duration::from_secs(LEASE_SECS * 4 + 60))
        .await;
    let held = wait_leases(
        &[&first, &second],
        "the replicas did not take the leases again",
        Duration::from_secs(60),
        |held| {
            held.iter().map(|h| mailboxes(h)).sum::<usize>() == 1
                && held.iter().filter(|h| holds(h, "delivery")).count() == 1
        },
    )
    .await;
    drop(held);
    // Both still run and become ready again (their next lease round reaches PostgreSQL).
    wait_ready(&first).await;
    wait_ready(&second).await;
    assert_eq!(sends_to(&stack, 1000), 2, "nothing lost, nothing twice");
}

#[tokio::test]
async fn a_third_replica_joining_takes_its_share() {
    let postgres = Postgres::start().await.unwrap();
    let (stack, addresses) = six_mailboxes().await;
    let first = spawn(&stack, &postgres, "r1", LEASE_SECS);
    let second = spawn(&stack, &postgres, "r2", LEASE_SECS);
    wait_leases(
        &[&first, &second],
        "the two replicas did not split the mailboxes",
        Duration::from_secs(60),
        |held| held.iter().all(|h| mailboxes(h) == 3),
    )
    .await;
    let third = spawn(&stack, &postgres, "r3", LEASE_SECS);
    let held = wait_leases(
        &[&first, &second, &third],
        "the third replica did not get its share",
        Duration::from_secs(LEASE_SECS * 6 + 30),
        |held| held.iter().all(|h| mailboxes(h) == 2),
    )
    .await;
    let mut all: Vec<&String> = held
        .iter()
        .flatten()
        .filter(|n| n.starts_with("mailbox:"))
        .collect();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 6, "every mailbox is leased once: {held:?}");
    // And each is watched: a report to every mailbox arrives.
    for address in &addresses {
        stack
            .dovecot
            .append(address, "INBOX", &support::dovecot::message("Joined"))
            .await
            .unwrap();
    }
    let chats: Vec<i64> = (1000..1006).collect();
    stack
        .wait_for_sends(&chats, 1, Duration::from_secs(60))
        .await;
}

/// kill -9 of the `delivery` holder in the middle of a fan-out to 123 chats, with the fake
/// Telegram enforcing its limits over every sliding window and answering each send 150 ms
/// after it is delivered: the survivor takes the lease after `lease_secs`, resumes the outbox
/// where the dead one stopped, and every chat ends with the report. No 429 across both
/// replicas, and only the sends in flight at the kill repeat (4.5 at 30/s, so 5 at most).
#[tokio::test]
async fn kill_9_of_the_delivery_holder_mid_fan_out_loses_nothing_and_trips_no_limit() {
    const ANSWER_DELAY: Duration = Duration::from_millis(150);
    let postgres = Postgres::start().await.unwrap();
    let stack = Stack::new().await;
    stack.telegram.set_rate_limits(Some(RateLimits::telegram()));
    stack.telegram.set_answer_delay(ANSWER_DELAY);
    let chats = stack.add_fan_out(120, 3);
    let (first, second, held) = spawn_pair(&stack, &postgres, LEASE_SECS).await;
    let (mut holder, survivor) = if holds(&held[0], "delivery") {
        (first, second)
    } else {
        (second, first)
    };
    let ok_sends = |calls: &[Call]| calls.iter().filter(|c| c.is_send() && c.is_ok()).count();
    // A text report: what goes out is the pacer's doing alone, not an upload's.
    stack.deliver(&fixture("05_chart_text_table.eml")).await;
    stack
        .telegram
        .wait_for(move |calls| ok_sends(calls) >= 25, Duration::from_secs(60))
        .await
        .unwrap();
    holder.child.kill().unwrap();
    let killed = tokio::time::Instant::now();
    holder.child.wait().unwrap();
    let calls = stack.telegram.calls();
    let before = ok_sends(&calls);
    let unanswered = calls
        .iter()
        .filter(|c| c.is_send() && c.is_ok() && c.received_at + ANSWER_DELAY > killed)
        .count();
    assert!(
        before < chats.len(),
        "the kill came too late to test anything"
    );

    stack
        .wait_for_sends(&chats, 1, Duration::from_secs(LEASE_SECS * 4 + 60))
        .await;
    let took_over = killed.elapsed();
    // Done when the survivor's outbox is empty: nothing more can go out.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while pending_sends(&postgres).await > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the outbox did not drain"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let violations = stack.telegram.rate_violations();
    let duplicates = stack.repeated(&chats);
    eprintln!(
        "kill -9 of the delivery holder after {before} sends ({unanswered} unanswered): every \
         chat had the report {:.2} s later, {} repeated, {} 429s",
        took_over.as_secs_f64(),
        duplicates.len(),
        violations.len()
    );
    assert!(
        violations.is_empty(),
        "429s across the replicas: {violations:?}"
    );
    assert!(
        duplicates.len() <= unanswered.max(5),
        "{} repeated sends (the kill found {unanswered} delivered but unanswered): {duplicates:?}",
        duplicates.len()
    );
    let held = leases(&[&survivor]).await;
    assert!(holds(&held[0], "delivery"), "{held:?}");
    drop(holder);
}
