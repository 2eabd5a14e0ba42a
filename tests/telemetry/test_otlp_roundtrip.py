"""A real OTLP/HTTP export: the SDK's OTLPSpanExporter posts protobuf to a receiver started here."""

from __future__ import annotations

import gzip
import socket
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span as ProtoSpan
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind
from sqlalchemy import text

from poolguard import Guard

pytestmark = pytest.mark.postgres

GuardFactory = Callable[..., Guard]


class Receiver:
    """Collects every span of every ExportTraceServiceRequest posted to /v1/traces."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, ProtoSpan]] = []  # (service.name, span)
        self.paths: list[str] = []
        self.lock = threading.Lock()

    def accept(self, path: str, body: bytes) -> None:
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        with self.lock:
            self.paths.append(path)
            for resource_spans in request.resource_spans:
                service = next(
                    (a.value.string_value for a in resource_spans.resource.attributes if a.key == "service.name"), ""
                )
                for scope_spans in resource_spans.scope_spans:
                    self.spans.extend((service, span) for span in scope_spans.spans)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, str]]:
    received = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            if self.path != "/v1/traces" or self.headers.get("Content-Type") != "application/x-protobuf":
                self.send_response(404)
                self.end_headers()
                return
            received.accept(self.path, body)
            answer = ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield received, f"http://127.0.0.1:{server.server_address[1]}/v1/traces"
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_checkout_span_reaches_an_otlp_receiver_with_its_parent(receiver: tuple[Receiver, str], guard_on: GuardFactory):
    received, endpoint = receiver
    provider = TracerProvider(resource=Resource.create({"service.name": "orders"}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, timeout=5)))
    try:
        guard = guard_on(tracer_provider=provider)
        tracer = provider.get_tracer("tests.otlp")
        with (
            tracer.start_as_current_span("GET /orders/{id}", kind=SpanKind.SERVER) as request,
            guard.request_scope(route="/orders/{id}") as scope,
        ):
            scope.session.execute(text("SELECT 1"))
        assert provider.force_flush(10_000)
    finally:
        provider.shutdown()

    assert received.paths
    by_name = {span.name: (service, span) for service, span in received.spans}
    assert set(by_name) == {"GET /orders/{id}", "checkout primary"}
    service, checkout = by_name["checkout primary"]
    assert service == "orders"
    parent_id = request.get_span_context().span_id.to_bytes(8, "big")
    assert checkout.parent_span_id == parent_id
    assert by_name["GET /orders/{id}"][1].span_id == parent_id
    assert checkout.trace_id == request.get_span_context().trace_id.to_bytes(16, "big")
    assert checkout.kind == ProtoSpan.SpanKind.SPAN_KIND_INTERNAL
    attributes = {a.key: a.value.string_value for a in checkout.attributes}
    assert attributes == {
        "db.client.connection.pool.name": "primary",
        "db.system.name": "postgresql",
        "poolguard.outcome": "acquired",
    }
