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
    let text = std::fs::read_to_string(stack.write_config(&Tuning::default())).unwrap();
    let state_path = stack.dir.path().join("state.db");
    let text = text
        .replace(
            &format!("  path: \"{}\"", state_path.display()),
            &format!(
                "  url: \"{}\"\n  lease_secs: {lease_secs}\n  replica_id: \"{id}\"",
                postgres.url()
            ),
        )
        .replace(
            &format!("127.0.0.1:{}", stack.http_port),
            &format!("127.0.0.1:{port}"),
        );
    assert!(text.contains("url: \"postgres://"), "{text}");
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

pub fn mailboxes(held: &[String]) -> usize {
    held.iter().filter(|n| n.starts_with("mailbox:")).count()
}

pub fn holds(held: &[String], name: &str) -> bool {
    held.iter().any(|n| n == name)
}
