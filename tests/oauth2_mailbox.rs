//! OAuth2 mailboxes end to end: the relay logs in to a real Dovecot whose `passdb oauth2`
//! checks every bearer token against the fake authorization server's introspection endpoint
//! (`tests/support/oauth2/`), gets its tokens from that server's token endpoint, and relays a
//! report to the fake Telegram. Covers each SASL mechanism and grant, expiry, rotation across a
//! restart, `invalid_grant`, `oauth login` (device flow and loopback redirect), `check`, and
//! that no token or secret reaches the logs.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use support::dovecot::{DovecotOptions, message};
use support::oauth2::{DEFAULT_SCOPE, DeviceOutcome, Endpoint, FakeOAuth2, TokenRequest};
use support::stack::{ADDRESS, InProcess, Stack, Tuning, run_cli};

/// The relay's OAuth client.
const CLIENT: &str = "report-relay-app";
/// Its client secret.
const SECRET: &str = "client-secret-6f1d2e9a";
/// The Telegram user that receives the mailbox's reports.
const ANN: i64 = 4242;
/// How long a test waits for a report.
const WAIT: Duration = Duration::from_secs(60);

/// The fake authorization server, and a stack whose Dovecot checks tokens against it and whose
/// one mailbox goes to [`ANN`].
async fn oauth_stack() -> (FakeOAuth2, Stack) {
    let idp = FakeOAuth2::start().await;
    idp.add_client(CLIENT, Some(SECRET));
    let stack = Stack::with_dovecot(DovecotOptions {
        oauth2_introspection_url: Some(idp.introspection_url()),
        ..DovecotOptions::default()
    })
    .await;
    stack.add_user("Ann", Some(ANN), &[stack.mailbox_row.as_str()]);
    (idp, stack)
}

/// The mailbox's `oauth2:` account entry for the fake: `lines` are the keys beyond the
/// provider, client and endpoints (each `key: value`).
fn account(idp: &FakeOAuth2, lines: &[String]) -> String {
    let mut text = format!(
        "      oauth2:\n        provider: custom\n        client_id: {CLIENT}\n        \
         scope: \"{DEFAULT_SCOPE}\"\n        token_url: \"{}\"\n        \
         device_authorization_url: \"{}\"\n",
        idp.token_url(),
        idp.device_authorization_url()
    );
    for line in lines {
        text.push_str(&format!("        {line}\n"));
    }
    text
}

fn tuning(account: String) -> Tuning {
    Tuning {
        account: Some(account),
        ..Tuning::default()
    }
}

/// The usual refresh-token account with `mechanism`.
fn refresh_account(idp: &FakeOAuth2, refresh_token: &str, mechanism: &str) -> String {
    account(
        idp,
        &[
            format!("client_secret: \"{SECRET}\""),
            format!("refresh_token: \"{refresh_token}\""),
            format!("mechanism: {mechanism}"),
        ],
    )
}

fn token_requests(idp: &FakeOAuth2, grant_type: &str) -> Vec<TokenRequest> {
    idp.requests()
        .into_iter()
        .filter(|r| r.endpoint == Endpoint::Token && r.grant_type.as_deref() == Some(grant_type))
        .collect()
}

/// Starts the relay in-process, waits until its mailbox caught up, relays `subject` and waits
/// for Ann to get it (`n` reports in all).
async fn start_and_relay(stack: &Stack, tuning: &Tuning, subject: &str, n: usize) -> InProcess {
    let relay = stack.start(tuning);
    stack.wait_ready(1).await;
    relay_one(stack, subject, n).await;
    relay
}

async fn relay_one(stack: &Stack, subject: &str, n: usize) {
    stack.deliver(&message(subject)).await;
    stack.wait_for_sends(&[ANN], n, WAIT).await;
}

/// Waits until the first access token the relay got has expired, then has Dovecot kick the
/// session and waits until the watcher logged in again and caught up.
async fn expire_and_kick(idp: &FakeOAuth2, stack: &Stack) {
    let first = token_requests(idp, "refresh_token")[0]
        .access_token_issued
        .clone()
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while idp.is_access_token_active(&first) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the token never expired"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let kicked = std::time::SystemTime::now();
    assert!(stack.dovecot.kick(ADDRESS).await.unwrap());
    stack.wait_caught_up_since(kicked).await;
}

struct Mechanism {
    config: &'static str,
    dovecot: &'static str,
}

async fn login_and_delivery(mechanism: Mechanism) {
    let (idp, stack) = oauth_stack().await;
    let refresh = idp.issue_refresh_token(CLIENT, ADDRESS);
    let relay = start_and_relay(
        &stack,
        &tuning(refresh_account(&idp, &refresh, mechanism.config)),
        "Via OAuth2",
        1,
    )
    .await;
    let refreshes = token_requests(&idp, "refresh_token");
    assert_eq!(refreshes.len(), 1, "{refreshes:?}");
    assert!(refreshes[0].is_ok());
    assert_eq!(refreshes[0].refresh_token_used.as_deref(), Some(&*refresh));
    let access = refreshes[0].access_token_issued.clone().unwrap();
    assert!(
        idp.introspection_log()
            .iter()
            .any(|i| i.token.as_deref() == Some(&*access) && i.active),
        "Dovecot checked the relay's token"
    );
    let log = stack.dovecot.read_log();
    assert!(
        log.contains(&format!("method={}", mechanism.dovecot)),
        "{log}"
    );
    relay.stop().await;
}

#[tokio::test]
async fn xoauth2_logs_in_and_relays() {
    login_and_delivery(Mechanism {
        config: "xoauth2",
        dovecot: "XOAUTH2",
    })
    .await;
}

#[tokio::test]
async fn oauthbearer_logs_in_and_relays() {
    login_and_delivery(Mechanism {
        config: "oauthbearer",
        dovecot: "OAUTHBEARER",
    })
    .await;
}

/// A mailbox row names its credentials with `imap_account`: an `imap.accounts` entry that is
/// not its address, so the client secret stays in the config.
#[tokio::test]
async fn a_row_names_its_oauth2_account_with_imap_account() {
    let (idp, stack) = oauth_stack().await;
    let refresh = idp.issue_refresh_token(CLIENT, ADDRESS);
    stack.seatable.update_row(
        "mailboxes",
        &stack.mailbox_row,
        serde_json::json!({"imap_account": "bi-app"}),
    );
    let tuning = tuning(refresh_account(&idp, &refresh, "xoauth2"));
    let text = std::fs::read_to_string(stack.write_config(&tuning))
        .unwrap()
        .replace(&format!("\"{ADDRESS}\":"), "\"bi-app\":");
    assert!(text.contains("\"bi-app\":"), "{text}");
    let config = stack.dir.path().join("named-account.yaml");
    std::fs::write(&config, text).unwrap();
    let mut relay = stack.spawn_with_config(&config);
    stack.wait_ready(1).await;
    relay_one(&stack, "Named account", 1).await;
    assert_eq!(token_requests(&idp, "refresh_token").len(), 1);
    relay.kill().unwrap();
    relay.wait().unwrap();
}

/// Microsoft's app-only grant and Google's service accounts: no refresh token at all.
#[tokio::test]
async fn client_credentials_and_service_accounts_log_in_without_a_refresh_token() {
    let (idp, stack) = oauth_stack().await;
    idp.add_app("daemon-app", "daemon-secret", ADDRESS);
    let app = account(
        &idp,
        &[
            "client_secret: daemon-secret".into(),
            "grant: client_credentials".into(),
        ],
    )
    .replace(CLIENT, "daemon-app");
    let relay = start_and_relay(&stack, &tuning(app), "App only", 1).await;
    relay.stop().await;
    let granted = token_requests(&idp, "client_credentials");
    assert!(granted.iter().all(TokenRequest::is_ok), "{granted:?}");
    assert!(!granted.is_empty());

    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/oauth2");
    let key: Value =
        serde_json::from_slice(&std::fs::read(fixtures.join("service-account.json")).unwrap())
            .unwrap();
    idp.add_service_account(
        key["client_email"].as_str().unwrap(),
        &std::fs::read(fixtures.join("service-account.pub.der")).unwrap(),
    );
    let service = account(
        &idp,
        &[
            "grant: service_account".into(),
            format!(
                "key_file: \"{}\"",
                fixtures.join("service-account.json").display()
            ),
        ],
    );
    let relay = start_and_relay(&stack, &tuning(service), "Service account", 2).await;
    relay.stop().await;
    let asserted = token_requests(&idp, "urn:ietf:params:oauth:grant-type:jwt-bearer");
    assert!(!asserted.is_empty());
    assert!(asserted.iter().all(TokenRequest::is_ok), "{asserted:?}");
    assert_eq!(
        asserted[0].username.as_deref(),
        Some(ADDRESS),
        "sub = the mailbox"
    );
}

/// An access token that expired while the session was up; then Dovecot kicks the session: the
/// watcher reconnects with a refreshed token and the next report arrives.
#[tokio::test]
async fn an_expired_token_is_refreshed_when_the_watcher_logs_in_again() {
    let (idp, stack) = oauth_stack().await;
    idp.set_access_token_lifetime(2);
    let refresh = idp.issue_refresh_token(CLIENT, ADDRESS);
    let relay = start_and_relay(
        &stack,
        &tuning(refresh_account(&idp, &refresh, "xoauth2")),
        "Before expiry",
        1,
    )
    .await;
    expire_and_kick(&idp, &stack).await;
    relay_one(&stack, "After expiry", 2).await;
    let refreshes = token_requests(&idp, "refresh_token");
    assert!(refreshes.iter().all(TokenRequest::is_ok), "{refreshes:?}");
    // One for the first login, one per later login at most (every token lives 2 s).
    assert!(
        (2..=4).contains(&refreshes.len()),
        "refreshes: {refreshes:?}"
    );
    relay.stop().await;
}

/// With rotation, the first refresh revokes the config's refresh token; the relay stored the
/// new one, and a restart with the same (now revoked) config uses the stored one.
#[tokio::test]
async fn a_rotated_refresh_token_is_used_after_a_restart_whose_config_holds_the_revoked_one() {
    let (idp, stack) = oauth_stack().await;
    idp.set_rotation(true);
    let original = idp.issue_refresh_token(CLIENT, ADDRESS);
    let tuning = tuning(refresh_account(&idp, &original, "xoauth2"));
    let relay = start_and_relay(&stack, &tuning, "Before the restart", 1).await;
    relay.stop().await;
    assert!(!idp.is_refresh_token_valid(&original), "rotated away");
    let rotated = token_requests(&idp, "refresh_token")[0]
        .refresh_token_issued
        .clone()
        .unwrap();

    let relay = start_and_relay(&stack, &tuning, "After the restart", 2).await;
    let refreshes = token_requests(&idp, "refresh_token");
    assert!(refreshes.iter().all(TokenRequest::is_ok), "{refreshes:?}");
    assert_eq!(
        refreshes[1].refresh_token_used.as_deref(),
        Some(&*rotated),
        "the stored token, not the config's"
    );
    relay.stop().await;
}

/// A revoked refresh token: the mailbox backs off with a message naming `invalid_grant` and
/// the command to run, without asking the token endpoint again and again; `oauth login` (the
/// device flow, with `authorization_pending` and a slow_down) stores a new one beside the
/// running relay, which then logs in without a restart.
#[tokio::test]
async fn invalid_grant_backs_off_until_oauth_login_stores_a_new_refresh_token() {
    let (idp, stack) = oauth_stack().await;
    let revoked = idp.issue_refresh_token(CLIENT, ADDRESS);
    idp.revoke_refresh_token(&revoked);
    let tuning = tuning(refresh_account(&idp, &revoked, "xoauth2"));
    let relay = stack.start(&tuning);
    let body = stack
        .wait_readyz("the mailbox did not back off", |_, body| {
            body["mailboxes"][0]["state"] == "backoff"
        })
        .await;
    let error = body["mailboxes"][0]["last_error"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(error.contains("invalid_grant"), "{error}");
    assert!(error.contains("report-relay oauth login"), "{error}");
    assert!(
        !error.contains(&revoked) && !error.contains(SECRET),
        "{error}"
    );
    // The watcher retries its login (2 s, then 4 s); the refused token is not sent again.
    tokio::time::sleep(Duration::from_secs(7)).await;
    let refreshes = token_requests(&idp, "refresh_token");
    assert_eq!(refreshes.len(), 1, "{refreshes:?}");
    assert_eq!(refreshes[0].outcome, "invalid_grant");

    idp.set_device_interval(1);
    idp.script_device_flow(
        2,
        DeviceOutcome::Approve {
            username: ADDRESS.into(),
        },
    );
    let config = stack.write_config(&tuning);
    let args = [
        "oauth",
        "login",
        "--config",
        config.to_str().unwrap(),
        "--mailbox",
        ADDRESS,
    ]
    .map(str::to_owned);
    let (code, out) = tokio::task::spawn_blocking(move || {
        run_cli(&args.iter().map(String::as_str).collect::<Vec<_>>())
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!(
            "open {} and enter the code",
            idp.verification_uri()
        )),
        "{out}"
    );
    assert!(out.contains("Stored the refresh token"), "{out}");
    eprintln!("oauth login printed:\n{out}");
    let polls: Vec<TokenRequest> =
        token_requests(&idp, "urn:ietf:params:oauth:grant-type:device_code");
    let outcomes: Vec<&str> = polls.iter().map(|p| p.outcome.as_str()).collect();
    assert_eq!(
        outcomes,
        ["authorization_pending", "authorization_pending", "ok"],
        "{polls:?}"
    );
    // Every poll waited the interval (1 s), the first one too (RFC 8628 §3.5).
    for pair in polls.windows(2) {
        assert!(pair[1].received_at - pair[0].received_at >= Duration::from_millis(950));
    }

    // The running relay takes the new refresh token at its next login.
    stack
        .wait_readyz(
            "the mailbox did not log in with the new token",
            |_, body| body["mailboxes"][0]["state"] == "idle",
        )
        .await;
    relay_one(&stack, "After oauth login", 1).await;
    relay.stop().await;
}

/// The device flow's other ends, and a server that asks to slow down.
#[tokio::test]
async fn oauth_login_honours_slow_down_and_names_a_denial_or_an_expiry() {
    let (idp, stack) = oauth_stack().await;
    let tuning = tuning(account(&idp, &[format!("client_secret: \"{SECRET}\"")]));
    let config = stack.write_config(&tuning);
    let login = move || {
        let args = [
            "oauth",
            "login",
            "--config",
            config.to_str().unwrap(),
            "--mailbox",
            ADDRESS,
        ]
        .map(str::to_owned);
        tokio::task::spawn_blocking(move || {
            run_cli(&args.iter().map(String::as_str).collect::<Vec<_>>())
        })
    };
    idp.set_device_interval(1);
    idp.script_device_flow(0, DeviceOutcome::Deny);
    let (code, out) = login().await.unwrap();
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("access_denied"), "{out}");

    idp.script_device_flow(0, DeviceOutcome::Expire);
    let (code, out) = login().await.unwrap();
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("expired_token"), "{out}");

    // A server under load answers slow_down to a poll that kept the interval (RFC 8628 §3.5
    // lets it): the next poll comes 5 s later.
    idp.script_slow_down(1);
    // Google's shape of the answer this time: `verification_url`.
    idp.set_google_device_response(true);
    idp.script_device_flow(
        1,
        DeviceOutcome::Approve {
            username: ADDRESS.into(),
        },
    );
    let (code, out) = login().await.unwrap();
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&idp.verification_uri()), "{out}");
    let polls = token_requests(&idp, "urn:ietf:params:oauth:grant-type:device_code");
    let last: Vec<&TokenRequest> = polls.iter().rev().take(3).rev().collect();
    let outcomes: Vec<&str> = last.iter().map(|p| p.outcome.as_str()).collect();
    assert_eq!(
        outcomes,
        ["slow_down", "authorization_pending", "ok"],
        "{polls:?}"
    );
    assert!(
        last[1].received_at - last[0].received_at >= Duration::from_millis(5900),
        "slow_down adds 5 s to the interval: {polls:?}"
    );
}

/// Where the person's browser runs in a loopback login.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Browser {
    /// On the relay's host (or with the port forwarded): the redirect reaches the command.
    SameMachine,
    /// Elsewhere: the redirect fails there, and the person pastes its address.
    Elsewhere,
}

/// Google's way: the loopback redirect flow with PKCE. The test plays the browser: it opens
/// the printed URL, the fake authorizes at once and redirects to the command's listener, or
/// the test pastes the redirect's address into the command's standard input.
async fn loopback_login(browser: Browser) {
    let (idp, stack) = oauth_stack().await;
    idp.set_authorize_username(Some(ADDRESS));
    let loopback = format!(
        "      oauth2:\n        provider: custom\n        client_id: {CLIENT}\n        \
         scope: \"{DEFAULT_SCOPE}\"\n        client_secret: \"{SECRET}\"\n        \
         token_url: \"{}\"\n        authorization_url: \"{}\"\n",
        idp.token_url(),
        idp.authorization_url()
    );
    let tuning = tuning(loopback);
    let config = stack.write_config(&tuning);
    let mut child = Command::new(env!("CARGO_BIN_EXE_report-relay"))
        .args(["oauth", "login", "--config"])
        .arg(&config)
        .args(["--mailbox", ADDRESS])
        .env("RUST_LOG", "error")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    // Read every line (the command must not find its stdout closed), handing the URL over.
    let stdout = child.stdout.take().unwrap();
    let prefix = idp_prefix(&config);
    let (found, url) = tokio::sync::oneshot::channel();
    let reader = tokio::task::spawn_blocking(move || {
        let mut found = Some(found);
        let mut printed = String::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.starts_with(&prefix)
                && let Some(found) = found.take()
            {
                let _ = found.send(line.clone());
            }
            printed.push_str(&line);
            printed.push('\n');
        }
        printed
    });
    let url = tokio::time::timeout(WAIT, url)
        .await
        .expect("the command prints the authorization URL")
        .unwrap();
    assert!(url.contains("code_challenge_method=S256"), "{url}");
    match browser {
        Browser::SameMachine => {
            let page = reqwest::get(&url).await.unwrap();
            assert_eq!(page.status(), 200);
            assert!(page.text().await.unwrap().contains("signed in"));
        }
        Browser::Elsewhere => {
            let no_redirects = reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap();
            let answer = no_redirects.get(&url).send().await.unwrap();
            assert_eq!(answer.status(), 302);
            let location = answer.headers()["location"].to_str().unwrap().to_owned();
            let mut stdin = child.stdin.take().unwrap();
            use std::io::Write;
            writeln!(stdin, "{location}").unwrap();
        }
    }
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    let printed = reader.await.unwrap();
    assert!(status.success(), "{printed}");
    assert!(printed.contains("Stored the refresh token"), "{printed}");
    let codes = token_requests(&idp, "authorization_code");
    assert_eq!(codes.len(), 1);
    assert!(codes[0].is_ok(), "{codes:?}");
    assert!(codes[0].param("code_verifier").is_some());

    // No refresh token in the config: the stored one logs in.
    let relay = start_and_relay(&stack, &tuning, "After a loopback login", 1).await;
    relay.stop().await;
}

#[tokio::test]
async fn oauth_login_by_loopback_redirect_on_the_same_machine() {
    loopback_login(Browser::SameMachine).await;
}

#[tokio::test]
async fn oauth_login_by_loopback_redirect_pasted_from_elsewhere() {
    loopback_login(Browser::Elsewhere).await;
}

/// The authorization endpoint's URL prefix, read back from the config the command uses.
fn idp_prefix(config: &std::path::Path) -> String {
    let text = std::fs::read_to_string(config).unwrap();
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("authorization_url:"))
        .unwrap();
    line.split('"').nth(1).unwrap().to_owned()
}

/// `check` logs in with a fresh token, and names the token endpoint when that is what fails.
#[tokio::test]
async fn check_names_the_token_endpoint_or_logs_in_with_a_fresh_token() {
    let (idp, stack) = oauth_stack().await;
    let refresh = idp.issue_refresh_token(CLIENT, ADDRESS);
    let config = stack.write_config(&tuning(refresh_account(&idp, &refresh, "oauthbearer")));
    let check = |config: std::path::PathBuf| async move {
        tokio::task::spawn_blocking(move || {
            run_cli(&["check", "--config", config.to_str().unwrap()])
        })
        .await
        .unwrap()
    };
    let (code, out) = check(config.clone()).await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!("ok   imap {ADDRESS}: logged in as {ADDRESS}")),
        "{out}"
    );
    assert!(
        out.contains("with a fresh OAuth2 token (refresh_token, OAUTHBEARER)"),
        "{out}"
    );

    idp.revoke_refresh_token(&refresh);
    let (code, out) = check(config).await;
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!(
            "FAIL imap {ADDRESS}: token endpoint: the token endpoint answered invalid_grant"
        )),
        "{out}"
    );
}

/// At trace level, with rotation, an expiry and a restart, no access token, refresh token or
/// client secret appears in the relay's log.
#[tokio::test]
async fn no_token_or_secret_reaches_the_log_at_any_level() {
    let (idp, stack) = oauth_stack().await;
    idp.set_rotation(true);
    idp.set_access_token_lifetime(3);
    let refresh = idp.issue_refresh_token(CLIENT, ADDRESS);
    let config = stack.write_config(&tuning(refresh_account(&idp, &refresh, "xoauth2")));
    let log_path = stack.dir.path().join("relay.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_report-relay"))
        .args(["run", "--config"])
        .arg(&config)
        .env("RUST_LOG", "trace")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    stack.wait_ready(1).await;
    relay_one(&stack, "Logged at trace", 1).await;
    // A refresh with rotation, and a second SASL exchange.
    expire_and_kick(&idp, &stack).await;
    child.kill().unwrap();
    child.wait().unwrap();

    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        log.len() > 10_000,
        "trace logging is on: {} bytes",
        log.len()
    );
    for line in log.lines().filter(|l| l.contains("refresh token")) {
        eprintln!("relay log: {line}");
    }
    let mut secrets = vec![SECRET.to_owned(), refresh.clone()];
    for request in idp.requests() {
        secrets.extend(request.access_token_issued.clone());
        secrets.extend(request.refresh_token_issued.clone());
    }
    assert!(secrets.len() >= 5, "{secrets:?}");
    for secret in &secrets {
        assert!(
            !log.contains(secret.as_str()),
            "a secret is in the log: {}…",
            &secret[..6]
        );
        use base64::Engine;
        let xoauth2 = base64::engine::general_purpose::STANDARD
            .encode(format!("user={ADDRESS}\x01auth=Bearer {secret}\x01\x01"));
        assert!(!log.contains(&xoauth2), "a SASL response is in the log");
    }
}
