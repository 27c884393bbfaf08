//! The relay end to end: a real Dovecot, the fake SeaTable and Telegram servers, and
//! `report-relay run` (in process, or the binary for the crash test).
//!
//! Most tests are one row of a table: a [`Case`] names who is in the base, what is arranged
//! before the relay starts and the [`Step`]s once it is ready (deliver a fixture, await sends,
//! kick, restart, an outage); [`Case::run`] plays it and the test checks what came out.

mod support;

use std::ops::Deref;
use std::time::Duration;

use support::seatable::Outage;
use support::stack::{ADDRESS, InProcess, Stack, Tuning, fixture, run_cli};
use support::telegram::{Call, Fault, FaultRule, FileSource};

const WAIT: Duration = Duration::from_secs(60);

const ANN: i64 = 111_222_333;
const BOB: i64 = 222_333_444;
const SALES_GROUP: i64 = -1_001_987_654_321;

fn uploads_and_file_id_sends(stack: &Stack, sha256: &str) -> (usize, usize) {
    let mut uploads = 0;
    let mut by_id = 0;
    for call in stack.telegram.calls() {
        if !call.is_ok() {
            continue;
        }
        for file in &call.files {
            if file.sha256.as_deref() != Some(sha256) {
                continue;
            }
            match file.source {
                FileSource::Upload { .. } => uploads += 1,
                FileSource::FileId(_) => by_id += 1,
            }
        }
    }
    (uploads, by_id)
}

/// The methods of the successful sends to `chat`, in order.
fn methods(stack: &Stack, chat: i64) -> Vec<String> {
    stack
        .ok_sends_to(chat)
        .iter()
        .map(|c| c.method.clone())
        .collect()
}

/// GET /metrics of the relay listening on `base`.
async fn metrics(base: &str) -> String {
    reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

// ---------------------------------------------------------------------------------------------
// The table: the base, the arrangements, the steps
// ---------------------------------------------------------------------------------------------

/// What happens once the relay is ready, in order.
enum Step {
    /// A Superset fixture is APPENDed to the mailbox.
    Deliver(&'static str),
    /// Each chat has had at least this many successful sends (awaited).
    Sends(&'static [i64], usize),
    /// [`Step::Deliver`], then [`Step::Sends`]: the report reaches these chats.
    Relayed(&'static str, &'static [i64], usize),
    /// The relay stops gracefully.
    Stop,
    /// The relay starts again (readiness is not awaited).
    Start,
    /// /readyz lists this many mailboxes (awaited).
    Ready(usize),
    /// Dovecot ends the mailbox's session, and there was one.
    Kick,
    /// Dovecot restarts.
    RestartDovecot,
    /// SeaTable goes down.
    SeatableDown(Outage),
    /// The folder gets a new UIDVALIDITY, the session is kicked, and the watcher has caught up
    /// after the reconnect.
    NewUidValidity,
}

/// One end-to-end scenario.
struct Case {
    /// Users subscribed to the stack's mailbox: name and chat id (`None`: not registered).
    users: &'static [(&'static str, Option<i64>)],
    /// Groups bound to the mailbox: title and chat id.
    groups: &'static [(&'static str, i64)],
    /// So many registered subscribers, with chat ids from the second number on.
    subscribers: Option<(i64, i64)>,
    tuning: Tuning,
    /// Faults, chat states and cell edits before the relay first starts.
    arrange: fn(&Stack),
    /// Fixtures already in the mailbox before the relay first runs.
    old_mail: &'static [&'static str],
    /// What happens once the relay has started and is ready.
    steps: &'static [Step],
}

impl Default for Case {
    /// Ann subscribed to the mailbox, default tuning, nothing arranged, no steps.
    fn default() -> Self {
        Self {
            users: &[("Ann", Some(ANN))],
            groups: &[],
            subscribers: None,
            tuning: Tuning::default(),
            arrange: |_| {},
            old_mail: &[],
            steps: &[],
        }
    }
}

/// Plays a case that is the whole test.
async fn check(case: Case) {
    case.run().await.stop().await;
}

impl Case {
    /// Seeds the base, arranges, starts the relay, awaits readiness and plays the steps.
    async fn run(self) -> Run {
        let stack = Stack::new().await;
        let mailbox = stack.mailbox_row.clone();
        for (name, chat) in self.users {
            stack.add_user(name, *chat, &[&mailbox]);
        }
        let groups = self
            .groups
            .iter()
            .map(|(title, chat)| stack.add_group(title, Some(*chat), &[&mailbox]))
            .collect();
        let subscribers = self
            .subscribers
            .map(|(count, first)| stack.add_subscribers(count, first))
            .unwrap_or_default();
        (self.arrange)(&stack);
        for name in self.old_mail {
            stack.deliver(&fixture(name)).await;
        }
        let relay = stack.start(&self.tuning);
        stack.wait_ready(1).await;
        let mut run = Run {
            stack,
            relay: Some(relay),
            tuning: self.tuning,
            groups,
            subscribers,
            calls: Vec::new(),
        };
        for step in self.steps {
            run.step(step).await;
        }
        run
    }
}

/// A scenario in progress: the stack and the relay running on it.
struct Run {
    stack: Stack,
    relay: Option<InProcess>,
    tuning: Tuning,
    /// The t_chats rows of [`Case::groups`], in order.
    groups: Vec<String>,
    /// The chat ids of [`Case::subscribers`].
    subscribers: Vec<i64>,
    /// All calls at the moment the last [`Step::Sends`] was satisfied.
    calls: Vec<Call>,
}

impl Deref for Run {
    type Target = Stack;

    fn deref(&self) -> &Stack {
        &self.stack
    }
}

impl Run {
    async fn step(&mut self, step: &Step) {
        let stack = &self.stack;
        match step {
            Step::Deliver(name) => {
                stack.deliver(&fixture(name)).await;
            }
            Step::Sends(chats, n) => self.calls = stack.wait_for_sends(chats, *n, WAIT).await,
            Step::Relayed(name, chats, n) => {
                stack.deliver(&fixture(name)).await;
                self.calls = stack.wait_for_sends(chats, *n, WAIT).await;
            }
            Step::Stop => self.relay.take().expect("the relay runs").stop().await,
            Step::Start => {
                assert!(self.relay.is_none(), "the relay runs already");
                self.relay = Some(stack.start(&self.tuning));
            }
            Step::Ready(mailboxes) => stack.wait_ready(*mailboxes).await,
            Step::Kick => assert!(stack.dovecot.kick(ADDRESS).await.unwrap()),
            Step::RestartDovecot => stack.dovecot.restart().await.unwrap(),
            Step::SeatableDown(outage) => stack.seatable.go_down(*outage).await,
            Step::NewUidValidity => {
                stack
                    .dovecot
                    .reset_uidvalidity(ADDRESS, "INBOX")
                    .await
                    .unwrap();
                let kicked = std::time::SystemTime::now();
                stack.dovecot.kick(ADDRESS).await.unwrap();
                // A new UIDVALIDITY makes every stored UID meaningless: the watcher relays only
                // mail that arrives after it saw the change, so wait for that reconnect.
                stack.wait_caught_up_since(kicked).await;
            }
        }
    }

    /// Stops the relay gracefully.
    async fn stop(self) {
        self.relay.expect("the relay runs").stop().await;
    }
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chart_reaches_two_users_and_a_group_with_its_caption() {
    let run = Case {
        users: &[
            ("Ann", Some(ANN)),
            ("Bob", Some(BOB)),
            ("Not registered", None),
        ],
        groups: &[("Sales team", SALES_GROUP)],
        steps: &[Step::Relayed(
            "01_chart_png_report.eml",
            &[ANN, BOB, SALES_GROUP],
            1,
        )],
        ..Case::default()
    }
    .run()
    .await;
    for chat in [ANN, BOB, SALES_GROUP] {
        let sends = run.ok_sends_to(chat);
        assert_eq!(sends.len(), 1, "chat {chat}");
        let call = &sends[0];
        assert_eq!(call.method, "sendPhoto");
        assert_eq!(call.parse_mode.as_deref(), Some("HTML"));
        assert!(
            call.caption
                .as_deref()
                .unwrap()
                .starts_with("<b>Weekly Sales: Revenue by Region</b>")
        );
        assert_eq!(
            call.files[0].file_name.as_deref(),
            Some("Weekly Sales: Revenue by Region.png")
        );
        assert_eq!(
            call.files[0].sha256.as_deref(),
            Some("51f923f1d843eb373ba3fd56bedc3636bb7d69da018c1a8169b35c1edb6125bd")
        );
    }
    let sha = "51f923f1d843eb373ba3fd56bedc3636bb7d69da018c1a8169b35c1edb6125bd";
    assert_eq!(uploads_and_file_id_sends(&run, sha), (1, 2));
    assert_eq!(run.calls.iter().filter(|c| c.is_send()).count(), 3);

    // The HTTP endpoints.
    let base = format!("http://127.0.0.1:{}", run.http_port);
    let health = reqwest::get(format!("{base}/healthz")).await.unwrap();
    assert_eq!(health.status(), 200);
    let (status, ready) = run.readyz().await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(ready["mailboxes"][0]["mailbox"], ADDRESS);
    assert_eq!(ready["mailboxes"][0]["state"], "idle");
    for line in [
        "report_relay_sends_total{method=\"sendPhoto\",result=\"ok\"} 3",
        "report_relay_reports_received_total{mailbox=\"reports@test.local\",source=\"imap\"} 1",
        "report_relay_reports_acknowledged_total{mailbox=\"reports@test.local\",outcome=\"queued\",source=\"imap\"} 1",
        "report_relay_watcher_state{mailbox=\"reports@test.local\",state=\"idle\"} 1",
        "report_relay_outbox_depth 0",
        "report_relay_append_to_send_seconds_count 3",
    ] {
        // The counters move when the relay has processed Telegram's answers, a moment after
        // the fake recorded the calls.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let metrics = metrics(&base).await;
            if metrics.contains(line) {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{line} missing from:\n{metrics}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let metrics = metrics(&base).await;
    assert!(metrics.contains("report_relay_seatable_requests_total{status=\"200\"}"));
    assert!(
        metrics
            .contains("report_relay_telegram_requests_total{method=\"sendPhoto\",status=\"ok\"} 3")
    );

    // The relay wrote its checkpoint back to the mailbox row, as decimal text.
    run.seatable
        .wait_until(|s| {
            s.row("mailboxes", &run.mailbox_row)
                .and_then(|r| r.get("last_uid").cloned())
                .is_some_and(|v| v == "1")
        })
        .await;
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_tab_dashboard_is_one_album() {
    let run = Case {
        steps: &[Step::Relayed("02_dashboard_png_3tabs.eml", &[ANN], 1)],
        ..Case::default()
    }
    .run()
    .await;
    let sends = run.ok_sends_to(ANN);
    assert_eq!(sends.len(), 1);
    assert_eq!(sends[0].method, "sendMediaGroup");
    assert_eq!(sends[0].delivered_messages(), 3);
    let names: Vec<_> = sends[0]
        .files
        .iter()
        .map(|f| f.file_name.clone().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "Daily Ops: Operations Overview (1).png",
            "Daily Ops: Operations Overview (2).png",
            "Daily Ops: Operations Overview (3).png"
        ]
    );
    assert!(sends[0].files[0].caption.is_some());
    assert!(sends[0].files[1].caption.is_none());
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pdf_to_sixty_subscribers_is_uploaded_once() {
    let run = Case {
        users: &[],
        subscribers: Some((60, 300_000_000)),
        tuning: Tuning {
            global_per_second: 200,
            ..Tuning::default()
        },
        steps: &[Step::Deliver("03_dashboard_pdf_report.eml")],
        ..Case::default()
    }
    .run()
    .await;
    run.wait_for_sends(&run.subscribers, 1, WAIT).await;
    let sha = "e80dbd8937dca43a6de7296b9cd8d649ed0c0699f5187a69c199c8d980b10284";
    assert_eq!(uploads_and_file_id_sends(&run, sha), (1, 59));
    for chat in &run.subscribers {
        assert_eq!(run.ok_sends_to(*chat).len(), 1, "chat {chat}");
    }
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_that_arrives_while_stopped_is_relayed_on_start() {
    let run = Case {
        steps: &[
            Step::Stop,
            Step::Deliver("01_chart_png_report.eml"),
            Step::Start,
            Step::Sends(&[ANN], 1),
        ],
        ..Case::default()
    }
    .run()
    .await;
    assert_eq!(run.ok_sends_to(ANN).len(), 1);
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_keep_arriving_after_a_kick_and_a_dovecot_restart() {
    let run = Case {
        steps: &[
            Step::Relayed("01_chart_png_report.eml", &[ANN], 1),
            Step::Kick,
            Step::Relayed("03_dashboard_pdf_report.eml", &[ANN], 2),
            Step::RestartDovecot,
            Step::Relayed("04_chart_csv_report.eml", &[ANN], 3),
        ],
        ..Case::default()
    }
    .run()
    .await;
    assert_eq!(
        methods(&run, ANN),
        ["sendPhoto", "sendDocument", "sendDocument"]
    );
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_delays_only_its_chat_and_a_blocked_user_does_not_stop_the_others() {
    const BLOCKED: i64 = 555_666_777;
    let run = Case {
        users: &[
            ("Ann", Some(ANN)),
            ("Bob", Some(BOB)),
            ("Blocker", Some(BLOCKED)),
        ],
        arrange: |stack| {
            stack
                .telegram
                .inject(FaultRule::new(Fault::RetryAfter(3)).chat(ANN));
            stack.telegram.block_chat(BLOCKED);
        },
        steps: &[Step::Relayed("01_chart_png_report.eml", &[ANN, BOB], 1)],
        ..Case::default()
    }
    .run()
    .await;
    let calls = run.telegram.calls();
    let first_ann = calls
        .iter()
        .find(|c| c.chat_id == Some(ANN) && c.is_send())
        .unwrap();
    let bob = run.ok_sends_to(BOB).remove(0);
    let ann = run.ok_sends_to(ANN).remove(0);
    // Bob was not held up by Ann's flood wait; Ann got it after waiting retry_after.
    assert!(bob.received_at < first_ann.received_at + Duration::from_secs(2));
    assert!(ann.received_at >= first_ann.received_at + Duration::from_secs(3));
    assert_eq!(run.ok_sends_to(ANN).len(), 1);
    // The blocked user got one attempt, refused for good, never retried.
    let blocked: Vec<_> = calls
        .iter()
        .filter(|c| c.chat_id == Some(BLOCKED) && c.is_send())
        .collect();
    assert_eq!(blocked.len(), 1);
    assert_eq!(
        blocked[0].error_description(),
        Some("Forbidden: bot was blocked by the user")
    );
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migrated_group_gets_the_report_at_its_new_id_and_seatable_is_updated() {
    const OLD: i64 = -987_654_321;
    const NEW: i64 = -1_009_876_543_210;
    let run = Case {
        users: &[],
        groups: &[("Ops", OLD)],
        arrange: |stack| stack.telegram.migrate_chat(OLD, NEW),
        steps: &[Step::Relayed("01_chart_png_report.eml", &[NEW], 1)],
        ..Case::default()
    }
    .run()
    .await;
    let group = &run.groups[0];
    run.seatable
        .wait_until(|s| {
            s.row("t_chats", group)
                .and_then(|r| r.get("id_telegram_chat").cloned())
                .is_some_and(|v| v.as_str().and_then(|s| s.parse::<i64>().ok()) == Some(NEW))
        })
        .await;
    let row = run.seatable.row("t_chats", group).unwrap();
    assert_eq!(row["is_locked"], true, "the lock stays");
    assert!(run.ok_sends_to(OLD).is_empty());
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_go_out_while_seatable_is_down_after_start() {
    check(Case {
        tuning: Tuning {
            cache_ttl_secs: 1,
            reload_secs: 1,
            ..Tuning::default()
        },
        steps: &[
            Step::SeatableDown(Outage::BadGateway),
            Step::Relayed("01_chart_png_report.eml", &[ANN], 1),
        ],
        ..Case::default()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_go_out_when_seatable_is_down_at_start_with_a_persisted_snapshot() {
    check(Case {
        steps: &[
            Step::Stop,
            Step::SeatableDown(Outage::ConnectionRefused),
            Step::Start,
            Step::Ready(1),
            Step::Relayed("01_chart_png_report.eml", &[ANN], 1),
        ],
        ..Case::default()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_from_outside_allowed_senders_is_not_relayed() {
    let run = Case {
        arrange: |stack| {
            stack.seatable.update_row(
                "mailboxes",
                &stack.mailbox_row,
                serde_json::json!({"allowed_senders": "@analytics.example.com"}),
            );
        },
        ..Case::default()
    }
    .run()
    .await;

    let forged = String::from_utf8(fixture("03_dashboard_pdf_report.eml"))
        .unwrap()
        .replace(
            "From: superset@analytics.example.com",
            "From: mallory@evil.example",
        );
    let forged_uid = run.deliver(forged.as_bytes()).await;
    run.deliver(&fixture("01_chart_png_report.eml")).await;
    // Messages are acknowledged in UID order: once the later one is sent, the forged one was
    // handled, and it produced nothing.
    run.wait_for_sends(&[ANN], 1, WAIT).await;
    assert_eq!(methods(&run, ANN), ["sendPhoto"]);
    // It stays on the server.
    assert!(
        run.dovecot
            .uids(ADDRESS, "INBOX")
            .await
            .unwrap()
            .contains(&forged_uid)
    );
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mailbox_row_added_while_running_is_watched() {
    let run = Case {
        tuning: Tuning {
            reload_secs: 1,
            ..Tuning::default()
        },
        ..Case::default()
    }
    .run()
    .await;

    const SECOND: &str = "ops@test.local";
    run.dovecot.add_user(SECOND, "ops-secret").unwrap();
    let second = run.seatable.add_row(
        "mailboxes",
        serde_json::json!({"Name": "ops", "email": SECOND, "imap_password": "ops-secret"}),
    );
    run.add_user("Bob", Some(BOB), &[&second]);
    run.wait_ready(2).await;
    run.dovecot
        .append(SECOND, "INBOX", &fixture("04_chart_csv_report.eml"))
        .await
        .unwrap();
    run.wait_for_sends(&[BOB], 1, WAIT).await;
    assert!(run.ok_sends_to(ANN).is_empty());

    // Disabling the row stops its watcher.
    run.seatable
        .update_row("mailboxes", &second, serde_json::json!({"disabled": true}));
    run.wait_ready(1).await;
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_uidvalidity_replays_no_history() {
    let run = Case {
        // Old mail in the folder before the relay ever ran is not relayed either.
        old_mail: &["04_chart_csv_report.eml"],
        steps: &[
            Step::Relayed("01_chart_png_report.eml", &[ANN], 1),
            Step::NewUidValidity,
            Step::Relayed("03_dashboard_pdf_report.eml", &[ANN], 2),
        ],
        ..Case::default()
    }
    .run()
    .await;
    assert_eq!(methods(&run, ANN), ["sendPhoto", "sendDocument"]);
    let names: Vec<_> = run
        .ok_sends_to(ANN)
        .iter()
        .map(|c| c.files[0].file_name.clone().unwrap())
        .collect();
    assert_eq!(names[1], "Monthly KPIs: Executive Summary.pdf");
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_in_a_fan_out_loses_nothing_and_repeats_at_most_one_send() {
    let stack = Stack::new().await;
    let chats = stack.add_subscribers(40, 400_000_000);
    // One send in flight at a time, paced at 20 per second.
    let tuning = Tuning {
        global_per_second: 20,
        concurrency: 1,
        ..Tuning::default()
    };
    let mut child = stack.spawn_binary(&tuning);
    stack.wait_ready(1).await;
    stack.deliver(&fixture("01_chart_png_report.eml")).await;
    stack
        .telegram
        .wait_for(
            |calls| calls.iter().filter(|c| c.is_send() && c.is_ok()).count() >= 10,
            WAIT,
        )
        .await
        .unwrap();
    // SIGKILL: no chance to clean up.
    child.kill().unwrap();
    child.wait().unwrap();
    let sent_before = stack
        .telegram
        .calls()
        .iter()
        .filter(|c| c.is_send() && c.is_ok())
        .count();
    assert!(
        sent_before < chats.len(),
        "the kill came too late to test anything"
    );

    let mut child = stack.spawn_binary(&tuning);
    stack.wait_for_sends(&chats, 1, WAIT).await;
    let duplicates = stack.repeated(&chats);
    assert!(duplicates.len() <= 1, "repeated sends: {duplicates:?}");
    for chat in &chats {
        assert!(stack.ok_sends_to(*chat).len() <= 2);
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_photo_is_resent_as_a_document_and_network_errors_are_retried() {
    let run = Case {
        users: &[("Ann", Some(ANN)), ("Bob", Some(BOB))],
        arrange: |stack| {
            stack.telegram.inject(
                FaultRule::new(Fault::Api {
                    code: 400,
                    description: "Bad Request: PHOTO_INVALID_DIMENSIONS".into(),
                })
                .method("sendPhoto")
                .chat(ANN),
            );
            stack.telegram.inject(
                FaultRule::new(Fault::CloseConnection)
                    .method("sendPhoto")
                    .chat(BOB),
            );
        },
        steps: &[Step::Relayed("01_chart_png_report.eml", &[ANN, BOB], 1)],
        ..Case::default()
    }
    .run()
    .await;
    let ann = run.ok_sends_to(ANN);
    assert_eq!(ann.len(), 1);
    assert_eq!(ann[0].method, "sendDocument");
    assert_eq!(
        ann[0].files[0].file_name.as_deref(),
        Some("Weekly Sales: Revenue by Region.png")
    );
    assert!(
        ann[0]
            .caption
            .as_deref()
            .unwrap()
            .starts_with("<b>Weekly Sales")
    );
    assert_eq!(methods(&run, BOB), ["sendPhoto"]);
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_each_dependency_on_its_own_line() {
    let stack = Stack::new().await;
    let config = stack.write_config(&Tuning::default());
    let config = config.to_str().unwrap().to_owned();
    let (code, out) = tokio::task::spawn_blocking(move || run_cli(&["check", "--config", &config]))
        .await
        .unwrap();
    assert_eq!(code, 0, "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines.iter().all(|l| l.starts_with("ok ")), "{out}");
    assert!(out.contains("seatable: every table and column the relay needs exists"));
    assert!(out.contains("telegram: getMe answered @"));
    assert!(out.contains(&format!("imap {ADDRESS}: logged in as {ADDRESS}")));

    // A wrong mailbox password and a missing column are reported, with exit code 1.
    stack.seatable.update_row(
        "mailboxes",
        &stack.mailbox_row,
        serde_json::json!({"imap_password": "wrong"}),
    );
    stack.seatable.remove_column("users", "id_telegram");
    let config = stack.write_config(&Tuning::default());
    let config = config.to_str().unwrap().to_owned();
    let (code, out) = tokio::task::spawn_blocking(move || run_cli(&["check", "--config", &config]))
        .await
        .unwrap();
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("FAIL seatable:") && out.contains("table users has no column id_telegram"),
        "{out}"
    );
    assert!(out.contains(&format!("FAIL imap {ADDRESS}:")), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_to_a_mailbox_relays_once_per_content() {
    let stack = Stack::new().await;
    let mailbox = stack.mailbox_row.clone();
    stack.add_user("Ann", Some(ANN), &[&mailbox]);
    let config = stack.write_config(&Tuning::default());
    // On a shared PostgreSQL state `replay` only queues, and the replica holding `delivery`
    // sends: run one. On SQLite `replay` sends itself, and `run` must not hold the state.
    let relay = match &stack.postgres {
        Some(_) => {
            let relay = stack.start(&Tuning::default());
            stack.wait_ready(1).await;
            Some(relay)
        }
        None => None,
    };
    let eml = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/superset/02_dashboard_png_3tabs.eml");
    let args = [
        "replay".to_owned(),
        eml.to_str().unwrap().to_owned(),
        "--config".to_owned(),
        config.to_str().unwrap().to_owned(),
        "--mailbox".to_owned(),
        ADDRESS.to_owned(),
    ];
    for round in 0..2 {
        let args = args.clone();
        let (code, out) = tokio::task::spawn_blocking(move || {
            run_cli(&args.iter().map(String::as_str).collect::<Vec<_>>())
        })
        .await
        .unwrap();
        assert_eq!(code, 0, "{out}");
        if round == 0 {
            assert!(out.contains("queued, 1 sends to 1 chats"), "{out}");
        } else {
            assert!(out.contains("already relayed before"), "{out}");
        }
    }
    let sends = stack.ok_sends_to(ANN);
    assert_eq!(sends.len(), 1);
    assert_eq!(sends[0].method, "sendMediaGroup");
    if let Some(relay) = relay {
        relay.stop().await;
    }
}
