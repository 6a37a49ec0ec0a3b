"""audit_log: two holes in 0013's guard closed (review).

* MySQL/MariaDB: a key given twice, once JSON-escaped (``"\\u0074o"`` beside ``"to"``), passed the
  duplicate-key check (``JSON_KEYS`` lists both spellings) and the value check (the path finds the first
  one), while every JSON reader takes the last: a "redaction" could rewrite any value. Each key, unquoted,
  must now differ from every other.
* SQLite: ``INSERT OR REPLACE`` with an existing ``id`` replaced the row without firing the DELETE trigger
  (recursive triggers are off): every column could be rewritten. An insert of an existing ``id`` is
  refused now, whatever its conflict clause.

PostgreSQL needs neither: ``jsonb`` keeps one value per key, and a conflicting insert is an error or an
UPDATE, which the trigger judges.

Revision ID: 0014
Revises: 0013
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

_REFUSED = ("SIGNAL SQLSTATE '45000' "
            "SET MESSAGE_TEXT = 'audit_log is append-only: an update may only redact ip and details'")

_SQLITE_NO_REPLACE = """
CREATE TRIGGER audit_log_no_replace BEFORE INSERT ON audit_log
WHEN EXISTS (SELECT 1 FROM audit_log WHERE id = NEW.id)
BEGIN SELECT RAISE(ABORT, 'audit_log is append-only: a row cannot be replaced'); END
"""

# 0013's trigger, and in its loop over the keys: no other key, unquoted, equals this one.
_MYSQL_UPDATE = """
CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log FOR EACH ROW
BEGIN
  DECLARE i INT DEFAULT 0;
  DECLARE j INT;
  DECLARE n INT;
  DECLARE k LONGTEXT;
  DECLARE p LONGTEXT;
  IF NOT COALESCE(NEW.id <=> OLD.id AND BINARY NEW.action <=> BINARY OLD.action
          AND BINARY NEW.actor_clerk_id <=> BINARY OLD.actor_clerk_id
          AND BINARY NEW.target_clerk_id <=> BINARY OLD.target_clerk_id
          AND BINARY NEW.impersonator_clerk_id <=> BINARY OLD.impersonator_clerk_id
          AND NEW.created_at <=> OLD.created_at
          AND (NEW.ip IS NULL OR BINARY NEW.ip <=> BINARY OLD.ip), FALSE) THEN
    REFUSED;
  END IF;
  IF NOT (BINARY NEW.details <=> BINARY OLD.details) THEN
    IF NOT COALESCE(JSON_VALID(NEW.details) AND JSON_TYPE(NEW.details) = 'OBJECT'
            AND JSON_VALID(OLD.details) AND JSON_TYPE(OLD.details) = 'OBJECT'
            AND JSON_TYPE(JSON_EXTRACT(NEW.details, '$.redacted')) = 'BOOLEAN'
            AND CAST(JSON_EXTRACT(NEW.details, '$.redacted') AS CHAR) = 'true'
            AND JSON_LENGTH(NEW.details) = JSON_LENGTH(JSON_KEYS(NEW.details)), FALSE) THEN
      REFUSED;
    END IF;
    SET n = JSON_LENGTH(JSON_KEYS(NEW.details));
    WHILE i < n DO
      SET k = JSON_UNQUOTE(JSON_EXTRACT(JSON_KEYS(NEW.details), CONCAT('$[', i, ']')));
      IF COALESCE(LOCATE('"', k) > 0 OR LOCATE('\\\\', k) > 0, TRUE) THEN
        REFUSED;
      END IF;
      SET j = i + 1;
      WHILE j < n DO
        IF COALESCE(BINARY k = BINARY JSON_UNQUOTE(JSON_EXTRACT(JSON_KEYS(NEW.details), CONCAT('$[', j, ']'))),
                    TRUE) THEN
          REFUSED;
        END IF;
        SET j = j + 1;
      END WHILE;
      SET p = CONCAT('$."', k, '"');
      IF BINARY k <> BINARY 'redacted' AND NOT (
          CAST(JSON_EXTRACT(NEW.details, p) AS BINARY) <=> CAST(JSON_EXTRACT(OLD.details, p) AS BINARY)) THEN
        REFUSED;
      END IF;
      SET i = i + 1;
    END WHILE;
  END IF;
END
""".replace("REFUSED", _REFUSED)


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "sqlite":
        op.execute("DROP TRIGGER IF EXISTS audit_log_no_replace")
        op.execute(_SQLITE_NO_REPLACE)
    elif dialect in ("mysql", "mariadb"):  # (DDL is not transactional there: both statements can run again)
        op.execute("DROP TRIGGER IF EXISTS audit_log_no_update")
        op.execute(_MYSQL_UPDATE)


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "sqlite":
        op.execute("DROP TRIGGER IF EXISTS audit_log_no_replace")
    elif dialect in ("mysql", "mariadb"):
        op.execute("DROP TRIGGER IF EXISTS audit_log_no_update")
        op.execute(_revision_0013().__dict__["_MYSQL_UPDATE"])


def _revision_0013() -> Any:
    """0013's module (its file name is no Python identifier): its trigger is what a downgrade restores."""
    path = Path(__file__).with_name("0013_audit_redaction.py")
    spec = importlib.util.spec_from_file_location("_clerk_sync_0013", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
