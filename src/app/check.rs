//! `report-relay check`: one line per check of the config's services, for a sysadmin before
//! (or beside) `run`: SeaTable login, schema and rows, the delivery log table, Telegram
//! `getMe`, and a login to each enabled mailbox (with a fresh OAuth2 token where it uses one).

use std::sync::Arc;
use std::time::Duration;

use crate::config::Config;
use crate::delivery::sending_bot;
use crate::directory::{DirectoryBackend, SeaTableBackend};
use crate::metrics::Metrics;
use crate::oauth2::TokenSources;
use crate::state::State;

use super::seatable_client;
/// One line of `report-relay check`.
#[derive(Debug, Clone)]
pub struct CheckLine {
    /// Whether the check passed.
    pub ok: bool,
    /// What was checked and what happened.
    pub text: String,
}

/// `report-relay check`: SeaTable login and schema, Telegram `getMe`, and a login to each
/// enabled mailbox. Returns one line per check.
pub async fn check(config: &Config) -> Vec<CheckLine> {
    let mut lines = vec![CheckLine {
        ok: true,
        text: "config: valid".into(),
    }];
    let metrics = Arc::new(Metrics::new());
    let client = match seatable_client(config, metrics.clone()) {
        Ok(client) => client,
        Err(error) => {
            lines.push(CheckLine {
                ok: false,
                text: format!("seatable: {error:#}"),
            });
            return lines;
        }
    };
    let mut snapshot = None;
    match client.login().await {
        Ok(_) => {
            lines.push(CheckLine {
                ok: true,
                text: format!("seatable: logged in to {}", config.seatable.server_url),
            });
            match crate::schema::check(&client, &config.seatable.tables).await {
                Ok(inspection) => {
                    lines.push(CheckLine {
                        ok: true,
                        text: "seatable: every table and column the relay needs exists".into(),
                    });
                    if !inspection.features_off.is_empty() {
                        lines.push(CheckLine {
                            ok: true,
                            text: format!(
                                "seatable: warning: {}",
                                crate::schema::features_off_warning(&inspection.features_off)
                            ),
                        });
                    }
                }
                Err(error) => lines.push(CheckLine {
                    ok: false,
                    text: format!("seatable: {error:#}"),
                }),
            }
            if config.seatable.delivery_log {
                lines.push(crate::delivery_log::check_line(&client, &config.seatable.tables).await);
            }
            let backend = SeaTableBackend::new(client.clone(), config.seatable.tables.clone());
            match backend.fetch().await {
                Ok(s) => {
                    lines.push(CheckLine {
                        ok: true,
                        text: format!(
                            "seatable: {} users, {} mailboxes ({} enabled), {} groups",
                            s.users.len(),
                            s.mailboxes.len(),
                            s.enabled_mailboxes().len(),
                            s.groups.len()
                        ),
                    });
                    for problem in s.option_problems() {
                        lines.push(CheckLine {
                            ok: false,
                            text: format!("seatable: {problem}"),
                        });
                    }
                    snapshot = Some(s);
                }
                Err(error) => lines.push(CheckLine {
                    ok: false,
                    text: format!("seatable: cannot read the tables: {error:#}"),
                }),
            }
        }
        Err(error) => lines.push(CheckLine {
            ok: false,
            text: format!("seatable: cannot log in: {error}"),
        }),
    }

    match sending_bot(
        &config.telegram.bot_token,
        &config.telegram.api_url,
        config.telegram.max_upload_bytes,
    ) {
        Ok(bot) => {
            use teloxide::prelude::Requester;
            match tokio::time::timeout(Duration::from_secs(30), bot.get_me()).await {
                Ok(Ok(me)) => lines.push(CheckLine {
                    ok: true,
                    text: format!(
                        "telegram: getMe answered @{}",
                        me.user.username.as_deref().unwrap_or("?")
                    ),
                }),
                Ok(Err(error)) => lines.push(CheckLine {
                    ok: false,
                    text: format!("telegram: getMe failed: {error}"),
                }),
                Err(_) => lines.push(CheckLine {
                    ok: false,
                    text: "telegram: getMe timed out".into(),
                }),
            }
        }
        Err(error) => lines.push(CheckLine {
            ok: false,
            text: format!("telegram: {error:#}"),
        }),
    }

    if let Some(snapshot) = snapshot {
        let tokens = match check_token_sources(config).await {
            Ok(tokens) => tokens,
            Err(error) => {
                lines.push(CheckLine {
                    ok: false,
                    text: format!("state: {error:#}"),
                });
                return lines;
            }
        };
        for row in snapshot.enabled_mailboxes() {
            let line = match crate::supervisor::mailbox_settings(row, config, &tokens) {
                Err(message) => CheckLine {
                    ok: false,
                    text: format!("imap {}: {message}", row.email),
                },
                Ok(settings) => check_mailbox(&settings).await,
            };
            lines.push(line);
        }
    }
    lines
}

/// The token sources for `check`: on the state beside a relay that may be running, since
/// refresh tokens from `oauth login` live there. Opens the state only when an account uses
/// OAuth2.
async fn check_token_sources(config: &Config) -> anyhow::Result<TokenSources> {
    let uses_oauth2 = config.imap.accounts.values().any(|a| a.oauth2.is_some());
    let state = if uses_oauth2 {
        State::beside_relay(&config.state).await?
    } else {
        // Never asked for a token: an in-memory stand-in that writes no file.
        State::in_memory()?
    };
    Ok(TokenSources::new(state, crate::oauth2::http_client()?))
}

/// One mailbox's line of `check`, naming the failing step: for OAuth2 the token endpoint (a
/// fresh access token), then the login (SASL) and EXAMINE.
async fn check_mailbox(settings: &crate::imap::MailboxSettings) -> CheckLine {
    let address = &settings.address;
    let mut via = String::new();
    if let crate::imap::Credentials::OAuth2(tokens) = &settings.credentials {
        match tokens.access_token(&settings.login).await {
            Ok(_) => {
                via = format!(
                    " with a fresh OAuth2 token ({}, {})",
                    tokens.config().grant,
                    tokens.config().mechanism.name()
                );
            }
            Err(error) => {
                return CheckLine {
                    ok: false,
                    text: format!("imap {address}: token endpoint: {error}"),
                };
            }
        }
    }
    match crate::imap::check_login(settings).await {
        Ok(summary) => CheckLine {
            ok: true,
            text: format!("imap {address}: {summary}{via}"),
        },
        Err(error) => CheckLine {
            ok: false,
            text: format!("imap {address}: {error:#}"),
        },
    }
}
