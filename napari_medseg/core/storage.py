"""The workspace's index behind a small storage interface: named operations, and a transaction.

Every SQL statement of the workspace (its settings, the correction queue, the model
versions and the review worklist) lives here; :mod:`workspace` and :mod:`worklist` only
call the named operations. Reads are methods of the store; writes are methods of the
:class:`Transaction` that ``store.transaction()`` yields, which holds the write lock and
commits on a clean exit or rolls back on an exception:

    with store.transaction() as tx:
        tx.add_case(...)
        tx.update_case(case_id, status="predicted")

Rows come back as plain dicts with their JSON columns decoded, so that another server
(for a team's workspace) can implement the same operations.
"""

from __future__ import annotations

import json
import sqlite3
from contextlib import contextmanager
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    id TEXT PRIMARY KEY,
    created TEXT NOT NULL,
    status TEXT NOT NULL,                 -- queued, used, rejected
    split TEXT NOT NULL,                  -- train or validation (validation is never trained on)
    reviewer TEXT NOT NULL DEFAULT '',
    note TEXT NOT NULL DEFAULT '',
    model TEXT NOT NULL DEFAULT '',       -- the model version whose prediction was corrected
    edited_voxels INTEGER NOT NULL DEFAULT 0,
    label_names TEXT NOT NULL DEFAULT '{}',
    files TEXT NOT NULL,                  -- {"scan": sha256, "label": sha256, "prediction": sha256}
    used_by TEXT NOT NULL DEFAULT '',     -- the version that first learned from it
    origin TEXT NOT NULL DEFAULT ''       -- e.g. the worklist case it came from
);
CREATE TABLE IF NOT EXISTS cases (          -- the review worklist (see worklist.py)
    id TEXT PRIMARY KEY,
    added TEXT NOT NULL,
    name TEXT NOT NULL,
    source TEXT NOT NULL,                 -- the scan file or DICOM folder, as the user gave it
    series TEXT NOT NULL DEFAULT '',      -- DICOM series UID
    volume INTEGER NOT NULL DEFAULT -1,   -- which volume of a multi-volume file or series
    date TEXT NOT NULL DEFAULT '',        -- the scan file's modification date
    status TEXT NOT NULL,                 -- new, predicted, in review, accepted, corrected, skipped, failed
    reason TEXT NOT NULL DEFAULT '',      -- why it was skipped or failed (one line)
    model TEXT NOT NULL DEFAULT '',       -- the model version that predicted it
    score REAL,                           -- uncertainty score (higher: more doubtful)
    warnings TEXT NOT NULL DEFAULT '[]',  -- why the result looks implausible (volumes, extent)
    volumes TEXT NOT NULL DEFAULT '[]',   -- label volumes in mL
    reviewer TEXT NOT NULL DEFAULT '',
    item TEXT NOT NULL DEFAULT '',        -- the queue item of a submitted correction
    files TEXT NOT NULL DEFAULT '{}',     -- {"mask": sha256, "uncertainty": sha256, "reviewed": sha256}
    updated TEXT NOT NULL DEFAULT '',
    UNIQUE (source, series, volume)
);
CREATE TABLE IF NOT EXISTS versions (
    version TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    created TEXT NOT NULL,
    parent TEXT NOT NULL DEFAULT '',
    status TEXT NOT NULL,                 -- promoted, rejected, base
    reason TEXT NOT NULL DEFAULT '',
    metrics TEXT NOT NULL DEFAULT '{}',
    lineage TEXT NOT NULL DEFAULT '[]',   -- the items it was trained on
    sha256 TEXT NOT NULL DEFAULT ''
);
"""
ITEM_COLUMNS = ("id", "created", "status", "split", "reviewer", "note", "model", "edited_voxels", "label_names",
                "files", "used_by", "origin")
CASE_COLUMNS = ("id", "added", "name", "source", "series", "volume", "date", "status", "reason", "model", "score",
                "warnings", "volumes", "reviewer", "item", "files", "updated")
VERSION_COLUMNS = ("version", "model", "created", "parent", "status", "reason", "metrics", "lineage", "sha256")
JSON_COLUMNS = {"items": ("label_names", "files"), "cases": ("warnings", "volumes", "files"),
                "versions": ("metrics", "lineage")}
# The worklist's orders: implausible results first, then the most doubtful, then unscored cases as added.
CASE_ORDERS = {"uncertainty": "warnings = '[]', score IS NULL, score DESC, rowid",
               "name": "name COLLATE NOCASE, rowid", "date": "date DESC, rowid", "added": "rowid"}
StorageError = sqlite3.Error


def _decoded(table: str, columns: tuple, row) -> dict:
    data = dict(zip(columns, row))
    for column in JSON_COLUMNS[table]:
        data[column] = json.loads(data[column])
    return data


def _encoded(table: str, fields: dict) -> dict:
    return {key: json.dumps(value) if key in JSON_COLUMNS[table] else value for key, value in fields.items()}


def _assignments(table: str, columns: tuple, fields: dict) -> tuple[str, list]:
    unknown = set(fields) - set(columns)
    if unknown:
        raise ValueError(f"{table} has no column {sorted(unknown)}")
    fields = _encoded(table, fields)
    return ", ".join(f"{key} = ?" for key in fields), list(fields.values())


class Transaction:
    """The write operations, inside one transaction that holds the write lock."""

    def __init__(self, db: sqlite3.Connection):
        self._db = db

    # settings
    def set_setting(self, key: str, value) -> None:
        self._db.execute("INSERT OR REPLACE INTO settings (key, value) VALUES (?, ?)", (key, json.dumps(value)))

    # the correction queue
    def item_ids(self) -> set:
        return {row[0] for row in self._db.execute("SELECT id FROM items")}

    def count_items(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM items").fetchone()[0]

    def _insert(self, table: str, fields: dict, verb: str = "INSERT"):
        fields = _encoded(table, fields)
        return self._db.execute(f"{verb} INTO {table} ({', '.join(fields)}) VALUES ({', '.join('?' * len(fields))})",
                                list(fields.values()))

    def insert_item(self, **fields) -> None:
        self._insert("items", fields)

    def set_item_status(self, item_id: str, status: str, used_by: str = "") -> None:
        """The item's status; ``used_by`` is kept from the first version that learned from it."""
        self._db.execute("UPDATE items SET status = ?, used_by = CASE WHEN used_by = '' THEN ? ELSE used_by END "
                         "WHERE id = ?", (status, used_by, item_id))

    # model versions
    def record_version(self, **fields) -> None:
        self._insert("versions", fields, "INSERT OR REPLACE")

    # the worklist
    def add_case(self, **fields) -> bool:
        """Add a case; False when the same scan (source, series, volume) is listed already."""
        return bool(self._insert("cases", fields, "INSERT OR IGNORE").rowcount)

    def update_case(self, case_id: str, **fields) -> None:
        assignments, values = _assignments("cases", CASE_COLUMNS, fields)
        self._db.execute(f"UPDATE cases SET {assignments} WHERE id = ?", [*values, case_id])

    def committed_case_ids(self) -> set:
        """The cases whose result files are committed (their folders must stay)."""
        return {row[0] for row in self._db.execute("SELECT id FROM cases WHERE files != '{}'")}


class SQLiteStore:
    """The index of a workspace in one SQLite file (WAL, synchronous writes), shared by processes."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._db = sqlite3.connect(str(self.path), timeout=60, isolation_level=None, check_same_thread=False)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA busy_timeout=60000")
            self._db.executescript(SCHEMA)
        except sqlite3.Error:
            self._db.close()
            raise

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def transaction(self):
        """A write transaction: BEGIN IMMEDIATE takes SQLite's write lock at once."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield Transaction(self._db)
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _rows(self, sql: str, values=()) -> list:
        return self._db.execute(sql, values).fetchall()

    # settings
    def setting(self, key: str, default=None):
        rows = self._rows("SELECT value FROM settings WHERE key = ?", (key,))
        return json.loads(rows[0][0]) if rows else default

    # the correction queue
    def items(self, status: str | None = None, split: str | None = None) -> list:
        """Items in submission order (SQLite rowid): the same in every copy of a workspace,
        so training is reproducible."""
        wanted = {key: value for key, value in (("status", status), ("split", split)) if value}
        where = (" WHERE " + " AND ".join(f"{key} = ?" for key in wanted)) if wanted else ""
        rows = self._rows(f"SELECT {', '.join(ITEM_COLUMNS)} FROM items{where} ORDER BY rowid", list(wanted.values()))
        return [_decoded("items", ITEM_COLUMNS, row) for row in rows]

    # model versions
    def versions(self) -> list:
        return [_decoded("versions", VERSION_COLUMNS, row)
                for row in self._rows(f"SELECT {', '.join(VERSION_COLUMNS)} FROM versions")]

    # the worklist
    def cases(self, order: str = "uncertainty", statuses: tuple = ()) -> list:
        where = f" WHERE status IN ({', '.join('?' * len(statuses))})" if statuses else ""
        rows = self._rows(f"SELECT {', '.join(CASE_COLUMNS)} FROM cases{where} ORDER BY {CASE_ORDERS[order]}",
                          list(statuses))
        return [_decoded("cases", CASE_COLUMNS, row) for row in rows]

    def cases_matching(self, case_id: str) -> list:
        """The cases whose id is ``case_id`` or starts with it."""
        rows = self._rows(f"SELECT {', '.join(CASE_COLUMNS)} FROM cases WHERE id = ? OR id LIKE ?",
                          (case_id, f"{case_id}%"))
        return [_decoded("cases", CASE_COLUMNS, row) for row in rows]

    def case_counts(self) -> dict:
        return dict(self._rows("SELECT status, COUNT(*) FROM cases GROUP BY status"))
