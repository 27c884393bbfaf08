CREATE TABLE IF NOT EXISTS checkpoints (
    mailbox      TEXT PRIMARY KEY,
    uid_validity INTEGER NOT NULL,
    last_uid     INTEGER NOT NULL,
    updated_at   INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    id              INTEGER PRIMARY KEY,
    mailbox         TEXT NOT NULL,
    uid_validity    INTEGER,
    uid             INTEGER,
    raw_sha256      TEXT NOT NULL,
    title           TEXT NOT NULL,
    outcome         TEXT NOT NULL,
    detail          TEXT,
    received_at     INTEGER NOT NULL,
    acknowledged_at INTEGER NOT NULL,
    -- imap, superset_webhook or api; added to older databases on open (sqlite.rs)
    source          TEXT NOT NULL DEFAULT 'imap',
    UNIQUE (mailbox, uid_validity, uid, raw_sha256)
);
-- Every message ever acknowledged, by content: kept as long as the checkpoints (never pruned),
-- so a replay of a mail IMAP relayed, or the other way round, is a duplicate even years later.
CREATE TABLE IF NOT EXISTS ledger (
    mailbox    TEXT NOT NULL,
    raw_sha256 TEXT NOT NULL,
    PRIMARY KEY (mailbox, raw_sha256)
);
INSERT OR IGNORE INTO ledger (mailbox, raw_sha256) SELECT mailbox, raw_sha256 FROM messages;
-- Messages relayed by `replay --mailbox`; never pruned either.
CREATE TABLE IF NOT EXISTS replays (
    mailbox    TEXT NOT NULL,
    raw_sha256 TEXT NOT NULL,
    message_id INTEGER NOT NULL,
    PRIMARY KEY (mailbox, raw_sha256)
);
CREATE TABLE IF NOT EXISTS files (
    sha256       TEXT PRIMARY KEY,
    bytes        BLOB NOT NULL,
    last_used_at INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS file_ids (
    sha256  TEXT NOT NULL,
    kind    TEXT NOT NULL,
    file_id TEXT NOT NULL,
    PRIMARY KEY (sha256, kind)
);
CREATE TABLE IF NOT EXISTS outbox (
    id          INTEGER PRIMARY KEY,
    message_id  INTEGER NOT NULL REFERENCES messages (id),
    chat_id     INTEGER NOT NULL,
    send        TEXT NOT NULL,
    status      TEXT NOT NULL DEFAULT 'pending',
    attempts    INTEGER NOT NULL DEFAULT 0,
    first_failed_at INTEGER,
    not_before  INTEGER NOT NULL DEFAULT 0,
    created_at  INTEGER NOT NULL,
    finished_at INTEGER,
    error       TEXT
);
CREATE INDEX IF NOT EXISTS outbox_pending ON outbox (status, chat_id, id);
CREATE TABLE IF NOT EXISTS kv (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS chat_status (
    chat_id    INTEGER PRIMARY KEY,
    status     TEXT NOT NULL,
    updated_at INTEGER NOT NULL
);
-- OAuth2 refresh tokens of IMAP accounts: the latest one each account's token endpoint issued
-- (from `report-relay oauth login`, or rotated on a refresh), with the client it belongs to.
CREATE TABLE IF NOT EXISTS oauth_refresh_tokens (
    account       TEXT PRIMARY KEY,
    client_id     TEXT NOT NULL,
    refresh_token TEXT NOT NULL,
    updated_at    INTEGER NOT NULL
);
-- HTTP ingest (the Superset webhook, the send API's Idempotency-Key): a request's dedupe key and
-- the message it was acknowledged as; the same key within 24 h is a duplicate. Pruned with the
-- outbox.
CREATE TABLE IF NOT EXISTS ingest_keys (
    key        TEXT PRIMARY KEY,
    message_id INTEGER,
    created_at INTEGER NOT NULL
);
-- Mailboxes a person paused for themselves with the bot's /mute (the sysadmin's table is not
-- changed); /unmute removes them. `mailbox` is the address in lower case.
CREATE TABLE IF NOT EXISTS mutes (
    chat_id   INTEGER NOT NULL,
    mailbox   TEXT NOT NULL,
    muted_at  INTEGER NOT NULL,
    PRIMARY KEY (chat_id, mailbox)
);
-- SeaTable's delivery log (`seatable.delivery_log`): the reports already appended to the
-- `deliveries` table, marked only after SeaTable accepted the batch. Pruned with the messages.
CREATE TABLE IF NOT EXISTS delivery_log (
    message_id INTEGER PRIMARY KEY,
    logged_at  INTEGER NOT NULL
);
-- Admin alerts (`telegram.admin_chats`): the conditions the admin chats were told about and not
-- yet told are cleared, one row per condition key (`mailbox:<address>`, `directory`, `schema`,
-- `recipient:<chat_id>`, `parse:<address>`, `row:<problem>`). A row is written or deleted in the
-- transaction that queues the alert.
CREATE TABLE IF NOT EXISTS alerts (
    key       TEXT PRIMARY KEY,
    raised_at INTEGER NOT NULL,
    text      TEXT NOT NULL
);
