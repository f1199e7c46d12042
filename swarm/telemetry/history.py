"""The monitor's history: every collection, in an SQLite file that outlives the monitor.

Three tables: ``swarm`` (one row per collection: peers online, throughput, epoch, loss, refusals), ``peer_samples``
(one row per genuine peer per collection) and ``peers`` (one row per peer ever seen: first and last
seen, and its contribution). A peer's counters restart at zero when its process restarts;
``peers.contributed`` (samples), ``peers.compute_seconds`` (uptime of a trainer) and
``peers.rounds_joined`` (averaging rounds, ok or failed) add up the increases, so they survive peer
restarts and monitor restarts. ``peers.refused`` is what the peer's current process refused.
One connection, guarded by a lock: a collector thread writes, HTTP threads read.
"""

from __future__ import annotations

import csv
import io
import sqlite3
import threading
from pathlib import Path
from typing import Iterator, Optional

from swarm.errors import MonitorError
from swarm.telemetry.collector import SwarmView
from swarm.telemetry.text import csv_cell

SCHEMA_VERSION = 1
SWARM_COLUMNS = ["time", "peers_online", "trainers", "samples_per_second", "epoch", "loss", "heldout_loss",
                 "samples_total", "rounds_ok", "rounds_failed", "flagged", "refused"]
PEER_SAMPLE_COLUMNS = ["time", "peer_id", "role", "state", "epoch", "samples_total", "samples_per_second", "loss",
                       "heldout_loss", "bytes_sent", "bytes_received", "rounds_ok", "rounds_failed", "reachability",
                       "uptime"]
PEER_COLUMNS = ["peer_id", "role", "display_name", "organization", "device", "version", "first_seen", "last_seen",
                "state", "contributed", "last_samples_total", "last_uptime", "rounds_ok", "rounds_failed",
                "compute_seconds", "rounds_joined", "refused"]
# columns added to ``peers`` after SCHEMA_VERSION 1 was released: added to an older file when it is opened
ADDED_PEER_COLUMNS = {"compute_seconds": "REAL NOT NULL DEFAULT 0", "rounds_joined": "INTEGER NOT NULL DEFAULT 0",
                      "refused": "INTEGER NOT NULL DEFAULT 0"}
PEER_SERIES_COLUMNS = ["time", "epoch", "samples_total", "samples_per_second", "loss", "bytes_sent", "bytes_received"]
MAX_PEER_SERIES = 32  # peers in /api/history/peers: the most recently seen (a swarm may hold many short-lived ids)
TABLES = {"swarm": SWARM_COLUMNS, "peer_samples": PEER_SAMPLE_COLUMNS, "peers": PEER_COLUMNS}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS swarm (time REAL NOT NULL, peers_online INTEGER, trainers INTEGER,
    samples_per_second REAL, epoch INTEGER, loss REAL, heldout_loss REAL, samples_total INTEGER,
    rounds_ok INTEGER, rounds_failed INTEGER, flagged INTEGER, refused INTEGER);
CREATE INDEX IF NOT EXISTS swarm_time ON swarm (time);
CREATE TABLE IF NOT EXISTS peer_samples (time REAL NOT NULL, peer_id TEXT NOT NULL, role TEXT, state TEXT,
    epoch INTEGER, samples_total INTEGER, samples_per_second REAL, loss REAL, heldout_loss REAL,
    bytes_sent INTEGER, bytes_received INTEGER, rounds_ok INTEGER, rounds_failed INTEGER, reachability TEXT,
    uptime REAL);
CREATE INDEX IF NOT EXISTS peer_samples_time ON peer_samples (time);
CREATE TABLE IF NOT EXISTS peers (peer_id TEXT PRIMARY KEY, role TEXT, display_name TEXT, organization TEXT,
    device TEXT, version TEXT, first_seen REAL, last_seen REAL, state TEXT, contributed INTEGER NOT NULL DEFAULT 0,
    last_samples_total INTEGER, last_uptime REAL, rounds_ok INTEGER, rounds_failed INTEGER,
    compute_seconds REAL NOT NULL DEFAULT 0, rounds_joined INTEGER NOT NULL DEFAULT 0,
    refused INTEGER NOT NULL DEFAULT 0);
"""


class History:
    """Opens (or creates) the history of run ``run_id`` at ``path``.

    :raises MonitorError: the file is not an SQLite database, or it holds the history of another run.
    """

    def __init__(self, path: Path, run_id: str):
        self.path, self.run_id = Path(path), run_id
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.row_factory = sqlite3.Row
            self._db.executescript(_SCHEMA)
            self._check_meta()
            self._add_columns()
        except (sqlite3.DatabaseError, OSError) as e:
            raise MonitorError(f"cannot use {self.path} as the monitor's history: {e}") from None

    def _check_meta(self) -> None:
        meta = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
        if not meta:
            self._db.executemany("INSERT INTO meta VALUES (?, ?)",
                                 [("run_id", self.run_id), ("schema_version", str(SCHEMA_VERSION))])
        elif meta.get("run_id") != self.run_id:
            raise MonitorError(f"{self.path} holds the history of run {meta.get('run_id')!r}, not {self.run_id!r}; "
                               f"set monitor.db_path to another file")
        elif meta.get("schema_version") != str(SCHEMA_VERSION):
            raise MonitorError(f"{self.path} has history format {meta.get('schema_version')}, "
                               f"this monitor writes {SCHEMA_VERSION}; set monitor.db_path to another file")

    def _add_columns(self) -> None:
        present = {row["name"] for row in self._db.execute("PRAGMA table_info(peers)")}
        for column, declaration in ADDED_PEER_COLUMNS.items():
            if column not in present:
                self._db.execute(f"ALTER TABLE peers ADD COLUMN {column} {declaration}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def record(self, view: SwarmView) -> None:
        """Append one collection and update every peer it saw, in one transaction."""
        totals, now = view.totals, view.time
        with self._lock, self._db:
            self._db.execute("BEGIN")
            self._db.execute(
                f"INSERT INTO swarm VALUES ({', '.join('?' * len(SWARM_COLUMNS))})",
                (now, totals["peers_online"], totals["trainers"], totals["samples_per_second"], totals["epoch"],
                 totals["loss"], totals["heldout_loss"], totals["samples_total"], totals["rounds_ok"],
                 totals["rounds_failed"], len(view.flagged),
                 _refused_total(view)),
            )
            for peer in view.peers + view.left:
                self._db.execute(
                    f"INSERT INTO peer_samples VALUES ({', '.join('?' * len(PEER_SAMPLE_COLUMNS))})",
                    (now, *(peer[column] for column in PEER_SAMPLE_COLUMNS[1:])),
                )
                self._update_peer(peer, now)
            seen = [peer["peer_id"] for peer in view.peers + view.left]
            # peers whose records expired without a "left" record (crashed, or cut off) have left too
            self._db.execute(
                f"UPDATE peers SET state = 'left' WHERE state != 'left' "
                f"AND peer_id NOT IN ({', '.join('?' * len(seen))})", seen,
            )

    def _update_peer(self, peer: dict, now: float) -> None:
        row = self._db.execute("SELECT * FROM peers WHERE peer_id = ?", (peer["peer_id"],)).fetchone()
        rounds = peer["rounds_ok"] + peer["rounds_failed"]
        trainer = peer["role"] != "bootstrap"
        if row is None:
            contributed, compute, joined = peer["samples_total"], peer["uptime"] if trainer else 0.0, rounds
        else:
            last_rounds = (row["rounds_ok"] or 0) + (row["rounds_failed"] or 0)
            restarted = (peer["uptime"] < (row["last_uptime"] or 0.0)
                         or peer["samples_total"] < (row["last_samples_total"] or 0) or rounds < last_rounds)
            # a restarted peer's counters restarted too: all of their values are new
            before = (0, 0.0, 0) if restarted else (row["last_samples_total"] or 0, row["last_uptime"] or 0.0,
                                                    last_rounds)
            contributed = row["contributed"] + peer["samples_total"] - before[0]
            compute = row["compute_seconds"] + (peer["uptime"] - before[1] if trainer else 0.0)
            joined = row["rounds_joined"] + rounds - before[2]
        refused = sum(peer["refused"].values()) + sum(peer["refused_requests"].values())
        self._db.execute(
            """INSERT INTO peers (peer_id, role, display_name, organization, device, version, first_seen, last_seen,
                   state, contributed, last_samples_total, last_uptime, rounds_ok, rounds_failed, compute_seconds,
                   rounds_joined, refused)
               VALUES (:peer_id, :role, :display_name, :organization, :device, :version, :now, :now,
                   :state, :contributed, :samples_total, :uptime, :rounds_ok, :rounds_failed, :compute, :joined,
                   :refused_count)
               ON CONFLICT (peer_id) DO UPDATE SET role = :role, display_name = :display_name,
                   organization = :organization, device = :device, version = :version, last_seen = :now,
                   state = :state, contributed = :contributed, last_samples_total = :samples_total,
                   last_uptime = :uptime, rounds_ok = :rounds_ok, rounds_failed = :rounds_failed,
                   compute_seconds = :compute, rounds_joined = :joined, refused = :refused_count""",
            {**peer, "now": now, "contributed": contributed, "compute": compute, "joined": joined,
             "refused_count": refused},
        )

    def prune(self, older_than: float) -> None:
        """Forget collections before ``older_than`` (wall-clock seconds); peers keep their totals."""
        with self._lock, self._db:
            self._db.execute("DELETE FROM swarm WHERE time < ?", (older_than,))
            self._db.execute("DELETE FROM peer_samples WHERE time < ?", (older_than,))

    def swarm_series(self, *, since: float = 0.0, max_points: int = 1000) -> list[dict]:
        """Swarm rows from ``since`` on, averaged into at most ``max_points`` time buckets, each with the
        bytes the peers of that collection had sent and received (``bytes_sent``, ``bytes_received``)."""
        with self._lock:
            group = self._bucket_of("s.time", since, max_points)
            if group is None:
                return []
            averaged = ", ".join(f"AVG(s.{column}) AS {column}" for column in SWARM_COLUMNS[1:])
            rows = self._db.execute(
                f"""SELECT MAX(s.time) AS time, {averaged}, AVG(t.sent) AS bytes_sent, AVG(t.received) AS bytes_received
                    FROM swarm AS s LEFT JOIN (SELECT time, SUM(bytes_sent) AS sent, SUM(bytes_received) AS received
                                               FROM peer_samples WHERE time >= ? GROUP BY time) AS t ON t.time = s.time
                    WHERE s.time >= ? GROUP BY {group} ORDER BY time""", (since, since)).fetchall()
            return [dict(row) for row in rows]

    def peer_series(self, *, since: float = 0.0, max_points: int = 1000) -> dict[str, list[dict]]:
        """Each peer's rows (:data:`PEER_SERIES_COLUMNS`) from ``since`` on, in the same time buckets as
        :meth:`swarm_series`; at most :data:`MAX_PEER_SERIES` peers, the most recently seen."""
        with self._lock:
            group = self._bucket_of("time", since, max_points)
            if group is None:
                return {}
            shown = [row[0] for row in self._db.execute(
                "SELECT peer_id FROM peers ORDER BY last_seen DESC, peer_id LIMIT ?", (MAX_PEER_SERIES,))]
            averaged = ", ".join(f"AVG({column}) AS {column}" for column in PEER_SERIES_COLUMNS[1:])
            rows = self._db.execute(
                f"""SELECT peer_id, MAX(time) AS time, {averaged} FROM peer_samples
                    WHERE time >= ? AND peer_id IN ({', '.join('?' * len(shown))})
                    GROUP BY peer_id, {group} ORDER BY time""", (since, *shown)).fetchall()
        series: dict[str, list[dict]] = {}
        for row in rows:
            series.setdefault(row["peer_id"], []).append({column: row[column] for column in PEER_SERIES_COLUMNS})
        return series

    def _bucket_of(self, column: str, since: float, max_points: int) -> Optional[str]:
        """The SQL expression that puts the rows from ``since`` on into at most ``max_points`` time buckets
        (each row its own while they are few enough), or None if there is no row."""
        first, last, count = self._db.execute(
            "SELECT MIN(time), MAX(time), COUNT(*) FROM swarm WHERE time >= ?", (since,)).fetchone()
        if not count:
            return None
        if count <= max_points:
            return column
        return f"CAST(({column} - {float(first)!r}) / {(last - first) / max_points or 1.0!r} AS INTEGER)"

    def peers(self) -> list[dict]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM peers ORDER BY contributed DESC, peer_id").fetchall()
        return [dict(row) for row in rows]

    def first_time(self) -> Optional[float]:
        with self._lock:
            return self._db.execute("SELECT MIN(time) FROM swarm").fetchone()[0]

    def csv_rows(self, table: str) -> Iterator[str]:
        """The whole table as CSV text, header first, a chunk of rows at a time.

        :raises KeyError: ``table`` is not one of :data:`TABLES`.
        """
        columns = TABLES[table]
        with self._lock:
            rows = self._db.execute(f"SELECT {', '.join(columns)} FROM {table} ORDER BY {columns[0]}").fetchall()
        return _csv_chunks(columns, rows)

    def export_csv(self, directory: Path) -> list[Path]:
        """Write ``swarm.csv``, ``peer_samples.csv`` and ``peers.csv`` into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        written = []
        for table in TABLES:
            path = directory / f"{table}.csv"
            with open(path, "w", newline="") as file:
                for chunk in self.csv_rows(table):
                    file.write(chunk)
            written.append(path)
        return written


def _refused_total(view: SwarmView) -> int:
    """The ``refused`` column: DHT records and requests the peers refused, and records this monitor refused."""
    totals = view.totals
    return sum(view.refused.values()) + sum(totals["refused"].values()) + sum(totals["refused_requests"].values())


def _csv_chunks(columns: list[str], rows: list) -> Iterator[str]:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for index, row in enumerate(rows, 1):
        writer.writerow([csv_cell(value) for value in row])  # peer-chosen names must not run as formulas
        if index % 1000 == 0:
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue()
