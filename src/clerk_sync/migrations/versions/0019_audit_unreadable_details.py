"""audit_log: a row whose details the database cannot read as JSON may still be redacted, to the marker alone.

Releases before this one recorded ``details`` holding NaN or infinities (SQLite and MariaDB stored text no JSON
reader accepts) or nested 32 levels deep (MariaDB's JSON_VALID rejects it). The update guards read the old
details to judge a redaction (SQLite's ``json_each`` failed "malformed JSON"; MariaDB's trigger refused), so
every erasure of a person such a row named rolled back, every retry. Such a row may now become exactly
``{"redacted": true}``, nothing else (``retention._redacted_details`` writes that for it); a readable row is
judged as before. PostgreSQL refused such details when written: unchanged.

Revision ID: 0019
Revises: 0018
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from alembic import op

revision = "0019"
down_revision = "0018"
branch_labels = None
depends_on = None

_REFUSED = ("SIGNAL SQLSTATE '45000' "
            "SET MESSAGE_TEXT = 'audit_log is append-only: an update may only redact ip and details'")

# 0013's trigger, its details test under a CASE: json_each() of unreadable old details raised an error.
_SQLITE_UPDATE = """
CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log WHEN NOT coalesce((
NEW.id IS OLD.id AND NEW.action IS OLD.action AND NEW.actor_clerk_id IS OLD.actor_clerk_id
AND NEW.target_clerk_id IS OLD.target_clerk_id AND NEW.impersonator_clerk_id IS OLD.impersonator_clerk_id
AND NEW.created_at IS OLD.created_at
AND (NEW.ip IS NULL OR NEW.ip IS OLD.ip)
AND (NEW.details IS OLD.details
     OR CASE WHEN OLD.details IS NOT NULL AND NOT json_valid(OLD.details)
        THEN (json_valid(NEW.details) AND json_type(NEW.details) = 'object'
         AND json_type(NEW.details, '$.redacted') IS 'true' AND (SELECT count(*) FROM json_each(NEW.details)) = 1)
        ELSE (json_valid(NEW.details) AND json_type(NEW.details) = 'object'
         AND json_type(NEW.details, '$.redacted') IS 'true'
         AND (SELECT count(*) FROM json_each(NEW.details) AS n WHERE n.key = 'redacted') = 1
         AND NOT EXISTS (
           SELECT 1 FROM json_each(NEW.details) AS n
           WHERE n.key <> 'redacted'
             AND ((SELECT count(*) FROM json_each(NEW.details) AS d WHERE d.key = n.key) <> 1
                  OR NOT EXISTS (SELECT 1 FROM json_each(OLD.details) AS o
                                 WHERE o.key = n.key AND o.type = n.type AND o.value IS n.value))))
        END)), 0)
BEGIN SELECT RAISE(ABORT, 'audit_log is append-only: an update may only redact ip and details'); END
"""

# 0014's trigger, and before it reads the old details: unreadable ones may become the marker alone.
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
  IF NOT (BINARY NEW.details <=> BINARY OLD.details) AND OLD.details IS NOT NULL
      AND NOT JSON_VALID(OLD.details) THEN
    IF NOT COALESCE(JSON_VALID(NEW.details) AND JSON_TYPE(NEW.details) = 'OBJECT'
            AND JSON_LENGTH(NEW.details) = 1
            AND JSON_TYPE(JSON_EXTRACT(NEW.details, '$.redacted')) = 'BOOLEAN'
            AND CAST(JSON_EXTRACT(NEW.details, '$.redacted') AS CHAR) = 'true', FALSE) THEN
      REFUSED;
    END IF;
  ELSEIF NOT (BINARY NEW.details <=> BINARY OLD.details) THEN
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
    _replace(_SQLITE_UPDATE, _MYSQL_UPDATE)


def downgrade() -> None:
    _replace(_revision("0013_audit_redaction.py").__dict__["_SQLITE_UPDATE"],
             _revision("0014_audit_guards.py").__dict__["_MYSQL_UPDATE"])


def _replace(sqlite: str, mysql: str) -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "sqlite":
        op.execute("DROP TRIGGER IF EXISTS audit_log_no_update")
        op.execute(sqlite)
    elif dialect in ("mysql", "mariadb"):  # (DDL is not transactional there: both statements can run again)
        op.execute("DROP TRIGGER IF EXISTS audit_log_no_update")
        op.execute(mysql)


def _revision(file: str) -> Any:
    """An earlier revision's module (its file name is no Python identifier): its trigger is what a downgrade
    restores."""
    path = Path(__file__).with_name(file)
    spec = importlib.util.spec_from_file_location(f"_clerk_sync_{file[:4]}", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
