//! Command plumbing under every step of a session: why a session ended ([`SessionError`]),
//! network waits bounded by a timeout and the cancellation token, one reader for every tagged
//! command that fails on `NO`/`BAD`/EOF (see the parent module on why), the untagged
//! responses seen on the way ([`Notes`]), and `LOGOUT`.

use std::error::Error as StdError;
use std::future::Future;
use std::io;
use std::time::Duration;

use async_imap::imap_proto::{MailboxDatum, Response, ResponseCode, Status};
use async_imap::types::UnsolicitedResponse;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::auth::AuthError;
use super::connect::ImapSession;

/// Why a session ended. Internal: the loop only logs it and backs off.
#[derive(Debug, thiserror::Error)]
pub(super) enum SessionError {
    #[error("cancelled")]
    Cancelled,
    #[error("{step} timed out after {} s", .limit.as_secs_f64())]
    Timeout { step: &'static str, limit: Duration },
    #[error("authentication failed ({mechanism})")]
    Auth {
        mechanism: &'static str,
        #[source]
        source: AuthError,
    },
    #[error("the server ended the session with BYE during {step}: {text}")]
    Bye { step: &'static str, text: String },
    #[error("the server closed the connection (EOF) during {step}")]
    Eof { step: &'static str },
    #[error("the server refused {step}: {message}")]
    Refused { step: &'static str, message: String },
    #[error("{step} failed")]
    Failed {
        step: &'static str,
        #[source]
        source: anyhow::Error,
    },
    #[error("the message sink failed ({step})")]
    Sink {
        step: &'static str,
        #[source]
        source: anyhow::Error,
    },
}

impl SessionError {
    pub(super) fn failed(step: &'static str, source: impl Into<anyhow::Error>) -> Self {
        Self::Failed {
            step,
            source: source.into(),
        }
    }
}

/// `error: cause: cause`, like anyhow's `{:#}`.
pub(super) fn error_chain(error: &(dyn StdError + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Maps an async-imap error to a session error, telling BYE and EOF apart.
pub(super) fn imap_error(
    step: &'static str,
    error: async_imap::error::Error,
    bye: Option<String>,
) -> SessionError {
    use async_imap::error::Error;
    if let Some(text) = bye {
        return SessionError::Bye { step, text };
    }
    match error {
        Error::ConnectionLost => SessionError::Eof { step },
        Error::Io(error) => io_error(step, error),
        Error::No(message) | Error::Bad(message) => SessionError::Refused {
            step,
            message: super::auth::server_text(&message),
        },
        other => SessionError::failed(step, other),
    }
}

/// `Handle::init` reports EOF before the `+` continuation as an empty `ConnectionRefused`.
pub(super) fn idle_init_error(
    error: async_imap::error::Error,
    bye: Option<String>,
) -> SessionError {
    match error {
        async_imap::error::Error::Io(io_error)
            if bye.is_none()
                && io_error.kind() == io::ErrorKind::ConnectionRefused
                && io_error.to_string().is_empty() =>
        {
            SessionError::Eof { step: "IDLE" }
        }
        other => imap_error("IDLE", other, bye),
    }
}

pub(super) fn io_error(step: &'static str, error: io::Error) -> SessionError {
    match error.kind() {
        io::ErrorKind::UnexpectedEof => SessionError::Eof { step },
        // async-imap turns an untagged BYE inside SELECT/EXAMINE into this.
        io::ErrorKind::Other if error.to_string().starts_with("status: Bye") => SessionError::Bye {
            step,
            text: error.to_string(),
        },
        _ => SessionError::failed(step, error),
    }
}

/// Races `future` against `cancel` and `limit`.
pub(super) async fn bounded<F: Future>(
    cancel: &CancellationToken,
    limit: Duration,
    step: &'static str,
    future: F,
) -> Result<F::Output, SessionError> {
    tokio::select! {
        biased;
        () = cancel.cancelled() => Err(SessionError::Cancelled),
        output = tokio::time::timeout(limit, future) => {
            output.map_err(|_elapsed| SessionError::Timeout { step, limit })
        }
    }
}

/// Races a local (non-network) future against `cancel`.
pub(super) async fn cancellable<F: Future>(
    cancel: &CancellationToken,
    future: F,
) -> Result<F::Output, SessionError> {
    tokio::select! {
        biased;
        () = cancel.cancelled() => Err(SessionError::Cancelled),
        output = future => Ok(output),
    }
}

/// What the untagged responses said while commands ran.
#[derive(Debug, Default)]
pub(super) struct Notes {
    /// The message count (EXISTS, decremented by EXPUNGE); `None` until the server says.
    pub(super) exists: Option<u32>,
    /// UIDVALIDITY from the last SELECT.
    pub(super) uid_validity: Option<u32>,
    /// An EXISTS raised the count (or came while the count was unknown): search again.
    pub(super) new_mail: bool,
    /// The text of an untagged BYE (RFC 3501 §7.1.5): the server is closing the connection.
    pub(super) bye: Option<String>,
}

impl Notes {
    pub(super) fn absorb(&mut self, response: &Response<'_>) {
        match response {
            Response::MailboxData(MailboxDatum::Exists(count)) => self.exists_now(*count),
            Response::Expunge(_) => self.exists = self.exists.map(|n| n.saturating_sub(1)),
            Response::Data {
                status: Status::Bye,
                outcome,
            } => {
                let text = outcome.information.as_deref().unwrap_or_default();
                self.bye = Some(text.to_owned());
            }
            Response::Data {
                status: Status::Ok,
                outcome,
            } => {
                if let Some(ResponseCode::UidValidity(value)) = outcome.code {
                    self.uid_validity = Some(value);
                }
            }
            _ => {}
        }
    }

    pub(super) fn absorb_unsolicited(&mut self, response: UnsolicitedResponse) {
        match response {
            UnsolicitedResponse::Exists(count) => self.exists_now(count),
            UnsolicitedResponse::Expunge(_) => {
                self.exists = self.exists.map(|n| n.saturating_sub(1));
            }
            UnsolicitedResponse::Other(data) => self.absorb(data.parsed()),
            _ => {}
        }
    }

    pub(super) fn exists_now(&mut self, count: u32) {
        if self.exists.is_none_or(|old| count > old) {
            self.new_mail = true;
        }
        self.exists = Some(count);
    }

    pub(super) fn check_bye(&mut self, step: &'static str) -> Result<(), SessionError> {
        match self.bye.take() {
            Some(text) => Err(SessionError::Bye { step, text }),
            None => Ok(()),
        }
    }
}

/// Moves everything async-imap parked in its unsolicited channel into `notes`.
pub(super) fn drain(notes: &mut Notes, next: &mut dyn FnMut() -> Option<UnsolicitedResponse>) {
    while let Some(response) = next() {
        notes.absorb_unsolicited(response);
    }
}

/// A BYE parked in the unsolicited channel, if any (it explains a following EOF).
pub(super) fn take_bye(next: &mut dyn FnMut() -> Option<UnsolicitedResponse>) -> Option<String> {
    let mut notes = Notes::default();
    drain(&mut notes, next);
    notes.bye
}

/// Sends `command` and reads every response up to its tagged completion, each read bounded by
/// `limit`. Untagged EXISTS, EXPUNGE, BYE and UIDVALIDITY go to `notes`, everything else to
/// `on_data`.
///
/// # Errors
///
/// `Refused` on a tagged `NO`/`BAD`, `Eof`/`Bye` when the connection ends first, `Timeout`,
/// `Cancelled`.
pub(super) async fn command(
    session: &mut ImapSession,
    cancel: &CancellationToken,
    limit: Duration,
    step: &'static str,
    command: &str,
    notes: &mut Notes,
    mut on_data: impl FnMut(&Response<'_>),
) -> Result<(), SessionError> {
    drain(notes, &mut || session.unsolicited_responses.try_recv().ok());
    let tag = bounded(cancel, limit, step, session.run_command(command))
        .await?
        .map_err(|error| imap_error(step, error, notes.bye.take()))?;
    loop {
        let response = bounded(cancel, limit, step, session.read_response())
            .await?
            .map_err(|error| match notes.bye.take() {
                Some(text) => SessionError::Bye { step, text },
                None => io_error(step, error),
            })?;
        let Some(response) = response else {
            return Err(match notes.bye.take() {
                Some(text) => SessionError::Bye { step, text },
                None => SessionError::Eof { step },
            });
        };
        match response.parsed() {
            Response::Done {
                tag: done,
                status,
                outcome,
            } if *done == tag => {
                let text = outcome.information.as_deref().unwrap_or_default();
                return match status {
                    Status::Ok => Ok(()),
                    _ => Err(SessionError::Refused {
                        step,
                        message: format!("{status:?} {text}"),
                    }),
                };
            }
            other => {
                notes.absorb(other);
                on_data(other);
            }
        }
    }
}

/// `LOGOUT` (RFC 3501 §6.1.3), best effort within `limit`.
pub(super) async fn logout(session: &mut ImapSession, limit: Duration, notes: &mut Notes) {
    let never = CancellationToken::new();
    match command(session, &never, limit, "LOGOUT", "LOGOUT", notes, |_| {}).await {
        Ok(()) => debug!("Logged out."),
        Err(error) => {
            debug!(error = %error_chain(&error), "LOGOUT failed; dropping the connection.")
        }
    }
}
