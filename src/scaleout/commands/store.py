"""`scaleout store ...`: the controller's store itself (issue 18)."""

from __future__ import annotations

import argparse
import sys

from scaleout.commands.exits import EXIT_OK, UsageError


def migrate(args: argparse.Namespace) -> int:
    """Copy a stopped controller's data dir (state.db and blob files) into PostgreSQL."""
    from scaleout.store.blobs import lock_data_dir
    from scaleout.store.migrate import migrate as copy
    from scaleout.store.pg import is_url, redact

    if not is_url(args.to):
        raise UsageError(f"--to must be a postgresql://USER[:PW]@HOST:PORT/DB URL, got {args.to.split('@')[-1]!r}")
    from urllib.parse import urlsplit

    if not urlsplit(args.to).path.strip("/"):  # libpq would pick a database named after the user (serve refuses it too)
        raise UsageError(f"--to names no database: postgresql://USER[:PW]@HOST:PORT/DB, got {args.to.split('@')[-1]!r}")
    src = args.source
    if not src.is_dir():
        raise UsageError(f"--from {src} is not a directory")
    lock = lock_data_dir(src, "stop it first: --from must name a stopped controller's data dir")  # a running controller there would go on writing what is being copied
    try:
        done = copy(src, args.to, replace=args.replace, progress=lambda line: print(line, file=sys.stderr, flush=True))
    finally:
        lock.close()
    rows = sum(done.rows.values())
    print(f"migrated {src} into {redact(args.to)}: {rows} rows in {len(done.rows)} tables, {done.blobs} blobs ({done.blob_bytes / (1 << 20):.1f} MiB)")
    if done.audit_head:
        print(f"audit head: {done.audit_head}")
    print(f"check it with: scaleout audit verify --store {redact(args.to)} --data-dir {src}")
    print(f"then run the controller with: scaleout serve --store {redact(args.to)} --data-dir {src} --key-file KEY (make one with: scaleout store keygen --out KEY)")
    return EXIT_OK


COMMANDS = {("store", "migrate"): migrate}
