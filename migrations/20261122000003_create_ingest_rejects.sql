-- Rejected messages (opt-in: REJECTS_ENABLED), so an operator can see why a device's data is
-- missing without reading logs. Bounded by count and age by the service.
CREATE TABLE IF NOT EXISTS ingest_rejects (
    id            BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    received_at   DATETIME(3)     NOT NULL,
    topic         VARCHAR(255)    NOT NULL,
    device_uuid   VARCHAR(64)     NULL,
    reason        VARCHAR(32)     NOT NULL,
    detail        VARCHAR(512)    NOT NULL,
    payload       BLOB            NULL,
    payload_bytes INT UNSIGNED    NOT NULL,
    KEY ix_ingest_rejects_device (device_uuid, id),
    KEY ix_ingest_rejects_received (received_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;
