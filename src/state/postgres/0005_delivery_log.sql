-- SeaTable's delivery log (`seatable.delivery_log`): the reports already appended to the
-- `deliveries` table, marked only after SeaTable accepted the batch. Pruned with the messages.
CREATE TABLE delivery_log (
    message_id BIGINT PRIMARY KEY,
    logged_at  BIGINT NOT NULL
);
