//! After login: SELECT the folder and reconcile the stored [`Checkpoint`] with the server's
//! UIDVALIDITY and UIDNEXT (RFC 3501 §2.3.1.1), deciding where catch-up starts.

use std::collections::BTreeSet;

use async_imap::imap_proto::{MailboxDatum, Response, ResponseCode, Status, StatusAttribute};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::auth::Authenticator;
use super::command::{Notes, SessionError, cancellable, command};
use super::connect::ImapSession;
use super::wire::{encode_mailbox_name, quote};
use super::{Checkpoint, MailboxWatcher, MessageSink};

/// The server's view of the highest UID in the folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ServerLast {
    /// UIDNEXT - 1, or the highest UID present when the server gave no UIDNEXT.
    pub(super) last_uid: u32,
    /// From UIDNEXT (SELECT or STATUS) rather than estimated from the messages present.
    pub(super) exact: bool,
}

/// What to do with the stored checkpoint after SELECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Plan {
    /// Keep the stored checkpoint; catch up from this UID.
    Resume(u32),
    /// Store this checkpoint first (`reset_checkpoint`).
    Reset {
        checkpoint: Checkpoint,
        reason: ResetReason,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ResetReason {
    /// No checkpoint and no seed: start at UIDNEXT-1, never replay history.
    FirstStart,
    /// No checkpoint; the row's `last_uid` seeds it.
    Seeded,
    /// No checkpoint; the seed is above UIDNEXT-1, so UIDNEXT-1 is used.
    SeedAhead { seed: u32 },
    /// The folder was recreated (RFC 3501 §2.3.1.1): start at UIDNEXT-1.
    UidValidityChanged { stored: Checkpoint },
    /// Same UIDVALIDITY but the checkpoint is at or above UIDNEXT: the server went back.
    Ahead { stored: Checkpoint },
}

/// Reconciles the stored checkpoint with the selected folder. Never replays history: every
/// reset lands on the server's UIDNEXT-1 (or the seed, when that is lower).
pub(super) fn plan_checkpoint(
    stored: Option<Checkpoint>,
    uid_validity: u32,
    server: ServerLast,
    seed: Option<u32>,
) -> Plan {
    let reset = |last_uid, reason| Plan::Reset {
        checkpoint: Checkpoint {
            uid_validity,
            last_uid,
        },
        reason,
    };
    match stored {
        None => match seed {
            None => reset(server.last_uid, ResetReason::FirstStart),
            Some(seed) if server.exact && seed > server.last_uid => {
                reset(server.last_uid, ResetReason::SeedAhead { seed })
            }
            Some(seed) => reset(seed, ResetReason::Seeded),
        },
        Some(stored) if stored.uid_validity != uid_validity => {
            reset(server.last_uid, ResetReason::UidValidityChanged { stored })
        }
        Some(stored) if server.exact && stored.last_uid > server.last_uid => {
            reset(server.last_uid, ResetReason::Ahead { stored })
        }
        Some(stored) => Plan::Resume(stored.last_uid),
    }
}

/// The UIDs strictly above `last_uid`, ascending and without duplicates. `UID SEARCH UID n:*`
/// always matches the highest UID even when it is below `n` (RFC 3501 §6.4.8, `*` is the
/// largest UID in use), so that one is dropped here.
pub(super) fn uids_above(found: impl IntoIterator<Item = u32>, last_uid: u32) -> Vec<u32> {
    found
        .into_iter()
        .filter(|&uid| uid > last_uid)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

impl<S: MessageSink, A: Authenticator> MailboxWatcher<S, A> {
    /// SELECTs the folder and reconciles the checkpoint; returns the UID to catch up from.
    pub(super) async fn select(
        &self,
        session: &mut ImapSession,
        cancel: &CancellationToken,
        notes: &mut Notes,
    ) -> Result<u32, SessionError> {
        let timeouts = self.settings.timeouts;
        let folder = quote(&encode_mailbox_name(&self.settings.folder))
            .map_err(|error| SessionError::failed("SELECT", error))?;
        let mut uid_next = None;
        command(
            session,
            cancel,
            timeouts.command,
            "SELECT",
            &format!("SELECT {folder}"),
            notes,
            |response| {
                if let Response::Data {
                    status: Status::Ok,
                    outcome,
                } = response
                    && let Some(ResponseCode::UidNext(next)) = outcome.code
                {
                    uid_next = Some(next);
                }
            },
        )
        .await?;
        // SELECT starts a new view: its EXISTS is the baseline, not news.
        notes.new_mail = false;
        let Some(uid_validity) = notes.uid_validity else {
            return Err(SessionError::failed(
                "SELECT",
                anyhow::anyhow!("the server did not report UIDVALIDITY (RFC 3501 §6.3.1)"),
            ));
        };

        // UIDNEXT is optional in SELECT (RFC 3501 §6.3.1); some servers omit it (reference §B3).
        let mut server_last = uid_next.map(|next| ServerLast {
            last_uid: next.saturating_sub(1),
            exact: true,
        });
        if server_last.is_none() {
            let mut status_next = None;
            command(
                session,
                cancel,
                timeouts.command,
                "STATUS",
                &format!("STATUS {folder} (UIDNEXT)"),
                notes,
                |response| {
                    if let Response::MailboxData(MailboxDatum::Status { status, .. }) = response {
                        for attribute in status {
                            if let StatusAttribute::UidNext(next) = attribute {
                                status_next = Some(*next);
                            }
                        }
                    }
                },
            )
            .await?;
            server_last = status_next.map(|next| ServerLast {
                last_uid: next.saturating_sub(1),
                exact: true,
            });
        }
        let server_last = match server_last {
            Some(server_last) => server_last,
            None => {
                let highest = self.highest_uid(session, cancel, notes).await?;
                debug!(
                    highest_uid = highest,
                    "The server reported no UIDNEXT; using the highest UID."
                );
                ServerLast {
                    last_uid: highest,
                    exact: false,
                }
            }
        };

        let address = self.settings.address.as_str();
        let stored = cancellable(cancel, self.sink.checkpoint(address))
            .await?
            .map_err(|source| SessionError::Sink {
                step: "checkpoint",
                source,
            })?;
        let plan = plan_checkpoint(
            stored,
            uid_validity,
            server_last,
            self.settings.seed_last_uid,
        );
        let checkpoint = match plan {
            Plan::Resume(last_uid) => {
                debug!(
                    uid_validity,
                    last_uid, "Resuming from the stored checkpoint."
                );
                return Ok(last_uid);
            }
            Plan::Reset { checkpoint, reason } => {
                match reason {
                    ResetReason::FirstStart => info!(
                        uid_validity,
                        last_uid = checkpoint.last_uid,
                        "First start: existing mail is skipped; relaying mail from now on."
                    ),
                    ResetReason::Seeded => info!(
                        uid_validity,
                        last_uid = checkpoint.last_uid,
                        "First start: continuing from the row's last_uid."
                    ),
                    ResetReason::SeedAhead { seed } => warn!(
                        seed,
                        server_last_uid = checkpoint.last_uid,
                        "The row's last_uid is above the folder's highest UID; starting from the folder's."
                    ),
                    ResetReason::UidValidityChanged { stored } => error!(
                        stored_uid_validity = stored.uid_validity,
                        stored_last_uid = stored.last_uid,
                        uid_validity,
                        last_uid = checkpoint.last_uid,
                        "UIDVALIDITY changed: the folder was recreated. Mail already in it is not \
                         relayed (no history replay); relaying new mail from now on."
                    ),
                    ResetReason::Ahead { stored } => warn!(
                        stored_last_uid = stored.last_uid,
                        server_last_uid = checkpoint.last_uid,
                        "The checkpoint is above the server's UIDNEXT with the same UIDVALIDITY; \
                         moving it back so new mail is not skipped."
                    ),
                }
                checkpoint
            }
        };
        cancellable(cancel, self.sink.reset_checkpoint(address, checkpoint))
            .await?
            .map_err(|source| SessionError::Sink {
                step: "reset_checkpoint",
                source,
            })?;
        Ok(checkpoint.last_uid)
    }

    /// The highest UID in the folder (0 when empty): the UIDNEXT fallback.
    pub(super) async fn highest_uid(
        &self,
        session: &mut ImapSession,
        cancel: &CancellationToken,
        notes: &mut Notes,
    ) -> Result<u32, SessionError> {
        // Some servers reject `UID SEARCH UID *` on an empty folder (reference §B6, Mail.ru).
        if notes.exists == Some(0) {
            return Ok(0);
        }
        let mut highest = 0;
        command(
            session,
            cancel,
            self.settings.timeouts.command,
            "UID SEARCH",
            "UID SEARCH UID *",
            notes,
            |response| {
                if let Response::MailboxData(MailboxDatum::Search(uids)) = response {
                    highest = uids.iter().copied().fold(highest, u32::max);
                }
            },
        )
        .await?;
        Ok(highest)
    }
}
