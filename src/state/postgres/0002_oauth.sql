-- OAuth2 refresh tokens of IMAP accounts: the latest one each account's token endpoint issued
-- (from `report-relay oauth login`, or rotated on a refresh), with the client it belongs to.
CREATE TABLE oauth_refresh_tokens (
    account       TEXT PRIMARY KEY,
    client_id     TEXT NOT NULL,
    refresh_token TEXT NOT NULL,
    updated_at    BIGINT NOT NULL
);
