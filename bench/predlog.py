"""Benchmark: the prediction log's insert cost per row, by rows per transaction, on a store that has grown.

    python bench/predlog.py [--url sqlite:///...|postgresql+psycopg://...] [--grown 2000000] [--rows 100000]

Fills a fresh store to ``--grown`` rows with random ride ids (as real traffic has: each row's ride_id lands on
a random page of the ride_id index), then inserts ``--rows`` more through the log writer's own
``store.insert_predictions``, once per transaction size, and prints CPU and wall time per row. Ends with one
JSON line. Without ``--url`` it uses a SQLite file in a temporary folder (the embedded profile).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

from sqlalchemy import text

from tripcast.config import Settings
from tripcast.store import connect, insert_predictions, log_time, predictions

SIZES = (1_000, 5_000, Settings.log_batch_size)


def rows(n: int, prefix: str) -> list[tuple]:
    now = log_time()
    return [(f"{prefix}{random.getrandbits(64):016x}", now, now, 1 + i % 265, 1 + i * 7 % 265, 0.5 + i % 20, 12.5,
             "1", "champion", "api", None, None) for i in range(n)]


def insert(engine, batch: list[tuple], size: int) -> tuple[float, float]:
    """CPU and wall seconds to insert ``batch`` in transactions of ``size`` rows (this process's CPU only: a
    PostgreSQL server's share is not in it)."""
    cpu, wall = time.process_time(), time.perf_counter()
    for i in range(0, len(batch), size):
        with engine.begin() as conn:
            insert_predictions(conn, batch[i:i + size])
    return time.process_time() - cpu, time.perf_counter() - wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="SQLAlchemy URL of an empty store to fill (default: SQLite, temporary)")
    parser.add_argument("--grown", type=int, default=2_000_000, help="rows in the store before measuring")
    parser.add_argument("--rows", type=int, default=100_000, help="rows inserted per transaction size")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        engine = connect(args.url or f"sqlite:///{Path(tmp) / 'monitoring.db'}")
        with engine.connect() as conn:
            if conn.execute(text(f"SELECT count(*) FROM {predictions.name}")).scalar():
                sys.exit("bench/predlog.py needs an empty store: it fills it, then measures")
        print(f"filling the store to {args.grown:,} rows ...", flush=True)
        for i in range(0, args.grown, 50_000):
            insert(engine, rows(min(50_000, args.grown - i), "g"), 50_000)
        figures = {}
        for size in SIZES:
            cpu, wall = insert(engine, rows(args.rows, f"s{size}-"), size)
            figures[size] = {"cpu_us_per_row": round(cpu / args.rows * 1e6, 2),
                             "wall_us_per_row": round(wall / args.rows * 1e6, 2)}
            print(f"{size:>7,} rows per transaction: {figures[size]['cpu_us_per_row']:5.1f} us CPU, "
                  f"{figures[size]['wall_us_per_row']:5.1f} us wall per row", flush=True)
        engine.dispose()
    default, smallest = figures[Settings.log_batch_size], figures[SIZES[0]]
    ratio = smallest["cpu_us_per_row"] / default["cpu_us_per_row"]
    print(f"the default ({Settings.log_batch_size:,} rows) costs {1 / ratio:.0%} of the CPU per row of "
          f"{SIZES[0]:,}-row transactions")
    print(json.dumps({"benchmark": "predlog", "grown": args.grown, "rows": args.rows,
                      "by_transaction_rows": figures, "cpu_ratio_smallest_vs_default": round(ratio, 2)}))


if __name__ == "__main__":
    main()
