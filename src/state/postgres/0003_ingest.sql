-- HTTP ingest (the Superset webhook and the send API): the path each message came in on, and
-- each request's dedupe key with the message it was acknowledged as (the same key within 24 h is
-- a duplicate; a NULL message_id is a key claimed by a transaction that has not committed).
ALTER TABLE messages ADD COLUMN source TEXT NOT NULL DEFAULT 'imap';
CREATE TABLE ingest_keys (
    key        TEXT PRIMARY KEY,
    message_id BIGINT,
    created_at BIGINT NOT NULL
);
CREATE INDEX ingest_keys_created ON ingest_keys (created_at);
