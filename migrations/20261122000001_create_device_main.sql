-- device_main belongs to the main backend, which usually created it already: this only
-- creates it where it is absent, with the columns the ingest service reads and writes.
-- A new row needs only device_id, uuid and name (how the backend registers a device).
-- MariaDB stores JSON as LONGTEXT with a JSON_VALID check.
CREATE TABLE IF NOT EXISTS device_main (
    id               BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    device_id        VARCHAR(100)    NOT NULL,
    uuid             VARCHAR(64)     NOT NULL,
    name             VARCHAR(100)    NOT NULL,
    is_online        TINYINT(1)      NOT NULL DEFAULT 0,
    last_seen        DATETIME(3)     NULL,
    last_heartbeat   DATETIME(3)     NULL,
    device_status    VARCHAR(50)     NULL,
    last_report_data JSON            NULL,
    UNIQUE KEY uq_device_main_uuid (uuid),
    UNIQUE KEY uq_device_main_device_id (device_id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;
