//! Self-tests of the PostgreSQL test harness (`tests/support/postgres.rs`).
//!
//! Needs PostgreSQL: `scripts/test-deps.sh`. Timings (template creation, start, restart):
//! `cargo test --test postgres_harness -- --nocapture`.

mod support;

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use support::postgres::{DATABASE, PASSWORD, Postgres, USER};

#[tokio::test]
async fn starts_and_accepts_the_password() -> Result<()> {
    let t = Instant::now();
    let pg = Postgres::start().await?;
    eprintln!("postgres started in {:?} (port {})", t.elapsed(), pg.port());
    assert_eq!(
        pg.url(),
        format!("postgres://relay:{PASSWORD}@127.0.0.1:{}/relay", pg.port())
    );

    let isready = tokio::process::Command::new(pg.bin("pg_isready"))
        .args(["-h", "127.0.0.1", "-U", USER, "-d", DATABASE])
        .arg("-p")
        .arg(pg.port().to_string())
        .output()
        .await
        .context("running pg_isready")?;
    ensure!(isready.status.success(), "pg_isready: {isready:?}");

    // psql with PGPASSWORD, over TCP (scram-sha-256).
    assert_eq!(pg.psql("SELECT 1").await?, "1");
    assert_eq!(
        pg.psql(
            "SELECT current_user, current_database(), pg_get_userbyid(datdba), \
             current_setting('fsync') FROM pg_database WHERE datname = current_database()"
        )
        .await?,
        "relay|relay|relay|off"
    );
    // The password in the URL works too, and a wrong one is refused.
    let by_url = tokio::process::Command::new(pg.bin("psql"))
        .args(["-X", "-A", "-t", "-c", "SELECT 2", "-d", &pg.url()])
        .env_remove("PGPASSWORD")
        .output()
        .await?;
    assert_eq!(
        String::from_utf8_lossy(&by_url.stdout).trim(),
        "2",
        "{by_url:?}"
    );
    let wrong = pg
        .psql_with_password("wrong", "SELECT 1")
        .await
        .unwrap_err();
    assert!(
        format!("{wrong:#}").contains("password authentication failed"),
        "{wrong:#}"
    );

    // Drop kills the server and removes the temp dir.
    let pid = pg.pid().context("no postmaster.pid")?;
    let dir = pg.dir().to_path_buf();
    drop(pg);
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "postmaster {pid} survived Drop"
    );
    assert!(!dir.exists(), "{} survived Drop", dir.display());
    Ok(())
}

#[tokio::test]
async fn restart_keeps_data() -> Result<()> {
    let pg = Postgres::start().await?;
    let port = pg.port();
    pg.psql("CREATE TABLE kept (v text); INSERT INTO kept VALUES ('before restart')")
        .await?;

    let t = Instant::now();
    pg.restart().await?;
    eprintln!("postgres restarted in {:?}", t.elapsed());
    assert_eq!(pg.port(), port);
    assert_eq!(pg.psql("SELECT v FROM kept").await?, "before restart");

    // Stopped: logins fail; started again: the data is back.
    pg.stop().await?;
    assert!(!pg.is_running());
    assert!(pg.psql("SELECT 1").await.is_err());
    pg.start_again().await?;
    assert_eq!(pg.psql("SELECT count(*) FROM kept").await?, "1");
    assert!(pg.read_log().contains("received fast shutdown request"));
    Ok(())
}
