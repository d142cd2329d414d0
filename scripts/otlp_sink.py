"""A minimal OTLP/HTTP trace receiver: counts the spans posted to /v1/traces and prints a line a
second. For trying `--otlp-traces-endpoint` (and measuring its overhead) without a collector.

    python scripts/otlp_sink.py --port 4318 &
    jaxserve serve --otlp-traces-endpoint http://127.0.0.1:4318/v1/traces
"""

from __future__ import annotations

import argparse
import asyncio

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=4318)
    args = parser.parse_args()
    counts = {"spans": 0, "traces": set()}

    async def traces(request: web.Request) -> web.Response:
        message = ExportTraceServiceRequest.FromString(await request.read())
        for resource in message.resource_spans:
            for scope in resource.scope_spans:
                counts["spans"] += len(scope.spans)
                counts["traces"].update(s.trace_id for s in scope.spans)
        return web.Response(body=b"", content_type="application/x-protobuf")

    async def report(app: web.Application) -> None:
        async def loop() -> None:
            last = -1
            while True:
                await asyncio.sleep(1)
                if counts["spans"] != last:
                    last = counts["spans"]
                    print(f"{last} spans in {len(counts['traces'])} traces", flush=True)
        app["report"] = asyncio.create_task(loop())

    app = web.Application(client_max_size=64 * 2**20)
    app.add_routes([web.post("/v1/traces", traces)])
    app.on_startup.append(report)
    web.run_app(app, host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()
