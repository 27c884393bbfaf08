-- Mailboxes a person paused for themselves with the bot's /mute (the sysadmin's table is not
-- changed); /unmute removes them.
CREATE TABLE mutes (
    chat_id   BIGINT NOT NULL,
    mailbox   TEXT NOT NULL,
    muted_at  BIGINT NOT NULL,
    PRIMARY KEY (chat_id, mailbox)
);
