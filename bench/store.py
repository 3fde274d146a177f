"""Store throughput alone, as ratios against raw redis-py SET/GET, on one server or on a local Redis Cluster.

    python bench/store.py [--cluster] [--repeats 9] [--sizes 1,4,16]

Starts a private redis-server (or, with --cluster, a 3-master cluster of
them: `LocalRedisCluster`), then measures EmbeddingStore put/get of 1, 4 and
16 MB embeddings against bare SET/GET of the same bytes through the same
redis-py client class (the cluster client on the cluster), median of
`--repeats` interleaved rounds after an untimed one, exactly as bench/encode.py's "store" part. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os

from encode import store_vs_raw  # bench/ is the script's folder: its sibling

from mmserve.localredis import LocalRedis, LocalRedisCluster


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cluster", action="store_true", help="a local 3-master Redis Cluster instead of one server")
    parser.add_argument("--repeats", type=int, default=9, help="rounds at 16 MB (16/size times as many at smaller sizes)")
    parser.add_argument("--sizes", default="1,4,16", help="embedding sizes in MB, comma-separated")
    ns = parser.parse_args()
    sizes = [int(x) for x in ns.sizes.split(",")]
    server = LocalRedisCluster(maxmemory="2gb") if ns.cluster else LocalRedis(maxmemory="2gb")
    with server:
        store = asyncio.run(store_vs_raw(server.url, sizes, ns.repeats))
    print(json.dumps({
        "bench": "store", "topology": "cluster" if ns.cluster else "single", "repeats": ns.repeats,
        "cpus": os.cpu_count(), "store": store,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
