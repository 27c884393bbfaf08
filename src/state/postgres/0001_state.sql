-- The relay's state on PostgreSQL: the same tables as the SQLite schema (times are Unix
-- milliseconds), plus the leases and heartbeats of the replicas that share it.
CREATE TABLE checkpoints (
    mailbox      TEXT PRIMARY KEY,
    uid_validity BIGINT NOT NULL,
    last_uid     BIGINT NOT NULL,
    updated_at   BIGINT NOT NULL
);
CREATE TABLE messages (
    id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    mailbox         TEXT NOT NULL,
    uid_validity    BIGINT,
    uid             BIGINT,
    raw_sha256      TEXT NOT NULL,
    title           TEXT NOT NULL,
    outcome         TEXT NOT NULL,
    detail          TEXT,
    received_at     BIGINT NOT NULL,
    acknowledged_at BIGINT NOT NULL,
    UNIQUE (mailbox, uid_validity, uid, raw_sha256)
);
-- Every message ever acknowledged, by content; never pruned.
CREATE TABLE ledger (
    mailbox    TEXT NOT NULL,
    raw_sha256 TEXT NOT NULL,
    PRIMARY KEY (mailbox, raw_sha256)
);
-- Messages relayed by `replay --mailbox`; never pruned either.
CREATE TABLE replays (
    mailbox    TEXT NOT NULL,
    raw_sha256 TEXT NOT NULL,
    message_id BIGINT NOT NULL,
    PRIMARY KEY (mailbox, raw_sha256)
);
CREATE TABLE files (
    sha256       TEXT PRIMARY KEY,
    bytes        BYTEA NOT NULL,
    last_used_at BIGINT NOT NULL DEFAULT 0
);
CREATE TABLE file_ids (
    sha256  TEXT NOT NULL,
    kind    TEXT NOT NULL,
    file_id TEXT NOT NULL,
    PRIMARY KEY (sha256, kind)
);
CREATE TABLE outbox (
    id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id      BIGINT NOT NULL REFERENCES messages (id),
    chat_id         BIGINT NOT NULL,
    send            TEXT NOT NULL,
    status          TEXT NOT NULL DEFAULT 'pending',
    attempts        INTEGER NOT NULL DEFAULT 0,
    first_failed_at BIGINT,
    not_before      BIGINT NOT NULL DEFAULT 0,
    created_at      BIGINT NOT NULL,
    finished_at     BIGINT,
    error           TEXT
);
CREATE INDEX outbox_pending ON outbox (status, chat_id, id);
CREATE INDEX outbox_message ON outbox (message_id);
CREATE TABLE kv (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE chat_status (
    chat_id    BIGINT PRIMARY KEY,
    status     TEXT NOT NULL,
    updated_at BIGINT NOT NULL
);
-- One row per lease (`mailbox:<address>`, `delivery`, `updates`). The epoch grows by one each
-- time the lease changes hands, and a released lease keeps its row (and epoch), so a fenced
-- write from an earlier holder can never match again.
CREATE TABLE leases (
    name       TEXT PRIMARY KEY,
    owner      TEXT NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL,
    epoch      BIGINT NOT NULL
);
-- Live replicas: each renews its row with its leases; the fair share of mailboxes counts the
-- rows renewed within one lease period.
CREATE TABLE replicas (
    id           TEXT PRIMARY KEY,
    heartbeat_at TIMESTAMPTZ NOT NULL
);
