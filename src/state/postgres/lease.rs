//! Leases and heartbeats on PostgreSQL, the statements behind [`crate::replica`].
//!
//! A lease row is taken, renewed or kept with one conditional statement: the row is free
//! (never taken), expired, or already ours. The epoch grows by one whenever the lease changes
//! hands (or lapsed before renewal), and a release keeps the row and its epoch, so a write fenced
//! with an old epoch can never match again. Expiry is judged by the server's clock (`now()`).

use std::time::Duration;

use super::{Postgres, timed};
use crate::state::Fence;

/// A fenced write found its lease gone: another replica holds it now, or it expired.
#[derive(Debug, thiserror::Error)]
#[error("the lease {name} (epoch {epoch}) is no longer held by this replica")]
pub struct LeaseLost {
    /// The lease's name.
    pub name: String,
    /// The epoch the write was fenced with.
    pub epoch: i64,
}

/// Locks the lease row of `fence` for the rest of the transaction if it is still held with the
/// same epoch and not expired: an acquirer waits for the commit, so nothing fenced commits after
/// a takeover.
///
/// # Errors
/// [`LeaseLost`] (inside the `anyhow` error) when it is not, or a database error.
pub(super) async fn hold_fence(conn: &mut sqlx::PgConnection, fence: &Fence) -> anyhow::Result<()> {
    let held = sqlx::query(
        "SELECT 1 FROM leases WHERE name = $1 AND owner = $2 AND epoch = $3 AND expires_at > now()
         FOR SHARE",
    )
    .bind(&fence.name)
    .bind(&fence.owner)
    .bind(fence.epoch)
    .fetch_optional(conn)
    .await?
    .is_some();
    if held {
        Ok(())
    } else {
        Err(LeaseLost {
            name: fence.name.clone(),
            epoch: fence.epoch,
        }
        .into())
    }
}

/// The `LISTEN/NOTIFY` channel on which a replica announces that it released leases.
pub const LEASES_CHANNEL: &str = "report_relay_leases";

impl Postgres {
    /// Tells the other replicas that leases were released, so they take them now.
    ///
    /// # Errors
    /// A database error.
    pub async fn announce_release(&self) -> anyhow::Result<()> {
        timed(
            "Failed to announce released leases",
            sqlx::query("SELECT pg_notify($1, '')")
                .bind(LEASES_CHANNEL)
                .execute(&self.pool),
        )
        .await?;
        Ok(())
    }

    /// Takes or renews the lease `name` for `owner` for `duration`, if it is free, expired or
    /// already `owner`'s. Returns its epoch, or `None` when another replica holds it.
    ///
    /// # Errors
    /// A database error.
    pub async fn acquire_lease(
        &self,
        name: &str,
        owner: &str,
        duration: Duration,
    ) -> anyhow::Result<Option<i64>> {
        timed(
            "Failed to take a lease",
            sqlx::query_scalar(
                "INSERT INTO leases (name, owner, expires_at, epoch)
                 VALUES ($1, $2, now() + make_interval(secs => $3), 1)
                 ON CONFLICT (name) DO UPDATE
                   SET owner = EXCLUDED.owner, expires_at = EXCLUDED.expires_at,
                       epoch = CASE WHEN leases.owner = EXCLUDED.owner AND leases.expires_at > now()
                                    THEN leases.epoch ELSE leases.epoch + 1 END
                   WHERE leases.owner = EXCLUDED.owner OR leases.expires_at <= now()
                 RETURNING epoch",
            )
            .bind(name)
            .bind(owner)
            .bind(duration.as_secs_f64())
            .fetch_optional(&self.pool),
        )
        .await
    }

    /// Gives the lease `name` up at once if `owner` holds it (the row and its epoch stay).
    ///
    /// # Errors
    /// A database error.
    pub async fn release_lease(&self, name: &str, owner: &str) -> anyhow::Result<()> {
        timed(
            "Failed to release a lease",
            sqlx::query(
                "UPDATE leases SET owner = '', expires_at = now() WHERE name = $1 AND owner = $2",
            )
            .bind(name)
            .bind(owner)
            .execute(&self.pool),
        )
        .await?;
        Ok(())
    }

    /// Renews `replica`'s heartbeat and returns how many replicas renewed theirs within
    /// `within` (itself included).
    ///
    /// # Errors
    /// A database error.
    pub async fn heartbeat(&self, replica: &str, within: Duration) -> anyhow::Result<usize> {
        timed("Failed to renew the heartbeat", async {
            sqlx::query(
                "INSERT INTO replicas (id, heartbeat_at) VALUES ($1, now())
                 ON CONFLICT (id) DO UPDATE SET heartbeat_at = now()",
            )
            .bind(replica)
            .execute(&self.pool)
            .await?;
            let live: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM replicas WHERE heartbeat_at > now() - make_interval(secs => $1)",
            )
            .bind(within.as_secs_f64())
            .fetch_one(&self.pool)
            .await?;
            Ok::<_, sqlx::Error>(usize::try_from(live).unwrap_or(1).max(1))
        })
        .await
    }

    /// Removes `replica`'s heartbeat (a clean shutdown), so the others' fair share grows at once.
    ///
    /// # Errors
    /// A database error.
    pub async fn remove_heartbeat(&self, replica: &str) -> anyhow::Result<()> {
        timed(
            "Failed to remove the heartbeat",
            sqlx::query("DELETE FROM replicas WHERE id = $1")
                .bind(replica)
                .execute(&self.pool),
        )
        .await?;
        Ok(())
    }

    /// Whether `fence`'s lease is held by its owner with its epoch and not expired (by the
    /// database's clock, like every lease statement).
    ///
    /// # Errors
    /// A database error.
    pub async fn lease_held(&self, fence: &Fence) -> anyhow::Result<bool> {
        let held = timed(
            "Failed to check a lease",
            sqlx::query(
                "SELECT 1 FROM leases
                 WHERE name = $1 AND owner = $2 AND epoch = $3 AND expires_at > now()",
            )
            .bind(&fence.name)
            .bind(&fence.owner)
            .bind(fence.epoch)
            .fetch_optional(&self.pool),
        )
        .await?;
        Ok(held.is_some())
    }

    /// Which leases are held right now, and by whom (`name`, `owner`), for tests and `check`.
    ///
    /// # Errors
    /// A database error.
    pub async fn lease_holders(&self) -> anyhow::Result<Vec<(String, String)>> {
        timed(
            "Failed to read the leases",
            sqlx::query_as(
                "SELECT name, owner FROM leases WHERE expires_at > now() AND owner != '' ORDER BY name",
            )
            .fetch_all(&self.pool),
        )
        .await
    }
}
