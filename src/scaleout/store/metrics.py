"""Reading what clients logged (``log_metric``) back out of ``state.db``.

A combiner reports each ``log_metric`` call as a report of kind ``metric`` whose data is
``{"metrics": {name: value, ...}, "step": N or null}``, tagged with the session, round and
client. Listed here one row per value. Telemetry (``log_telemetry``, Scaleout Edge's
system figures) is meant to arrive as reports of its own kind with the same data shape and
to be listed by the same query with ``kind="telemetry"``.

A combiner that dropped a client's metric messages (its rate limit, core/limits.py) reports
how many as a metric report with no values and a ``dropped`` count; ``dropped_metrics``
sums them per session, round and client.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from scaleout.store.state import State

KINDS = ("metric", "telemetry")  # report kinds that carry {"metrics": {...}, "step": ...}

_FROM = (
    " FROM reports AS r, json_each(r.data, '$.metrics') AS m"
    " WHERE r.kind = ? AND json_type(r.data, '$.metrics') = 'object' AND m.type IN ('integer', 'real')"
    # Rows stored before numbers were bounded on arrival may hold values beyond the float
    # range (SQLite reads them as inf): left out, so a listing is always JSON.
    " AND abs(m.value) <= 1.7976931348623157e308"
)
# The same in PostgreSQL's JSON functions (store/pg.py): the data is JSON text there too.
_INT = "'^-{0,1}[0-9]{1,18}$'"  # an integer within 64 bits, as SQLite's json_type 'integer'
_FROM_PG = (
    " FROM reports AS r CROSS JOIN LATERAL json_each(CASE WHEN json_typeof(r.data::json -> 'metrics') = 'object'"
    " THEN r.data::json -> 'metrics' END) WITH ORDINALITY AS m(key, value, id)"
    " WHERE r.kind = ? AND json_typeof(m.value) = 'number' AND abs((m.value::text)::numeric) <= 1.7976931348623157e308"
)
_STEP_PG = f"CASE WHEN json_typeof(r.data::json -> 'step') = 'number' AND (r.data::json ->> 'step') ~ {_INT} THEN (r.data::json ->> 'step')::bigint END"


def glob_regex(pattern: str) -> str:
    """A GLOB pattern (``train_*``, ``?``, ``[a-c]``, ``[^x]``) as a PostgreSQL regular expression."""
    out, i = ["^"], 0
    while i < len(pattern):
        c = pattern[i]
        end = pattern.find("]", i + 2) if c == "[" else -1
        if c == "*":
            out.append(".*")
        elif c == "?":
            out.append(".")
        elif end > 0:
            out.append("[" + pattern[i + 1:end].replace("\\", "\\\\") + "]")
            i = end
        else:
            out.append("\\" + c if not c.isalnum() and c != "_" else c)
        i += 1
    return "".join(out) + "$"


def logged_metrics(
    st: State, *, kind: str = "metric", session_id: str | None = None, round_index: int | None = None, client: str | None = None,
    key: str | None = None, limit: int = 0,
) -> tuple[list[dict[str, Any]], int]:
    """The values logged, oldest first: (the latest ``limit`` of them, or all with 0; how many
    match in all). ``client`` and ``key`` are globs (``train_*``), matched case-sensitively."""
    pg = st.postgres
    where = _FROM_PG if pg else _FROM
    args: list[Any] = [kind]
    for column, value, op in (("r.session_id", session_id, "="), ("r.round_index", round_index, "="), ("r.client", client, "GLOB"), ("m.key", key, "GLOB")):
        if value is not None:
            where += f" AND {column} {'~' if pg and op == 'GLOB' else op} ?"
            args.append(glob_regex(str(value)) if pg and op == "GLOB" else value)
    sql = (
        "SELECT r.session_id, r.round_index, r.client,"
        + (f" {_STEP_PG} AS step, m.key AS key, m.value::text AS value," if pg else
           " CASE WHEN json_type(r.data, '$.step') = 'integer' THEN json_extract(r.data, '$.step') END AS step, m.key AS key, m.value AS value,")
        + " r.created" + where + " ORDER BY r.id DESC, m.id DESC"
    )
    if limit > 0:
        sql += " LIMIT ?"
        cursor = st.db.execute(sql, (*args, min(limit + 1, (1 << 63) - 1)))  # one more tells whether there are more (within SQLite's INTEGER)
    else:
        cursor = st.db.execute(sql, args)
    rows = [dict(row) for row in cursor.fetchall()]
    for row in rows if pg else ():  # the number as its JSON text: an int or a float, as SQLite gives
        row["value"] = json.loads(row["value"])
    for row in rows:  # a step beyond 64 bits (stored before they were refused) reads as a float, inf: no step
        if not isinstance(row["step"], int):
            row["step"] = None
    total = len(rows)
    if limit > 0 and total > limit:
        rows = rows[:limit]
        total = st.db.execute("SELECT COUNT(*)" + where, args).fetchone()[0]
    rows.reverse()
    return rows, total


def dropped_metrics(
    st: State, *, kind: str = "metric", session_id: str | None = None, round_index: int | None = None, client: str | None = None,
) -> list[dict[str, Any]]:
    """How many metric messages the combiners dropped, per session, round and client (the
    same filters as ``logged_metrics``), in order."""
    pg = st.postgres
    sql = (
        "SELECT session_id, round_index, client, SUM((data::json ->> 'dropped')::bigint) AS dropped FROM reports"
        f" WHERE kind = ? AND json_typeof(data::json -> 'dropped') = 'number' AND (data::json ->> 'dropped') ~ {_INT}"
    ) if pg else (
        "SELECT session_id, round_index, client, SUM(json_extract(data, '$.dropped')) AS dropped FROM reports"
        " WHERE kind = ? AND json_type(data, '$.dropped') = 'integer'"
    )
    args: list[Any] = [kind]
    for column, value, op in (("session_id", session_id, "="), ("round_index", round_index, "="), ("client", client, "GLOB")):
        if value is not None:
            sql += f" AND {column} {'~' if pg and op == 'GLOB' else op} ?"
            args.append(glob_regex(str(value)) if pg and op == "GLOB" else value)
    sql += " GROUP BY session_id, round_index, client ORDER BY MIN(id)"
    return [dict(row) for row in st.db.execute(sql, args).fetchall()]
