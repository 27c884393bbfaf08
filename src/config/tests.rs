use super::*;
use secrecy::ExposeSecret;

const MINIMAL: &str = "
telegram:
  bot_token: ${TELEGRAM_BOT_TOKEN}
seatable:
  server_url: https://cloud.seatable.io
  api_token: ${SEATABLE_API_TOKEN}
";

fn env(name: &str) -> Option<String> {
    match name {
        "TELEGRAM_BOT_TOKEN" => Some("123456:ABC-secret".into()),
        "SEATABLE_API_TOKEN" => Some("st-secret".into()),
        "IMAP_PORT" => Some("1143".into()),
        "PASS" => Some("p#ss: word".into()),
        "EMPTY" => Some(String::new()),
        _ => None,
    }
}

fn load(text: &str) -> Result<Config, ConfigError> {
    Config::from_yaml(text, Path::new("config.yaml"), &env)
}

#[test]
fn minimal_config_gets_the_documented_defaults() {
    let config = load(MINIMAL).unwrap();
    assert_eq!(
        config.telegram.bot_token.expose_secret(),
        "123456:ABC-secret"
    );
    assert_eq!(config.telegram.api_url, "https://api.telegram.org");
    assert_eq!(config.telegram.limits, TelegramLimits::default());
    assert_eq!(config.telegram.limits.global_per_second, 30);
    assert_eq!(config.telegram.png_as, PngAs::Photo);
    assert_eq!(config.telegram.max_upload_bytes, 50_000_000);
    assert_eq!(config.telegram.default_country_code, "7");
    assert_eq!(config.seatable.cache_ttl_secs, 60);
    assert_eq!(config.seatable.reload_secs, 60);
    assert_eq!(config.seatable.tables.groups, "t_chats");
    assert_eq!(config.imap.port, 993);
    assert_eq!(config.imap.tls, TlsMode::Implicit);
    assert_eq!(config.imap.folder, "INBOX");
    assert_eq!(config.imap.idle_renew_secs, 540);
    assert_eq!(config.reports.subject_prefixes, ["[Report]", "[Alert]"]);
    assert!(!config.reports.forward_errors);
    assert_eq!(config.delivery.concurrency, 16);
    assert_eq!(config.delivery.give_up_after_secs, 86_400);
    assert_eq!(
        config.state.sqlite_path(),
        PathBuf::from("/var/lib/report-relay/state.db")
    );
    assert_eq!(config.http.listen.to_string(), "127.0.0.1:9464");
}

#[test]
fn variables_expand_per_scalar_before_type_conversion() {
    let text = format!(
        "{MINIMAL}imap:\n  host: imap.example.com\n  port: ${{IMAP_PORT:-993}}\n  \
         accounts:\n    Reports@Example.com:\n      password: ${{PASS}}\n\
         reports:\n  forward_errors: ${{FORWARD:-true}}\n"
    );
    let config = load(&text).unwrap();
    assert_eq!(config.imap.port, 1143);
    assert!(config.reports.forward_errors);
    let password = config.imap.password_for("reports@example.com").unwrap();
    assert_eq!(password.expose_secret(), "p#ss: word");
}

#[test]
fn expansion_rules() {
    assert_eq!(expand_vars("a${PASS}b", &env).unwrap(), "ap#ss: wordb");
    assert_eq!(expand_vars("${NOPE:-993}", &env).unwrap(), "993");
    assert_eq!(expand_vars("${EMPTY:-x}", &env).unwrap(), "x");
    assert_eq!(expand_vars("${EMPTY}", &env).unwrap(), "");
    assert_eq!(expand_vars("$$5 and $x", &env).unwrap(), "$5 and $x");
    assert!(
        expand_vars("${NOPE}", &env)
            .unwrap_err()
            .contains("NOPE is not set")
    );
    assert!(
        expand_vars("${OPEN", &env)
            .unwrap_err()
            .contains("unterminated")
    );
    assert!(
        expand_vars("${1X}", &env)
            .unwrap_err()
            .contains("bad variable")
    );
}

#[test]
fn unset_variable_names_key_and_file() {
    let text = MINIMAL.replace("${SEATABLE_API_TOKEN}", "${MISSING_TOKEN}");
    let error = load(&text).unwrap_err().to_string();
    assert_eq!(
        error,
        "config.yaml: seatable.api_token: environment variable MISSING_TOKEN is not set"
    );
}

#[test]
fn unknown_keys_are_rejected_with_their_path() {
    let text = format!("{MINIMAL}delivery:\n  concurency: 4\n");
    let error = load(&text).unwrap_err().to_string();
    assert!(
        error.starts_with("config.yaml: delivery.concurency: unknown field `concurency`"),
        "{error}"
    );
    let error = load(&format!("{MINIMAL}extra: 1\n"))
        .unwrap_err()
        .to_string();
    assert!(error.contains("unknown field `extra`"), "{error}");
}

#[test]
fn missing_required_keys_are_named() {
    let error = load("telegram:\n  bot_token: x\n").unwrap_err().to_string();
    assert_eq!(error, "config.yaml: seatable: required key is missing");
    let text =
        "telegram:\n  api_url: http://x\nseatable:\n  server_url: https://a\n  api_token: t\n";
    let error = load(text).unwrap_err().to_string();
    assert_eq!(
        error,
        "config.yaml: telegram.bot_token: required key is missing"
    );
}

#[test]
fn wrong_types_and_ranges_are_named() {
    let error = load(&format!("{MINIMAL}imap:\n  port: lots\n"))
        .unwrap_err()
        .to_string();
    assert!(
        error.starts_with("config.yaml: imap.port: invalid digit"),
        "{error}"
    );
    let error = load(&format!("{MINIMAL}imap:\n  tls: ssl\n"))
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("imap.tls: expected implicit, starttls or none"),
        "{error}"
    );
    let text = MINIMAL.replace("telegram:\n", "telegram:\n  png_as: picture\n");
    assert!(
        load(&text)
            .unwrap_err()
            .to_string()
            .contains("telegram.png_as")
    );
    let error = load(&format!("{MINIMAL}delivery:\n  concurrency: 0\n"))
        .unwrap_err()
        .to_string();
    assert_eq!(
        error,
        "config.yaml: delivery.concurrency: must be at least 1"
    );
    let error = load(&format!("{MINIMAL}imap:\n  auth: xoauth2\n"))
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("imap.auth: OAuth2 is set per account: imap.accounts.<address>.oauth2"),
        "{error}"
    );
    let text = MINIMAL.replace("https://cloud.seatable.io", "cloud.seatable.io");
    assert!(
        load(&text)
            .unwrap_err()
            .to_string()
            .contains("seatable.server_url")
    );
}

#[test]
fn secrets_never_appear_in_debug_output() {
    let text =
        format!("{MINIMAL}imap:\n  accounts:\n    a@example.com:\n      password: ${{PASS}}\n");
    let config = load(&text).unwrap();
    let debug = format!("{config:?}");
    assert!(!debug.contains("ABC-secret"), "{debug}");
    assert!(!debug.contains("st-secret"), "{debug}");
    assert!(!debug.contains("p#ss"), "{debug}");
}

#[test]
fn the_shipped_examples_load() {
    let env = |name: &str| Some(format!("value-of-{name}"));
    for file in ["config.yaml.example", "docker/config.yaml"] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
        let text = std::fs::read_to_string(&path).unwrap();
        let config =
            Config::from_yaml(&text, &path, &env).unwrap_or_else(|error| panic!("{error}"));
        if file.starts_with("docker") {
            assert_eq!(config.http.listen.to_string(), "0.0.0.0:9464");
        }
    }
}

fn account(body: &str) -> String {
    format!("{MINIMAL}imap:\n  accounts:\n    bi@company.com:\n{body}")
}

#[test]
fn an_oauth2_account_gets_its_providers_endpoints_and_hides_its_secrets() {
    let config = load(&account(
        "      oauth2:\n        provider: microsoft\n        client_id: app-1\n        \
         client_secret: ${PASS}\n        refresh_token: ${PASS}\n        tenant: contoso.com\n",
    ))
    .unwrap();
    let (name, entry) = config.imap.account("BI@company.com").unwrap();
    assert_eq!(name, "bi@company.com");
    assert!(entry.password.is_none());
    assert!(config.imap.password_for("bi@company.com").is_none());
    let oauth2 = entry.oauth2.as_ref().unwrap();
    assert_eq!(oauth2.mechanism, SaslMechanism::XOAuth2);
    assert_eq!(oauth2.grant, Grant::RefreshToken);
    let endpoints = oauth2.endpoints();
    assert_eq!(
        endpoints.token_url,
        "https://login.microsoftonline.com/contoso.com/oauth2/v2.0/token"
    );
    assert_eq!(
        endpoints.device_authorization_url.as_deref(),
        Some("https://login.microsoftonline.com/contoso.com/oauth2/v2.0/devicecode")
    );
    assert_eq!(endpoints.scope, MICROSOFT_SCOPE);
    let debug = format!("{config:?}");
    assert!(!debug.contains("p#ss"), "{debug}");

    let google = load(&account(
        "      oauth2:\n        provider: google\n        client_id: c\n        \
         mechanism: oauthbearer\n",
    ))
    .unwrap();
    let oauth2 = google.imap.accounts["bi@company.com"]
        .oauth2
        .clone()
        .unwrap();
    assert_eq!(oauth2.mechanism, SaslMechanism::OAuthBearer);
    let endpoints = oauth2.endpoints();
    assert_eq!(endpoints.token_url, "https://oauth2.googleapis.com/token");
    assert_eq!(endpoints.scope, GOOGLE_SCOPE);
    assert_eq!(
        endpoints.authorization_url.as_deref(),
        Some("https://accounts.google.com/o/oauth2/v2/auth")
    );

    let app = load(&account(
        "      oauth2:\n        provider: microsoft\n        client_id: c\n        \
         client_secret: s\n        tenant: t\n        grant: client_credentials\n",
    ))
    .unwrap();
    let endpoints = app.imap.accounts["bi@company.com"]
        .oauth2
        .as_ref()
        .unwrap()
        .endpoints();
    assert_eq!(endpoints.scope, MICROSOFT_APP_SCOPE);
}

#[test]
fn oauth2_mistakes_are_named_with_their_key() {
    let cases = [
        (
            "      password: x\n      oauth2:\n        provider: google\n        client_id: c\n",
            "imap.accounts.bi@company.com: set either password or oauth2, not both",
        ),
        (
            "      {}\n",
            "imap.accounts.bi@company.com: needs a password or an oauth2 section",
        ),
        (
            "      oauth2:\n        provider: custom\n        client_id: c\n",
            "imap.accounts.bi@company.com.oauth2.token_url: is required with provider custom",
        ),
        (
            "      oauth2:\n        provider: custom\n        client_id: c\n        token_url: http://x\n",
            "imap.accounts.bi@company.com.oauth2.scope: is required with provider custom",
        ),
        (
            "      oauth2:\n        provider: microsoft\n        client_id: c\n        grant: client_credentials\n",
            "imap.accounts.bi@company.com.oauth2.client_secret: is required with grant client_credentials",
        ),
        (
            "      oauth2:\n        provider: google\n        client_id: c\n        client_secret: s\n        grant: client_credentials\n",
            "imap.accounts.bi@company.com.oauth2.grant: Google has no client credentials grant",
        ),
        (
            "      oauth2:\n        provider: google\n        client_id: c\n        grant: service_account\n",
            "imap.accounts.bi@company.com.oauth2.key_file: is required with grant service_account",
        ),
        (
            "      oauth2:\n        provider: google\n        client_id: c\n        tenant: t\n",
            "imap.accounts.bi@company.com.oauth2.tenant: applies to provider microsoft only",
        ),
        (
            "      oauth2:\n        provider: yahoo\n        client_id: c\n",
            "imap.accounts.bi@company.com.oauth2.provider: expected google, microsoft or custom",
        ),
        (
            "      oauth2:\n        provider: custom\n        client_id: c\n        token_url: ftp://x\n        scope: s\n",
            "imap.accounts.bi@company.com.oauth2.token_url: expected an http(s) URL",
        ),
    ];
    for (body, expected) in cases {
        let error = load(&account(body)).unwrap_err().to_string();
        assert!(
            error.starts_with(&format!("config.yaml: {expected}")),
            "{body}: {error}"
        );
    }
}

#[test]
fn http_ingest_keys_have_defaults_and_are_checked() {
    let config = load(MINIMAL).unwrap();
    assert_eq!(config.http.max_body_bytes, 50_000_000);
    assert_eq!(config.http.dedupe_window_secs, 86_400);
    assert!(config.http.tls.is_none() && config.http.api_tokens.is_empty());
    let sha = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
    let text = format!(
        "{MINIMAL}http:\n  tls:\n    cert_file: /c.pem\n    key_file: /k.pem\n  api_tokens:\n    - name: tracker\n      sha256: {sha}\n      mailboxes: [a@example.com]\n"
    );
    let config = load(&text).unwrap();
    assert_eq!(config.http.api_tokens[0].requests_per_minute, 60);
    assert_eq!(
        config.http.tls.unwrap().cert_file,
        std::path::PathBuf::from("/c.pem")
    );
    let error = load(&text.replace(sha, "not-a-hash"))
        .unwrap_err()
        .to_string();
    assert!(
        error.starts_with("config.yaml: http.api_tokens[0].sha256: expected the token's SHA-256"),
        "{error}"
    );
    let error = load(&text.replace("[a@example.com]", "[]"))
        .unwrap_err()
        .to_string();
    assert!(error.contains("http.api_tokens[0].mailboxes"), "{error}");
}

#[test]
fn the_delivery_log_is_off_by_default_and_names_its_table() {
    let config = load(MINIMAL).unwrap();
    assert!(!config.seatable.delivery_log);
    assert_eq!(config.seatable.tables.deliveries, "deliveries");
    let config = load(&format!(
        "{MINIMAL}  delivery_log: true\n  tables:\n    deliveries: report_log\n"
    ))
    .unwrap();
    assert!(config.seatable.delivery_log);
    assert_eq!(config.seatable.tables.deliveries, "report_log");
    assert_eq!(config.seatable.tables.users, "users");
    let error = load(&format!("{MINIMAL}  delivery_log: sometimes\n")).unwrap_err();
    assert!(
        error.to_string().contains("seatable.delivery_log"),
        "{error}"
    );
}

#[test]
fn admin_alerts_are_off_by_default_and_their_keys_are_checked() {
    let config = load(MINIMAL).unwrap();
    assert!(config.telegram.admin_chats.is_empty());
    assert_eq!(config.telegram.admin_alert_after_secs, 600);
    let with = |keys: &str| MINIMAL.replace("telegram:\n", &format!("telegram:\n{keys}"));
    let config = load(&with("  admin_chats: [111222333, -1001234567890]\n")).unwrap();
    assert_eq!(
        config.telegram.admin_chats,
        vec![111_222_333, -1_001_234_567_890]
    );
    let error = load(&with("  admin_chats: [0]\n")).unwrap_err().to_string();
    assert_eq!(
        error,
        "config.yaml: telegram.admin_chats: 0 is not a chat id"
    );
    let error = load(&with("  admin_chats: [\"@ops\"]\n"))
        .unwrap_err()
        .to_string();
    assert!(error.contains("telegram.admin_chats"), "{error}");
    let error = load(&with("  admin_chats: [1]\n  admin_alert_after_secs: 60\n"))
        .unwrap_err()
        .to_string();
    assert!(
        error.starts_with(
            "config.yaml: telegram.admin_alert_after_secs: must be more than seatable.cache_ttl_secs (60)"
        ),
        "{error}"
    );
    let error = load(&with("  admin_alert_after_secs: 0\n"))
        .unwrap_err()
        .to_string();
    assert_eq!(
        error,
        "config.yaml: telegram.admin_alert_after_secs: must be at least 1"
    );
}
