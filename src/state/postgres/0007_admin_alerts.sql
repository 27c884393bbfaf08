-- Admin alerts (`telegram.admin_chats`): the conditions the admin chats were told about and not
-- yet told are cleared, one row per condition key (`mailbox:<address>`, `directory`, `schema`,
-- `recipient:<chat_id>`, `parse:<address>`, `row:<problem>`). A row is written or deleted in the
-- transaction that queues the alert, so replicas tell each condition once.
CREATE TABLE alerts (
    key       TEXT PRIMARY KEY,
    raised_at BIGINT NOT NULL,
    text      TEXT NOT NULL
);
