"""Load on the served API: concurrent idempotent submissions and reads, plus a schemathesis pass.

Starts the real app under uvicorn on loopback in a child process (local folder as the bucket, a
submitter that records instead of starting Ray, so only the API is measured), then sends 200
concurrent POSTs (half of them repeats of one idempotency key) and 2,000 GETs. Reports p50/p99
latency, errors, and how many audits exist per idempotency key (must be exactly one). Writes
benchmarks/results/service_load.json.   Run: python benchmarks/service_load.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: make `tests` importable

import httpx

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
SHARED_KEY = "load-shared-key"


def serve(port: int, store: str) -> None:
    """Child process: the app with a recording submitter, served by uvicorn."""
    import uvicorn

    from service.api.app import create_app
    from tests.service.conftest import FakeSubmitter, make_settings

    app = create_app(make_settings(store), FakeSubmitter())
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def body(seed: int) -> dict:
    models = {"model_a": {"id": "org/reference"}, "model_b": {"id": "org/candidate"}}
    return models | {"token_budget": 100_000, "seed": seed}


async def timed(client: httpx.AsyncClient, method: str, url: str, **kw) -> tuple[float, int]:
    start = time.perf_counter()
    try:
        response = await client.request(method, url, **kw)
        status = response.status_code
    except httpx.HTTPError:
        status = -1
    return time.perf_counter() - start, status


async def load(base: str, headers: dict, n_posts: int, n_gets: int, concurrency: int) -> dict:
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=30, limits=limits) as client:
        posts = []
        for i in range(n_posts):
            key = SHARED_KEY if i % 2 == 0 else f"load-unique-{i}"
            seed = 0 if key == SHARED_KEY else i
            posts.append(timed(client, "POST", "/audits", json=body(seed), headers={"Idempotency-Key": key}))
        post_results = await asyncio.gather(*posts)
        items, cursor = [], None
        while True:  # every audit, page by page
            params = {"limit": 100} | ({"cursor": cursor} if cursor else {})
            page = (await client.get("/audits", params=params)).json()
            items += page["items"]
            cursor = page.get("next_cursor")
            if not cursor:
                break
        ids = [item["id"] for item in items]
        sem = asyncio.Semaphore(concurrency)

        async def one(i: int) -> tuple[float, int]:
            async with sem:
                return await timed(client, "GET", f"/audits/{ids[i % len(ids)]}")

        get_results = await asyncio.gather(*(one(i) for i in range(n_gets)))
        keys = Counter(item.get("idempotency_key") for item in items)
    return {"posts": post_results, "gets": get_results, "keys": keys, "ids": ids}


def schemathesis_cases(tmp: Path) -> tuple[int, int]:
    """Run the fuzz test's generator against the app; return (cases, responses with a 5xx)."""
    import schemathesis

    from service.api.app import create_app
    from tests.service import test_openapi_fuzz as fuzz
    from tests.service.conftest import FakeSubmitter, make_settings

    app = create_app(make_settings(tmp / "fuzz-bucket"), FakeSubmitter())
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    fuzz._run.seen.clear()
    for operation in (r.ok() for r in schema.get_all_operations()):
        fuzz._run(operation, schemathesis.GenerationMode.POSITIVE, fuzz.POSITIVE_PER_OPERATION)
        fuzz._run(operation, schemathesis.GenerationMode.NEGATIVE, fuzz.NEGATIVE_PER_OPERATION)
    seen: Counter = fuzz._run.seen
    return seen.total(), sum(n for (_, status), n in seen.items() if status >= 500)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--posts", type=int, default=200)
    parser.add_argument("--gets", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--serve", nargs=2, metavar=("PORT", "STORE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(int(args.serve[0]), args.serve[1])
        return

    from tests.service.conftest import API_KEY

    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        server = subprocess.Popen([sys.executable, __file__, "--serve", str(port), f"{tmp}/bucket"], cwd=ROOT)
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.2)
            else:
                raise RuntimeError("the API did not come up within 60 s")
            headers = {"Authorization": f"Bearer {API_KEY}"}
            start = time.perf_counter()
            result = asyncio.run(load(base, headers, args.posts, args.gets, args.concurrency))
            wall = time.perf_counter() - start
        finally:
            server.terminate()
            server.wait(timeout=10)
        cases, fuzz_5xx = schemathesis_cases(Path(tmp))

    latencies = [t for t, _ in result["posts"] + result["gets"]]
    errors = sum(1 for _, status in result["posts"] + result["gets"] if status < 0 or status >= 400)
    quantiles = statistics.quantiles(latencies, n=100)
    keys = result["keys"]
    per_key = max(keys.values())
    out = {
        "requests": len(latencies),
        "posts": len(result["posts"]),
        "gets": len(result["gets"]),
        "errors": errors,
        "p50_ms": quantiles[49] * 1000,
        "p99_ms": quantiles[98] * 1000,
        "post_p50_ms": statistics.median(t for t, _ in result["posts"]) * 1000,
        "get_p50_ms": statistics.median(t for t, _ in result["gets"]) * 1000,
        "requests_per_s": len(latencies) / wall,
        "audits_created": len(result["ids"]),
        "audits_with_shared_key": keys[SHARED_KEY],
        "audits_per_idempotency_key": per_key,
        "post_statuses": dict(Counter(status for _, status in result["posts"])),
        "schemathesis_cases": cases,
        "schemathesis_5xx": fuzz_5xx,
        "concurrency": args.concurrency,
    }
    print(f"{'requests':<28}{out['requests']:>10}")
    for name in ("errors", "p50_ms", "p99_ms", "post_p50_ms", "get_p50_ms", "requests_per_s"):
        print(f"{name:<28}{out[name]:>10.1f}")
    print(f"{'audits created':<28}{out['audits_created']:>10}  (expected {args.posts // 2 + 1})")
    print(f"{'audits per idempotency key':<28}{per_key:>10}  (shared key: {keys[SHARED_KEY]})")
    print(f"{'schemathesis cases / 5xx':<28}{cases:>6} / {fuzz_5xx}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "service_load.json").write_text(json.dumps(out, indent=2))
    print(f"wrote {RESULTS / 'service_load.json'}")


if __name__ == "__main__":
    main()
