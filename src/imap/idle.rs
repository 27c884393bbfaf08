//! Between catch-ups: one IDLE round (RFC 2177), ended by server data, silence or the renew cap.

use std::time::Duration;

use async_imap::extensions::idle::IdleResponse;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::auth::Authenticator;
use super::command::{
    Notes, SessionError, bounded, drain, idle_init_error, imap_error, logout, take_bye,
};
use super::connect::ImapSession;
use super::{MailboxWatcher, MessageSink, WatcherState};

impl<S: MessageSink, A: Authenticator> MailboxWatcher<S, A> {
    /// One IDLE round (RFC 2177): ends on any server data, after `idle_keepalive` of silence,
    /// or at the `idle_renew_secs` cap, and gives the session back after `DONE`.
    pub(super) async fn idle_round(
        &self,
        session: ImapSession,
        cancel: &CancellationToken,
        notes: &mut Notes,
    ) -> Result<ImapSession, SessionError> {
        let timeouts = self.settings.timeouts;
        let unsolicited = session.unsolicited_responses.clone();
        let mut next_unsolicited = || unsolicited.try_recv().ok();
        drain(notes, &mut next_unsolicited);
        notes.check_bye("IDLE")?;
        if notes.new_mail {
            return Ok(session);
        }

        // The steps around the wait run boxed: this future is what an idle watcher holds (see
        // `MailboxWatcher::session`), so only the wait itself stays inline.
        let mut handle = session.idle();
        Box::pin(bounded(cancel, timeouts.command, "IDLE", handle.init()))
            .await?
            .map_err(|error| idle_init_error(error, take_bye(&mut next_unsolicited)))?;
        self.set_state(WatcherState::Idle);

        // `init` puts anything that arrives before the `+` continuation into the unsolicited
        // channel, not into `wait` (reference §B3): an EXISTS there must end the round now.
        drain(notes, &mut next_unsolicited);
        notes.check_bye("IDLE")?;
        if notes.new_mail {
            debug!("New mail was announced before IDLE started; catching up.");
        } else {
            let renew = Duration::from_secs(self.settings.idle_renew_secs.max(1));
            let outcome = {
                let (wait, _stop) = handle.wait_with_timeout(timeouts.idle_keepalive);
                tokio::select! {
                    biased;
                    () = cancel.cancelled() => None,
                    outcome = tokio::time::timeout(renew, wait) => Some(outcome),
                }
            };
            let Some(outcome) = outcome else {
                // Cancelled while idling: end IDLE and log out, within the logout budget.
                let _ = Box::pin(tokio::time::timeout(timeouts.logout, async {
                    if let Ok(mut session) = handle.done().await {
                        logout(&mut session, timeouts.logout, notes).await;
                    }
                }))
                .await;
                return Err(SessionError::Cancelled);
            };
            match outcome {
                Err(_elapsed) => {
                    debug!(renew_secs = self.settings.idle_renew_secs, "Renewing IDLE.")
                }
                Ok(Ok(IdleResponse::Timeout)) => debug!(
                    quiet_secs = timeouts.idle_keepalive.as_secs_f64(),
                    "No data from the server while idling; checking the connection."
                ),
                Ok(Ok(IdleResponse::NewData(data))) => {
                    notes.absorb(data.parsed());
                    notes.check_bye("IDLE")?;
                    debug!("Woken up by the server.");
                }
                // async-imap reports EOF during IDLE as ManualInterrupt; we never interrupt.
                Ok(Ok(IdleResponse::ManualInterrupt)) => {
                    return Err(match take_bye(&mut next_unsolicited) {
                        Some(text) => SessionError::Bye { step: "IDLE", text },
                        None => SessionError::Eof { step: "IDLE" },
                    });
                }
                Ok(Err(error)) => {
                    return Err(imap_error("IDLE", error, take_bye(&mut next_unsolicited)));
                }
            }
        }

        let session = Box::pin(bounded(cancel, timeouts.done, "DONE", handle.done()))
            .await?
            .map_err(|error| imap_error("DONE", error, take_bye(&mut next_unsolicited)))?;
        drain(notes, &mut next_unsolicited);
        notes.check_bye("DONE")?;
        // IDLE is a hint: the caller searches again whatever woke us.
        Ok(session)
    }
}
