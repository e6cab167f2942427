-- Sensor history (opt-in: HISTORY_ENABLED): one row per accepted sensor reading, written in the
-- same transaction as the device's state. The unique key is what makes a redelivered message
-- harmless (INSERT IGNORE) and serves "one device's sensor over a time range".
CREATE TABLE IF NOT EXISTS device_history (
    id           BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    device_uuid  VARCHAR(64)     NOT NULL,
    sensor       VARCHAR(50)     NOT NULL,
    value        DOUBLE          NOT NULL,
    unit         VARCHAR(64)     NOT NULL DEFAULT '',
    reading_time DATETIME(3)     NOT NULL,
    received_at  DATETIME(3)     NOT NULL,
    UNIQUE KEY uq_device_history_reading (device_uuid, sensor, reading_time),
    KEY ix_device_history_received (received_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;
