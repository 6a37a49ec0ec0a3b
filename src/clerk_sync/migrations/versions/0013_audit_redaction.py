"""audit_log stays append-only, except a redaction: an erasure may clear ``ip`` and redact ``details``.

0004's triggers refuse every UPDATE and DELETE of ``audit_log``, so an erased admin's IP address, and
an e-mail address a row's ``details`` quoted (a free-text reason, an error message), stayed for good.
These triggers still refuse every DELETE, and every UPDATE except one that keeps ``id``, ``action``,
the three Clerk ids (pseudonymous: who did what stays on record) and ``created_at``, and in which

* ``ip`` is unchanged or becomes NULL, and
* ``details`` is unchanged or becomes its redacted form: an object whose ``redacted`` is ``true`` and
  whose other keys are keys of the old object with their values unchanged (a redaction only drops keys;
  ``clerk_sync.retention._redacted_details``). A key holding ``"`` or ``\\`` is refused on
  MySQL/MariaDB, where a JSON path names it; so is a key given twice, anywhere.

So a database user who can write ``audit_log`` can drop information from a row, marked ``redacted``, but
can neither add nor change any, nor delete a row. (A redaction compares values as the JSON text the
store holds, or ``jsonb`` on PostgreSQL: it is strict, never lenient; a condition that comes out NULL
refuses.)

Revision ID: 0013
Revises: 0012
"""

from __future__ import annotations

from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

# What a refused UPDATE or DELETE says: "audit_log is append-only: an update may only redact ip and details"
# (0004's message, "audit_log is append-only", begins it; the downgrade restores that one).

# -- PostgreSQL: one function behind 0004's trigger (BEFORE UPDATE OR DELETE, FOR EACH ROW) ---------------
_PG_FUNCTION = """
CREATE OR REPLACE FUNCTION clerk_sync_audit_append_only() RETURNS trigger AS $$
BEGIN
  IF TG_OP = 'UPDATE'
     AND NEW.id = OLD.id AND NEW.action = OLD.action
     AND NEW.actor_clerk_id IS NOT DISTINCT FROM OLD.actor_clerk_id
     AND NEW.target_clerk_id IS NOT DISTINCT FROM OLD.target_clerk_id
     AND NEW.impersonator_clerk_id IS NOT DISTINCT FROM OLD.impersonator_clerk_id
     AND NEW.created_at = OLD.created_at
     AND (NEW.ip IS NULL OR NEW.ip IS NOT DISTINCT FROM OLD.ip)
     AND (NEW.details = OLD.details
          OR (jsonb_typeof(NEW.details) = 'object' AND NEW.details -> 'redacted' = 'true'::jsonb
              AND NOT EXISTS (SELECT 1 FROM jsonb_each(NEW.details) AS n
                              WHERE n.key <> 'redacted' AND (OLD.details -> n.key) IS DISTINCT FROM n.value)))
  THEN
    RETURN NEW;
  END IF;
  RAISE EXCEPTION 'audit_log is append-only: an update may only redact ip and details';
END;
$$ LANGUAGE plpgsql
"""
_PG_APPEND_ONLY = """
CREATE OR REPLACE FUNCTION clerk_sync_audit_append_only() RETURNS trigger AS $$
BEGIN
  RAISE EXCEPTION 'audit_log is append-only';
END;
$$ LANGUAGE plpgsql
"""

# -- SQLite: details is JSON text; json_each lists every member (a key given twice, twice) ------------------
_SQLITE_UPDATE = """
CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log WHEN NOT coalesce((
NEW.id IS OLD.id AND NEW.action IS OLD.action AND NEW.actor_clerk_id IS OLD.actor_clerk_id
AND NEW.target_clerk_id IS OLD.target_clerk_id AND NEW.impersonator_clerk_id IS OLD.impersonator_clerk_id
AND NEW.created_at IS OLD.created_at
AND (NEW.ip IS NULL OR NEW.ip IS OLD.ip)
AND (NEW.details IS OLD.details
     OR (json_valid(NEW.details) AND json_type(NEW.details) = 'object'
         AND json_type(NEW.details, '$.redacted') IS 'true'
         AND (SELECT count(*) FROM json_each(NEW.details) AS n WHERE n.key = 'redacted') = 1
         AND NOT EXISTS (
           SELECT 1 FROM json_each(NEW.details) AS n
           WHERE n.key <> 'redacted'
             AND ((SELECT count(*) FROM json_each(NEW.details) AS d WHERE d.key = n.key) <> 1
                  OR NOT EXISTS (SELECT 1 FROM json_each(OLD.details) AS o
                                 WHERE o.key = n.key AND o.type = n.type AND o.value IS n.value)))))), 0)
BEGIN SELECT RAISE(ABORT, 'audit_log is append-only: an update may only redact ip and details'); END
"""
_SQLITE_APPEND_ONLY = ("CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log "
                       "BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END")

# -- MySQL/MariaDB: details is JSON text (``JSONText``); a loop over its keys, compared as bytes -------------
_MYSQL_UPDATE = """
CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log FOR EACH ROW
BEGIN
  DECLARE i INT DEFAULT 0;
  DECLARE n INT;
  DECLARE k LONGTEXT;
  DECLARE p LONGTEXT;
  IF NOT COALESCE(NEW.id <=> OLD.id AND BINARY NEW.action <=> BINARY OLD.action
          AND BINARY NEW.actor_clerk_id <=> BINARY OLD.actor_clerk_id
          AND BINARY NEW.target_clerk_id <=> BINARY OLD.target_clerk_id
          AND BINARY NEW.impersonator_clerk_id <=> BINARY OLD.impersonator_clerk_id
          AND NEW.created_at <=> OLD.created_at
          AND (NEW.ip IS NULL OR BINARY NEW.ip <=> BINARY OLD.ip), FALSE) THEN
    SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'audit_log is append-only: an update may only redact ip and details';
  END IF;
  IF NOT (BINARY NEW.details <=> BINARY OLD.details) THEN
    IF NOT COALESCE(JSON_VALID(NEW.details) AND JSON_TYPE(NEW.details) = 'OBJECT'
            AND JSON_VALID(OLD.details) AND JSON_TYPE(OLD.details) = 'OBJECT'
            AND JSON_TYPE(JSON_EXTRACT(NEW.details, '$.redacted')) = 'BOOLEAN'
            AND CAST(JSON_EXTRACT(NEW.details, '$.redacted') AS CHAR) = 'true'
            AND JSON_LENGTH(NEW.details) = JSON_LENGTH(JSON_KEYS(NEW.details)), FALSE) THEN
      SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'audit_log is append-only: an update may only redact ip and details';
    END IF;
    SET n = JSON_LENGTH(JSON_KEYS(NEW.details));
    WHILE i < n DO
      SET k = JSON_UNQUOTE(JSON_EXTRACT(JSON_KEYS(NEW.details), CONCAT('$[', i, ']')));
      IF COALESCE(LOCATE('"', k) > 0 OR LOCATE('\\\\', k) > 0, TRUE) THEN
        SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'audit_log is append-only: an update may only redact ip and details';
      END IF;
      SET p = CONCAT('$."', k, '"');
      IF BINARY k <> BINARY 'redacted' AND NOT (
          CAST(JSON_EXTRACT(NEW.details, p) AS BINARY) <=> CAST(JSON_EXTRACT(OLD.details, p) AS BINARY)) THEN
        SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'audit_log is append-only: an update may only redact ip and details';
      END IF;
      SET i = i + 1;
    END WHILE;
  END IF;
END
"""
_MYSQL_APPEND_ONLY = ("CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log FOR EACH ROW "
                      "SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'audit_log is append-only'")


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "postgresql":
        op.execute(_PG_FUNCTION)  # 0004's trigger calls it, for UPDATE and DELETE
    elif dialect == "sqlite":
        op.execute("DROP TRIGGER IF EXISTS audit_log_no_update")
        op.execute(_SQLITE_UPDATE)
    elif dialect in ("mysql", "mariadb"):  # (DDL is not transactional there: both statements can run again)
        op.execute("DROP TRIGGER IF EXISTS audit_log_no_update")
        op.execute(_MYSQL_UPDATE)


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "postgresql":
        op.execute(_PG_APPEND_ONLY)
    elif dialect == "sqlite":
        op.execute("DROP TRIGGER IF EXISTS audit_log_no_update")
        op.execute(_SQLITE_APPEND_ONLY)
    elif dialect in ("mysql", "mariadb"):
        op.execute("DROP TRIGGER IF EXISTS audit_log_no_update")
        op.execute(_MYSQL_APPEND_ONLY)
