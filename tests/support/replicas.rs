//! Relay replicas sharing one PostgreSQL state, run as child processes: their configs, their
//! `/readyz` and the leases it lists (tests/replicas.rs and benches/replicas.rs).

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Child;
use std::time::Duration;

use serde_json::Value;

use super::postgres::Postgres;
use super::stack::{Stack, Tuning};

/// One replica: its process, its HTTP port.
pub struct Replica {
    pub child: Child,
    pub port: u16,
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The stack's config with `state.url` instead of `state.path`, this replica's id and port.
pub fn replica_config(
    stack: &Stack,
    postgres: &Postgres,
    id: &str,
    port: u16,
    lease_secs: u64,
) -> PathBuf {
    let state = format!(
        "  url: \"{}\"\n  lease_secs: {lease_secs}\n  replica_id: \"{id}\"",
        postgres.url()
    );
    let text = stack.config_text(&Tuning::default(), &state, port);
    let path = stack.dir.path().join(format!("config-{id}.yaml"));
    std::fs::write(&path, text).unwrap();
    path
}

pub fn spawn(stack: &Stack, postgres: &Postgres, id: &str, lease_secs: u64) -> Replica {
    let port = super::dovecot::free_port().unwrap();
    let child = stack.spawn_with_config(&replica_config(stack, postgres, id, port, lease_secs));
    Replica { child, port }
}

pub async fn readyz(port: u16) -> Option<(u16, Value)> {
    let response = reqwest::get(format!("http://127.0.0.1:{port}/readyz"))
        .await
        .ok()?;
    let status = response.status().as_u16();
    Some((status, response.json().await.ok()?))
}

/// The leases each replica reports in `/readyz` (empty for one that does not answer).
pub async fn leases(replicas: &[&Replica]) -> Vec<Vec<String>> {
    let mut all = Vec::new();
    for replica in replicas {
        let held = match readyz(replica.port).await {
            Some((_, body)) => body["replica"]["leases"]
                .as_array()
                .map(|names| {
                    names
                        .iter()
                        .filter_map(|n| n.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default(),
            None => Vec::new(),
        };
        all.push(held);
    }
    all
}

/// Waits up to `timeout` until `check` holds for the replicas' leases; returns them.
pub async fn wait_leases(
    replicas: &[&Replica],
    what: &str,
    timeout: Duration,
    check: impl Fn(&[Vec<String>]) -> bool,
) -> Vec<Vec<String>> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let held = leases(replicas).await;
        if check(&held) {
            return held;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}: {held:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `replica` answers `/readyz` with 200: each of its mailboxes caught up (so its
/// checkpoints are stored).
pub async fn wait_ready(replica: &Replica) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some((200, _)) = readyz(replica.port).await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the replica did not become ready: {:?}",
            readyz(replica.port).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Spawns replica `id` while no other runs, and waits until it holds `delivery` and the stack's
/// one mailbox and is ready (its checkpoint stored).
pub async fn spawn_holding_all(
    stack: &Stack,
    postgres: &Postgres,
    id: &str,
    lease_secs: u64,
) -> Replica {
    let replica = spawn(stack, postgres, id, lease_secs);
    wait_leases(
        &[&replica],
        "the first replica did not take the leases",
        Duration::from_secs(60),
        |held| holds(&held[0], "delivery") && mailboxes(&held[0]) == 1,
    )
    .await;
    wait_ready(&replica).await;
    replica
}

/// Spawns replicas `r1` and `r2` on a stack with one mailbox, waits until one of them holds
/// the mailbox and one holds `delivery`, and until both are ready. Returns them with the
/// leases each held then.
pub async fn spawn_pair(
    stack: &Stack,
    postgres: &Postgres,
    lease_secs: u64,
) -> (Replica, Replica, Vec<Vec<String>>) {
    let first = spawn(stack, postgres, "r1", lease_secs);
    let second = spawn(stack, postgres, "r2", lease_secs);
    let held = wait_leases(
        &[&first, &second],
        "the replicas did not take the leases",
        Duration::from_secs(120),
        |held| {
            held.iter().map(|h| mailboxes(h)).sum::<usize>() == 1
                && held.iter().any(|h| holds(h, "delivery"))
        },
    )
    .await;
    wait_ready(&first).await;
    wait_ready(&second).await;
    (first, second, held)
}

/// Sends `signal` (`TERM`, `STOP`, `CONT`) to the replica's process.
pub fn signal(replica: &Replica, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([format!("-{signal}"), replica.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{signal}");
}

/// Appends a report with `subject` to the stack's mailbox.
pub async fn append(stack: &Stack, subject: &str) {
    stack
        .dovecot
        .append(
            super::stack::ADDRESS,
            "INBOX",
            &super::dovecot::message(subject),
        )
        .await
        .unwrap();
}

/// The pending rows left in the shared outbox.
pub async fn pending_sends(postgres: &Postgres) -> usize {
    postgres
        .psql("SELECT count(*) FROM outbox WHERE status = 'pending'")
        .await
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

pub fn mailboxes(held: &[String]) -> usize {
    held.iter().filter(|n| n.starts_with("mailbox:")).count()
}

pub fn holds(held: &[String], name: &str) -> bool {
    held.iter().any(|n| n == name)
}
