//! The pure helpers: checkpoint planning, UID filtering, INTERNALDATE and mailbox-name
//! encoding, backoff, error chains. The watcher itself runs against a scripted IMAP server in
//! `tests/imap_scripted.rs` and against Dovecot in `tests/imap_watcher.rs`.

use super::select::{Plan, ResetReason, ServerLast, plan_checkpoint};
use super::wire::{encode_mailbox_name, parse_internal_date, quote};
use super::*;

fn exact(last_uid: u32) -> ServerLast {
    ServerLast {
        last_uid,
        exact: true,
    }
}

fn checkpoint(uid_validity: u32, last_uid: u32) -> Checkpoint {
    Checkpoint {
        uid_validity,
        last_uid,
    }
}

#[test]
fn first_start_skips_history_or_honours_the_seed() {
    assert_eq!(
        plan_checkpoint(None, 7, exact(41), None),
        Plan::Reset {
            checkpoint: checkpoint(7, 41),
            reason: ResetReason::FirstStart
        }
    );
    assert_eq!(
        plan_checkpoint(None, 7, exact(41), Some(30)),
        Plan::Reset {
            checkpoint: checkpoint(7, 30),
            reason: ResetReason::Seeded
        }
    );
    assert_eq!(
        plan_checkpoint(None, 7, exact(41), Some(99)),
        Plan::Reset {
            checkpoint: checkpoint(7, 41),
            reason: ResetReason::SeedAhead { seed: 99 }
        }
    );
    // Without UIDNEXT the highest UID is only a lower bound: the seed wins.
    let estimate = ServerLast {
        last_uid: 41,
        exact: false,
    };
    assert_eq!(
        plan_checkpoint(None, 7, estimate, Some(99)),
        Plan::Reset {
            checkpoint: checkpoint(7, 99),
            reason: ResetReason::Seeded
        }
    );
}

#[test]
fn stored_checkpoint_is_resumed_or_reset_without_replay() {
    let stored = checkpoint(7, 30);
    assert_eq!(
        plan_checkpoint(Some(stored), 7, exact(41), Some(1)),
        Plan::Resume(30)
    );
    assert_eq!(
        plan_checkpoint(Some(stored), 8, exact(3), None),
        Plan::Reset {
            checkpoint: checkpoint(8, 3),
            reason: ResetReason::UidValidityChanged { stored }
        }
    );
    assert_eq!(
        plan_checkpoint(Some(stored), 7, exact(12), None),
        Plan::Reset {
            checkpoint: checkpoint(7, 12),
            reason: ResetReason::Ahead { stored }
        }
    );
    let estimate = ServerLast {
        last_uid: 12,
        exact: false,
    };
    assert_eq!(
        plan_checkpoint(Some(stored), 7, estimate, None),
        Plan::Resume(30)
    );
}

#[test]
fn the_star_quirk_and_duplicates_are_filtered() {
    // `UID SEARCH UID 6:*` in a folder whose highest UID is 5 answers 5.
    assert!(uids_above([5], 5).is_empty());
    assert_eq!(uids_above([9, 6, 5, 7, 9], 5), [6, 7, 9]);
    assert!(uids_above([u32::MAX], u32::MAX).is_empty());
}

#[test]
fn internal_dates_parse_with_zone_and_padding() {
    let at = |secs| Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs));
    assert_eq!(parse_internal_date("01-Jan-1970 00:00:00 +0000"), at(0));
    assert_eq!(
        parse_internal_date(" 2-Mar-2024 10:11:12 +0300"),
        at(1_709_363_472)
    );
    assert_eq!(
        parse_internal_date("29-Feb-2024 23:59:59 -0130"),
        at(1_709_256_599)
    );
    assert_eq!(parse_internal_date("31-Foo-2024 00:00:00 +0000"), None);
    assert_eq!(parse_internal_date("garbage"), None);
    assert_eq!(parse_internal_date("01-Jan-1960 00:00:00 +0000"), None);
}

#[test]
fn mailbox_names_use_modified_utf7() {
    // RFC 3501 §5.1.3's example.
    assert_eq!(
        encode_mailbox_name("~peter/mail/台北/日本語"),
        "~peter/mail/&U,BTFw-/&ZeVnLIqe-"
    );
    assert_eq!(encode_mailbox_name("INBOX"), "INBOX");
    assert_eq!(encode_mailbox_name("A&B"), "A&-B");
    assert_eq!(encode_mailbox_name("Отчёты"), "&BB4EQgRHBFEEQgRL-");
    assert_eq!(quote("a\"b\\c").unwrap(), r#""a\"b\\c""#);
    assert!(quote("a\r\nb").is_err());
}

#[test]
fn backoff_grows_with_jitter_and_never_ends() {
    let timeouts = ImapTimeouts {
        reconnect_min_delay: Duration::from_millis(100),
        reconnect_max_delay: Duration::from_millis(400),
        ..ImapTimeouts::default()
    };
    let delays: Vec<_> = reconnect_delays(&timeouts).take(50).collect();
    assert_eq!(delays.len(), 50);
    let first = delays[0];
    assert!(first >= Duration::from_millis(100) && first <= Duration::from_millis(200));
    assert!(
        delays
            .iter()
            .all(|delay| *delay <= Duration::from_millis(800))
    );
    assert!(delays[10] >= Duration::from_millis(400));
}

#[test]
fn error_chains_read_like_anyhow() {
    let error = SessionError::Auth {
        mechanism: "LOGIN",
        source: AuthError::Rejected("[AUTHENTICATIONFAILED] nope".into()),
    };
    assert_eq!(
        error_chain(&error),
        "authentication failed (LOGIN): the server rejected the credentials: \
         [AUTHENTICATIONFAILED] nope"
    );
}
