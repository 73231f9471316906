"""Reading each client's validations back out of ``state.db``, one record per client and round.

A combiner reports each client's answer to a validate task as a report of kind ``validate``
whose data is what the validate callback returned ({metric: value, ...}); the round's row
names the model validated. The round's ``validation`` field keeps the clients' mean.
Listed here as Scaleout Edge and FEDn list validations: ``{"id", "model_id", "session_id",
"round_index", "sender": {"name", "role"}, "data", "created"}``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from scaleout.store.state import State

_FROM = (
    " FROM reports AS r LEFT JOIN rounds AS d ON d.session_id = r.session_id AND d.idx = r.round_index"
    " WHERE r.kind = 'validate' AND r.error IS NULL"  # a failed validation carries no metrics
)


def client_validations(
    st: State, *, session_id: str | None = None, model_id: str | None = None, client: str | None = None, limit: int = 0,
) -> tuple[list[dict[str, Any]], int]:
    """The clients' validations, oldest first: (the latest ``limit`` of them, or all with 0;
    how many match in all), of one session, one model (a full id) and one client if given."""
    where = _FROM
    args: list[Any] = []
    for column, value in (("r.session_id", session_id), ("d.model_id", model_id), ("r.client", client)):
        if value is not None:
            where += f" AND {column} = ?"
            args.append(value)
    sql = "SELECT r.id, d.model_id, r.session_id, r.round_index, r.client, r.data, r.created" + where + " ORDER BY r.id DESC"
    if limit > 0:
        sql += " LIMIT ?"
        rows = st._all(sql, *args, min(limit + 1, (1 << 63) - 1))  # one more tells whether there are more
    else:
        rows = st._all(sql, *args)
    total = len(rows)
    if limit > 0 and total > limit:
        rows = rows[:limit]
        total = st.db.execute("SELECT COUNT(*)" + where, args).fetchone()[0]
    out = [
        {
            "id": str(row["id"]), "model_id": row["model_id"], "session_id": row["session_id"], "round_index": row["round_index"],
            "sender": {"name": row["client"], "role": "client"}, "data": row["data"] if isinstance(row["data"], dict) else {},
            "created": row["created"],
        }
        for row in reversed(rows)
    ]
    return out, total
