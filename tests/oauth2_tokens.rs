//! The token source of one OAuth2 account (`report_relay::oauth2::TokenSource`) against the fake
//! authorization server: one refresh at a time however many mailboxes ask, the cache until
//! shortly before expiry, and a refused refresh token not sent again while a new one from the
//! state is tried at once.

mod support;

use std::sync::Arc;
use std::time::Duration;

use report_relay::config::{Config, OAuth2Account};
use report_relay::oauth2::{TokenSource, http_client};
use report_relay::state::State;
use secrecy::{ExposeSecret, SecretString};
use support::oauth2::{DEFAULT_SCOPE, Endpoint, FakeOAuth2};

const CLIENT: &str = "relay";
const SECRET: &str = "relay-secret";
const MAILBOX: &str = "reports@example.com";

/// The account's `oauth2:` section as the config would give it.
fn account(idp: &FakeOAuth2, refresh_token: &str) -> OAuth2Account {
    let text = format!(
        "telegram:\n  bot_token: t\nseatable:\n  server_url: https://s.example\n  api_token: a\n\
         imap:\n  accounts:\n    {MAILBOX}:\n      oauth2:\n        provider: custom\n        \
         client_id: {CLIENT}\n        client_secret: {SECRET}\n        refresh_token: \"{refresh_token}\"\n        \
         scope: \"{DEFAULT_SCOPE}\"\n        token_url: \"{}\"\n",
        idp.token_url()
    );
    let config = Config::from_yaml(&text, std::path::Path::new("config.yaml"), &|_| None).unwrap();
    config.imap.accounts[MAILBOX].oauth2.clone().unwrap()
}

async fn source(idp: &FakeOAuth2, refresh_token: &str) -> (Arc<TokenSource>, State) {
    let state = State::in_memory().unwrap();
    let source = TokenSource::new(
        MAILBOX,
        MAILBOX,
        account(idp, refresh_token),
        state.clone(),
        http_client().unwrap(),
    );
    (Arc::new(source), state)
}

fn refreshes(idp: &FakeOAuth2) -> usize {
    idp.requests()
        .iter()
        .filter(|r| {
            r.endpoint == Endpoint::Token && r.grant_type.as_deref() == Some("refresh_token")
        })
        .count()
}

#[tokio::test]
async fn mailboxes_sharing_an_account_wait_for_one_refresh() {
    let idp = FakeOAuth2::start().await;
    idp.add_client(CLIENT, Some(SECRET));
    let refresh = idp.issue_refresh_token(CLIENT, MAILBOX);
    let (source, _state) = source(&idp, &refresh).await;
    let callers: Vec<_> = (0..20)
        .map(|_| {
            let source = source.clone();
            tokio::spawn(async move { source.access_token(MAILBOX).await.unwrap() })
        })
        .collect();
    let mut tokens = Vec::new();
    for caller in callers {
        tokens.push(caller.await.unwrap().expose_secret().to_owned());
    }
    assert_eq!(refreshes(&idp), 1);
    assert!(tokens.iter().all(|t| t == &tokens[0]));
    assert!(idp.is_access_token_active(&tokens[0]));
}

#[tokio::test]
async fn a_token_is_cached_until_shortly_before_it_expires_or_the_server_refuses_it() {
    let idp = FakeOAuth2::start().await;
    idp.add_client(CLIENT, Some(SECRET));
    idp.set_access_token_lifetime(2);
    let refresh = idp.issue_refresh_token(CLIENT, MAILBOX);
    let (source, _state) = source(&idp, &refresh).await;
    let first = source.access_token(MAILBOX).await.unwrap();
    let again = source.access_token(MAILBOX).await.unwrap();
    assert_eq!(first.expose_secret(), again.expose_secret());
    assert_eq!(refreshes(&idp), 1);
    // Refreshed at half its 2 s lifetime (the margin is at most half of it).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let second = source.access_token(MAILBOX).await.unwrap();
    assert_ne!(first.expose_secret(), second.expose_secret());
    assert_eq!(refreshes(&idp), 2);
    assert!(idp.is_access_token_active(second.expose_secret()));
    // The server refused it: the next call gets a new one; an older token does not evict it.
    source.invalidate(MAILBOX, &first).await;
    assert_eq!(
        source.access_token(MAILBOX).await.unwrap().expose_secret(),
        second.expose_secret()
    );
    source.invalidate(MAILBOX, &second).await;
    let third = source.access_token(MAILBOX).await.unwrap();
    assert_ne!(third.expose_secret(), second.expose_secret());
    assert_eq!(refreshes(&idp), 3);
}

#[tokio::test]
async fn a_refused_refresh_token_is_not_sent_again_but_a_new_one_in_the_state_is() {
    let idp = FakeOAuth2::start().await;
    idp.add_client(CLIENT, Some(SECRET));
    let revoked = idp.issue_refresh_token(CLIENT, MAILBOX);
    idp.revoke_refresh_token(&revoked);
    let (source, state) = source(&idp, &revoked).await;
    for _ in 0..5 {
        let error = source.access_token(MAILBOX).await.unwrap_err();
        assert!(error.is_invalid_grant(), "{error}");
        let text = error.to_string();
        assert!(text.contains("run `report-relay oauth login"), "{text}");
        assert!(!text.contains(&revoked), "{text}");
    }
    assert_eq!(refreshes(&idp), 1, "the refused token went out once");

    // `oauth login` stored a new one (beside the running relay): used at the next call.
    let fresh = idp.issue_refresh_token(CLIENT, MAILBOX);
    state
        .store_refresh_token(MAILBOX, CLIENT, &SecretString::from(fresh.clone()))
        .await
        .unwrap();
    source.access_token(MAILBOX).await.unwrap();
    assert_eq!(refreshes(&idp), 2);
    let last = idp.requests().pop().unwrap();
    assert_eq!(last.refresh_token_used.as_deref(), Some(&*fresh));
}

#[tokio::test]
async fn a_rotated_refresh_token_is_stored_before_the_access_token_is_handed_out() {
    let idp = FakeOAuth2::start().await;
    idp.add_client(CLIENT, Some(SECRET));
    idp.set_rotation(true);
    let original = idp.issue_refresh_token(CLIENT, MAILBOX);
    let (source, state) = source(&idp, &original).await;
    source.access_token(MAILBOX).await.unwrap();
    let issued = idp.requests().pop().unwrap().refresh_token_issued.unwrap();
    let stored = state.refresh_token(MAILBOX).await.unwrap().unwrap();
    assert_eq!(stored.refresh_token.expose_secret(), issued);
    assert_eq!(stored.client_id, CLIENT);
    assert!(!idp.is_refresh_token_valid(&original));
}
