"""Holding live answers to the served /openapi.json: status, content type, body, and headers.

ContractClient wraps a Client: every request it makes is matched to its documented operation, and
its answer must have a documented status, a documented content type (none where none is documented),
a body that validates against that content's schema, every header the document marks required (each
fitting its schema), and no Tally header (X-*, ETag, Location, Retry-After, ...) the document does not
declare for that status.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import ClientResponse
from jsonschema import Draft202012Validator

from tests.conftest import bearer
from tests.support import Client

CONTROLLED = frozenset({"etag", "location", "retry-after", "idempotent-replayed", "www-authenticate",
                        "cache-control", "content-disposition"})
"""Headers that say something about the answer and must be declared where sent, besides X-*."""


class ContractError(AssertionError):
    pass


class Contract:
    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        self.components = doc["components"]
        # Literal paths before templated ones: /v1/streams/events is not /v1/streams/{stream_id}/events.
        templates = sorted(doc["paths"], key=lambda path: (path.count("{"), path))
        self.patterns: list[tuple[re.Pattern[str], str]] = [
            (re.compile("^" + re.sub(r"\\\{[a-z_]+\\\}", "[^/]+", re.escape(t)) + "$"), t)
            for t in templates]
        self.seen: set[tuple[str, str, int]] = set()

    def template(self, path: str) -> str:
        for pattern, template in self.patterns:
            if pattern.match(path):
                return template
        raise ContractError(f"{path}: no documented path matches")

    def validate(self, schema: Mapping[str, Any], value: Any, where: str) -> None:
        errors = sorted(Draft202012Validator({**schema, "components": self.components}).iter_errors(value), key=str)
        if errors:
            raise ContractError(f"{where}: {[f'{e.json_path}: {e.message}' for e in errors][:5]}")

    def check(self, method: str, path: str, status: int, headers: Mapping[str, str], raw: bytes) -> str:
        """Raises ContractError unless the answer is as documented; returns the operation's path template."""
        headers = {name.lower(): value for name, value in headers.items()}
        template = self.template(path)
        operation = self.doc["paths"][template].get(method.lower())
        where = f"{method} {path} ({template}) {status}"
        if operation is None:
            raise ContractError(f"{where}: method not documented")
        response = operation["responses"].get(str(status))
        if response is None:
            raise ContractError(f"{where}: status not documented ({sorted(operation['responses'])}): {raw[:300]!r}")
        content = response.get("content")
        content_type = headers.get("content-type", "").partition(";")[0].strip()
        if content is None:
            if raw:
                raise ContractError(f"{where}: a body where none is documented")
        elif content_type not in content:
            raise ContractError(f"{where}: content type {content_type!r} not documented ({sorted(content)})")
        else:
            schema = content[content_type]["schema"]
            if content_type == "application/x-ndjson":
                for line in raw.splitlines():
                    self.validate(schema, orjson.loads(line), where)
            elif content_type.endswith("json"):
                self.validate(schema, orjson.loads(raw), where)
        declared = {name.lower(): spec for name, spec in response.get("headers", {}).items()}
        for name, spec in declared.items():
            value = headers.get(name)
            if value is None:
                if spec.get("required"):
                    raise ContractError(f"{where}: required header {name} missing")
                continue
            self.validate(spec["schema"], value, f"{where} header {name}")
        for name in headers:
            if (name.startswith("x-") or name in CONTROLLED) and name not in declared:
                raise ContractError(f"{where}: header {name} sent but not declared ({sorted(declared)})")
        self.seen.add((method.lower(), template, status))
        return template


class ContractClient:
    """A Client whose every answer is checked against the contract (see the module docstring)."""

    def __init__(self, client: Client, contract: Contract) -> None:
        self.client = client
        self.contract = contract

    async def request(self, method: str, path: str, token: str | None = None, *, status: int | None = None,
                      json: Any = None, params: Mapping[str, str] | None = None,
                      headers: Mapping[str, str] | None = None, data: bytes | None = None
                      ) -> tuple[ClientResponse, bytes]:
        sent = {**(bearer(token) if token else {}), **(headers or {})}
        response = await self.client.request(method, path, json=json, params=params, headers=sent, data=data)
        raw = await response.read()
        if status is not None:
            assert response.status == status, (method, path, response.status, raw[:500])
        self.contract.check(method, response.url.path, response.status, response.headers, raw)
        return response, raw

    async def json(self, method: str, path: str, token: str | None = None, **kwargs: Any) -> Any:
        _, raw = await self.request(method, path, token, **kwargs)
        return orjson.loads(raw) if raw else None
