"""Plays Session-Buddy for the snapshot test: holds a reflection.duckdb open for writing (so no other process
can open it) and inserts one conversation every 100 ms, checkpointing now and then as DuckDB does.

usage: session_buddy_writer.py <reflection.duckdb> <count>
Prints "ready" once the database is open and "done <rows>" when every insert succeeded; then waits for stdin to
close before releasing the database.
"""
import sys
import time

import duckdb

path, count = sys.argv[1], int(sys.argv[2])
con = duckdb.connect(path)
print("ready", flush=True)
for i in range(count):
    con.execute(
        "INSERT INTO conversations_v2 (id, content, embedding, category, timestamp, project) "
        "VALUES (?, ?, ?, 'live', now()::TIMESTAMP, 'live-writer')",
        [f"live-{i:04d}", f"written while the agent snapshots, number {i}", [((i + d) % 97) / 97.0 for d in range(384)]],
    )
    if i % 10 == 9:
        con.execute("CHECKPOINT")
    time.sleep(0.1)
rows = con.execute("SELECT count(*) FROM conversations_v2").fetchone()[0]
print(f"done {rows}", flush=True)
sys.stdin.read()
con.close()
