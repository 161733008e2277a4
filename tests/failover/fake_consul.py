"""A FAKE Consul agent for tests: a real HTTP server on 127.0.0.1 speaking the few endpoints
py-consul calls for `failover/consul.py`, and nothing else.

Covered: KV get/put/delete of single keys (GET answers base64 `Value`s, 404 when missing,
and the `X-Consul-Index` header py-consul insists on); agent service register/deregister
with one TTL check (`Check` or `Checks`, keys in any case, as Consul accepts them); check
pass/warn/fail; and `/v1/health/service/<name>` with `?passing`. A TTL check turns critical
when not passed within its TTL (real time) and the instance is reaped after
`DeregisterCriticalServiceAfter`, as Consul does, but evaluated on each request.

Every request's `X-Consul-Token` (None when absent) is appended to `.tokens`; set
`.fail_status` to an HTTP status to make every request fail with it.
"""

from __future__ import annotations

import base64
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

_UNITS = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def _seconds(duration: str) -> float:
    """A Go duration ("0.5s", "1m30s") in seconds."""
    return sum(float(n) * _UNITS[u] for n, u in re.findall(r"([\d.]+)(ns|us|ms|s|m|h)", duration))


def _lower_keys(obj: dict) -> dict:
    return {k.lower(): v for k, v in obj.items()}


class FakeConsul:
    """Start with `with FakeConsul() as fake:`; `fake.address` is "127.0.0.1:PORT"."""

    def __init__(self) -> None:
        self.kv: dict[str, bytes] = {}
        self.services: dict[str, dict] = {}  # service id -> Consul's Service object
        self.checks: dict[str, dict] = {}  # check id -> {service_id, ttl_s, deregister_s, status, passed_at}
        self.tokens: list[str | None] = []
        self.fail_status: int | None = None
        self.index = 1
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        self.address = f"127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FakeConsul:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def _status(self, check: dict, now: float) -> str:
        if check["ttl_s"] and now - check["passed_at"] > check["ttl_s"]:
            return "critical"
        return check["status"]

    def _reap(self, now: float) -> None:
        for check_id, check in list(self.checks.items()):
            limit = check["deregister_s"]
            expired_at = check["passed_at"] + check["ttl_s"]
            if limit and self._status(check, now) == "critical" and now - expired_at > limit:
                self.services.pop(check["service_id"], None)
                del self.checks[check_id]

    def handle(self, method: str, path: str, query: dict, body: bytes) -> tuple[int, object]:
        """(status, JSON-able body) for one request; called under the lock."""
        now = time.monotonic()
        self._reap(now)
        if path.startswith("/v1/kv/"):
            key = path[len("/v1/kv/"):]
            if method == "GET":
                if key not in self.kv:
                    return 404, None
                value = base64.b64encode(self.kv[key]).decode()
                return 200, [{"Key": key, "Value": value, "Flags": 0, "LockIndex": 0,
                              "CreateIndex": self.index, "ModifyIndex": self.index}]
            if method == "PUT":
                self.kv[key], self.index = body, self.index + 1
                return 200, True
            if method == "DELETE":
                self.kv.pop(key, None)
                return 200, True
        if method == "PUT" and path == "/v1/agent/service/register":
            return self._register(_lower_keys(json.loads(body)), now)
        if method == "PUT" and path.startswith("/v1/agent/service/deregister/"):
            service_id = path.rsplit("/", 1)[1]
            if self.services.pop(service_id, None) is None:
                return 404, f'Unknown service ID "{service_id}"'
            self.checks = {k: c for k, c in self.checks.items() if c["service_id"] != service_id}
            return 200, None
        if method == "PUT" and (m := re.fullmatch(r"/v1/agent/check/(pass|warn|fail)/(.+)", path)):
            check = self.checks.get(m[2])
            if check is None:
                return 404, f'Unknown check ID "{m[2]}"'
            status = {"pass": "passing", "warn": "warning", "fail": "critical"}[m[1]]
            check["status"], check["passed_at"] = status, now
            return 200, None
        if method == "GET" and path.startswith("/v1/health/service/"):
            return 200, self._health(path.rsplit("/", 1)[1], "passing" in query, now)
        return 405, f"the fake Consul does not implement {method} {path}"

    def _register(self, service: dict, now: float) -> tuple[int, object]:
        service_id = service.get("id") or service["name"]
        checks = service.get("checks") or ([service["check"]] if service.get("check") else [])
        if len(checks) > 1:
            return 400, "the fake Consul supports one check per service"
        self.checks = {k: c for k, c in self.checks.items() if c["service_id"] != service_id}
        for check in map(_lower_keys, checks):
            check_id = check.get("checkid") or f"service:{service_id}"
            self.checks[check_id] = {
                "service_id": service_id, "ttl_s": _seconds(check.get("ttl", "")),
                "deregister_s": _seconds(check.get("deregistercriticalserviceafter", "")),
                "status": check.get("status", "critical"), "passed_at": now,
            }
        self.services[service_id] = {
            "ID": service_id, "Service": service["name"], "Tags": service.get("tags") or [],
            "Address": service.get("address", ""), "Port": service.get("port", 0),
            "Meta": service.get("meta") or {},
        }
        return 200, None

    def _health(self, name: str, passing: bool, now: float) -> list[dict]:
        entries = []
        for service_id, service in self.services.items():
            if service["Service"] != name:
                continue
            checks = [{"CheckID": cid, "Name": f"Service '{name}' check", "ServiceID": service_id,
                       "ServiceName": name, "Status": self._status(c, now)}
                      for cid, c in self.checks.items() if c["service_id"] == service_id]
            if passing and any(c["Status"] != "passing" for c in checks):
                continue
            entries.append({"Node": {"Node": "fake-consul", "Address": "127.0.0.1"},
                            "Service": dict(service), "Checks": checks})
        return entries


def _handler_for(fake: FakeConsul) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            url = urlsplit(self.path)
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            with fake._lock:
                fake.tokens.append(self.headers.get("X-Consul-Token"))
                if fake.fail_status is not None:
                    status, reply = fake.fail_status, "the fake Consul was told to fail"
                else:
                    query = parse_qs(url.query, keep_blank_values=True)
                    status, reply = fake.handle(self.command, unquote(url.path), query, body)
                index = fake.index
            raw = b"" if reply is None else (reply if isinstance(reply, str) else json.dumps(reply)).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json" if status == 200 else "text/plain")
            self.send_header("Content-Length", str(len(raw)))
            self.send_header("X-Consul-Index", str(index))
            self.end_headers()
            self.wfile.write(raw)

        do_GET = do_PUT = do_DELETE = _serve

        def log_message(self, format: str, *args: object) -> None:
            pass  # keep pytest's output for failures

    return Handler
