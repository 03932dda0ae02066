"""The Python peer's side of `cargo bench --bench peer`: akosha 0.24.5's HotStore (the store its ingestion
worker and search tools use), driven the way its ingestion worker drives it — one awaited `insert` per record —
then `search_similar` for each query vector. Prints one JSON object.

Usage: peer_bench.py <dataset.jsonl> <queries.json>
"""

import asyncio
import json
import sys
import time
from datetime import UTC, datetime


async def main(dataset_path: str, queries_path: str) -> None:
    from akosha.storage.hot_store import HotStore
    from akosha.storage.models import HotRecord

    with open(dataset_path) as f:
        rows = [json.loads(line) for line in f]
    with open(queries_path) as f:
        queries = json.load(f)
    records = [
        HotRecord(
            system_id=row["system_id"],
            conversation_id=row["id"],
            content=row["text"],
            embedding=row["embedding"],
            timestamp=datetime.fromtimestamp(row["ts"] / 1e6, UTC),
            metadata={"project": row["project"]},
        )
        for row in rows
    ]
    store = HotStore(":memory:", embedding_dim=384)
    await store.initialize()
    started = time.perf_counter()
    for record in records:
        await store.insert(record)
    insert_s = time.perf_counter() - started

    latencies = []
    answers = []
    for q in queries:
        t = time.perf_counter()
        hits = await store.search_similar(q, limit=10, threshold=0.0)
        latencies.append((time.perf_counter() - t) * 1000)
        answers.append([h["conversation_id"] for h in hits])
    latencies.sort()

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))]

    print(json.dumps({
        "records": len(records),
        "insert_s": insert_s,
        "insert_per_s": len(records) / insert_s,
        "search_p50_ms": pct(0.50),
        "search_p99_ms": pct(0.99),
        "answers": answers,
    }))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
