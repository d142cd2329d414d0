"""OpenTelemetry traces of requests (`--otlp-traces-endpoint`), off by default.

The SDK is imported only when tracing is on. Each inference request gets a server span (child of an
incoming W3C `traceparent`; a malformed one is ignored, as the spec says), and under it
`generate_response` with the GenAI semantic-convention attributes. Under that, per sample: its
`queue` wait, one `prefill` span per prompt chunk, one `decode` span with its step and token counts
(not a span per token), and `detokenize`. The engine records those phases on its thread
(`jaxserve.engine.timeline`); the spans are built from them when the sample ends, with their real
start and end times. A new grammar's compile is a `grammar_compile` span.
"""

from __future__ import annotations

import os
import time
from typing import Any, Mapping

from jaxserve.engine.outputs import StepOutput
from jaxserve.engine.timeline import Timeline
from jaxserve.errors import UserError


def trace_id(span: Any) -> str:
    """A span's trace id as W3C writes it (32 hex digits), for logs."""
    return format(span.get_span_context().trace_id, "032x")


def span_exporter() -> type:
    """The OTLP span exporter class: HTTP/protobuf, or gRPC when OTEL_EXPORTER_OTLP_TRACES_PROTOCOL (or
    OTEL_EXPORTER_OTLP_PROTOCOL) says `grpc`, as the SDK defines; UserError naming what to install."""
    protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf"
    if protocol not in ("grpc", "http/protobuf"):
        raise UserError(f"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL={protocol!r} is not supported (http/protobuf or grpc)")
    try:
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError:
        extra = "opentelemetry-exporter-otlp-proto-grpc" if protocol == "grpc" else "'jaxserve[otel]'"
        raise UserError(f"--otlp-traces-endpoint over {protocol} needs the OpenTelemetry SDK and exporter: pip install {extra}") from None
    return OTLPSpanExporter


class Tracing:
    """The tracer provider and its OTLP exporter (`span_exporter`), batching spans off the event loop."""

    def __init__(self, endpoint: str, service_name: str = "jaxserve") -> None:
        exporter = span_exporter()
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        self.provider.add_span_processor(BatchSpanProcessor(exporter(endpoint=endpoint)))
        self.tracer = self.provider.get_tracer("jaxserve")
        self.propagator = TraceContextTextMapPropagator()

    def server_span(self, method: str, route: str, headers: Mapping[str, str]) -> Any:
        """The HTTP request's span, continuing the caller's trace when it sent a valid `traceparent`."""
        from opentelemetry.trace import SpanKind

        parent = self.propagator.extract(carrier=headers)
        return self.tracer.start_span(f"{method} {route}", context=parent, kind=SpanKind.SERVER,
                                      attributes={"http.request.method": method, "http.route": route})

    def request(self, parent: Any, kind: str, model: str, tenant: str, response_id: str, max_tokens: int, temperature: float,
                top_p: float, prompt_tokens: int) -> RequestTrace:
        from opentelemetry import trace

        attributes = {
            "gen_ai.operation.name": "chat" if kind == "chat" else "text_completion",
            "gen_ai.system": "jaxserve",
            "gen_ai.request.model": model,
            "gen_ai.request.max_tokens": max_tokens,
            "gen_ai.request.temperature": temperature,
            "gen_ai.request.top_p": top_p,
            "gen_ai.response.id": response_id,
            "gen_ai.usage.input_tokens": prompt_tokens,
            "jaxserve.tenant": tenant,
        }
        context = trace.set_span_in_context(parent)
        return RequestTrace(self.tracer, context, self.tracer.start_span("generate_response", context=context, attributes=attributes))

    def shutdown(self) -> None:
        """Export what is buffered, then stop."""
        self.provider.shutdown()


class RequestTrace:
    """One request's `generate_response` span and its children."""

    def __init__(self, tracer: Any, parent_context: Any, span: Any) -> None:
        from opentelemetry import trace

        self.tracer, self.span = tracer, span
        self.context = trace.set_span_in_context(span, parent_context)
        self.arrival = time.perf_counter()
        self.offset_ns = time.time_ns() - time.perf_counter_ns()  # perf_counter -> Unix time, anchored per request (the wall clock drifts)
        self.output_tokens = 0
        self.finish_reasons: list[str] = []

    def grammar_compile(self, seconds: float) -> None:
        end = time.perf_counter()
        self._child("grammar_compile", end - seconds, end, {})

    def output(self, prompt: int, out: StepOutput) -> None:
        self.output_tokens += out.num_generated
        if out.finish_reason:
            self.finish_reasons.append(out.finish_reason)
        if out.timeline is not None:
            self._sample(prompt, out.index, out.timeline)

    def _sample(self, prompt: int, index: int, timeline: Timeline) -> None:
        which = {"jaxserve.prompt_index": prompt, "jaxserve.sample_index": index}
        first = timeline.chunks[0][0] if timeline.chunks else timeline.decode_start
        if first is not None:
            self._child("queue", self.arrival, first, which)
        for start, end, tokens in timeline.chunks:
            self._child("prefill", start, end, {**which, "jaxserve.prompt_tokens": tokens})
        if timeline.decode_start is not None:
            self._child("decode", timeline.decode_start, timeline.decode_end, {**which, "jaxserve.decode_steps": timeline.decode_steps})
            # the time spent detokenizing, summed over its tokens, ending with its last step
            self._child("detokenize", timeline.decode_end - timeline.detokenize_seconds, timeline.decode_end, which)

    def _child(self, name: str, start: float, end: float, attributes: dict) -> None:
        span = self.tracer.start_span(name, context=self.context, attributes=attributes, start_time=int(start * 1e9) + self.offset_ns)
        span.end(end_time=int(end * 1e9) + self.offset_ns)

    def end(self, error: str | None = None) -> None:
        from opentelemetry.trace import Status, StatusCode

        self.span.set_attribute("gen_ai.usage.output_tokens", self.output_tokens)
        self.span.set_attribute("gen_ai.response.finish_reasons", self.finish_reasons)
        if error is not None:
            self.span.set_status(Status(StatusCode.ERROR, error))
        self.span.end()


def finish_server_span(span: Any, status: int) -> None:
    from opentelemetry.trace import Status, StatusCode

    span.set_attribute("http.response.status_code", status)
    if status >= 500:
        span.set_status(Status(StatusCode.ERROR))
    span.end()

