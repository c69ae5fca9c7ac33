"""A benchmark webhook receiver (its own process): counts messages, latency, receipt times.

    python -m benchmarks.receiver PORT

GET /stats returns JSON with the count, receipt times and commit->receipt latencies.
"""

from __future__ import annotations

import sys
import time
from datetime import datetime

import orjson
from aiohttp import web

arrivals: list[float] = []
latencies: list[float] = []
read_arrivals: list[float] = []


def _ts(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


async def hook(request: web.Request) -> web.Response:
    body = orjson.loads(await request.read())
    now = time.time()
    batch = body["data"] if "data" in body and "record" not in body else [body]
    for m in batch:
        arrivals.append(now)
        if m.get("action") == "read":
            read_arrivals.append(now)
            continue
        stamp = m["metadata"]["commit_timestamp"] if "metadata" in m else m["at"]
        latencies.append(now - _ts(stamp))
    return web.Response(text="ok")


async def stats(_: web.Request) -> web.Response:
    return web.Response(body=orjson.dumps({"count": len(arrivals), "arrivals": arrivals, "latencies": latencies,
                                           "reads": len(read_arrivals), "read_arrivals": read_arrivals}),
                        content_type="application/json")


def main() -> None:
    app = web.Application(client_max_size=256 * 1024 * 1024)
    app.router.add_post("/{tail:.*}", hook)
    app.router.add_get("/stats", stats)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)


if __name__ == "__main__":
    main()
