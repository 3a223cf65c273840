"""Every numeric query parameter and header takes ASCII digits only (backend.http.integers), over real HTTP.

'²' used to pass str.isdigit() and fail int() (a 500); other scripts' digits, '+1', '1_000' and ' 1' were read
as numbers. Each is now a 400 validation_error naming the field, whatever the parameter or header.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import pytest

from tests.conftest import bearer, mint_token
from tests.integration.http.test_openapi import fill, operations
from tests.support import Client

PROBLEM = "application/problem+json"

BAD = ["\u00b2", "\uff11", "\u0661", "+1", "-1", "1_000", " 1", "1 ", "", "1" * 25, "0x1", "1.0", "1e3"]
"""Superscript two, fullwidth one, Arabic-Indic one, a sign, a separator, spaces, nothing, too long..."""
STRIPPED = {" 1", "1 "}
"""A header's surrounding whitespace is not part of its value (RFC 9110 section 5.5): the HTTP parser
drops it before any handler sees it, so these two say nothing about a header."""

# (method, path template, where, name); {wallet} is an existing wallet's id.
FIELDS = [
    ("GET", "/v1/wallets/{wallet}", "query", "min_position"),
    ("GET", "/v1/wallets/{wallet}", "header", "X-Min-Position"),
    ("GET", "/v1/wallets", "query", "limit"),
    ("GET", "/v1/streams/events", "query", "after"),
    ("GET", "/v1/streams/events", "header", "Last-Event-ID"),
    ("GET", "/v1/streams/wallets/{wallet}", "query", "after"),
    ("POST", "/v1/wallets/{wallet}/credits", "header", "If-Match"),
    ("GET", "/v1/events", "query", "cursor"),
    ("GET", "/v1/events", "query", "limit"),
    ("GET", "/v1/streams/wallet-{wallet}/events", "query", "cursor"),
    ("GET", "/v1/events/export", "query", "to"),
    ("GET", "/v1/wallets/{wallet}/state", "query", "at_position"),
]
AUDIT_QUERIES = ("/v1/events", "/v1/streams/wallet-", "/v1/wallets/{wallet}/state")
"""Their query strings are read by a model, where an empty parameter counts as absent (documented)."""


@pytest.mark.parametrize(("method", "template", "where", "name"), FIELDS,
                         ids=[f"{m} {t} {w} {n}" for m, t, w, n in FIELDS])
async def test_a_numeric_parameter_or_header_takes_ascii_digits_only(
    client: Client, method: str, template: str, where: str, name: str,
) -> None:
    token = await mint_token(client.app, "digits", ["admin", "audit:read"])
    opened = await client.post("/v1/wallets", json={"owner": "digits", "currency": "USD"}, headers=bearer(token))
    assert opened.status == 201
    path = template.format(wallet=(await opened.json())["wallet_id"])
    body = {"amount": 5, "reference": "r"} if method == "POST" else None
    for value in BAD:
        if where == "header" and value in STRIPPED:
            continue
        if value == "" and template.startswith(AUDIT_QUERIES):
            continue
        if where == "query":
            response = await client.request(method, f"{path}?{name}={quote(value, safe='')}",
                                            headers=bearer(token), json=body)
        else:
            response = await client.request(method, path, headers={**bearer(token), name: value}, json=body)
        problem = await response.json(content_type=None)
        assert (response.status, response.content_type) == (400, PROBLEM), (name, value, problem)
        assert problem["code"] == "validation_error", (name, value, problem)
        assert problem["errors"][0]["field"] == name, (name, value, problem)
    # The same parameter with ASCII digits is taken (the refusals above are not of the parameter itself).
    if method == "POST":
        good = await client.post(path, json=body, headers={**bearer(token), name: '"1"'})
        assert good.status == 200, await good.text()


async def test_ascii_digits_still_read_as_numbers(client: Client) -> None:
    token = await mint_token(client.app, "digits", ["admin"])
    opened = await client.post("/v1/wallets", json={"owner": "digits", "currency": "USD"}, headers=bearer(token))
    position = opened.headers["X-Position"]
    wallet = f"/v1/wallets/{(await opened.json())['wallet_id']}"
    assert (await client.get(f"{wallet}?min_position={position}", headers=bearer(token))).status == 200
    assert (await client.get(wallet, headers={**bearer(token), "X-Min-Position": position})).status == 200
    assert (await client.get("/v1/wallets?limit=500", headers=bearer(token))).status == 200
    for tag in ("1", '"1"', 'W/"1"', "*"):
        stale = await client.post(f"{wallet}/debits", json={"amount": 1, "reference": "r"},
                                  headers={**bearer(token), "If-Match": tag})
        assert (stale.status, (await stale.json())["code"]) == (422, "insufficient_funds"), tag
    for tag in ('"1', '""1""', 'W/1', '"1", "2"'):
        refused = await client.post(f"{wallet}/debits", json={"amount": 1, "reference": "r"},
                                    headers={**bearer(token), "If-Match": tag})
        assert (refused.status, (await refused.json())["field"]) == (400, "If-Match"), tag


def integer_parameters(doc: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(method, path, name) of every query parameter the OpenAPI document types as an integer."""
    def is_integer(schema: dict[str, Any]) -> bool:
        return schema.get("type") == "integer" or any(is_integer(s) for s in schema.get("anyOf", []))

    return [(method, path, parameter["name"]) for (method, path), op in operations(doc).items()
            for parameter in op.get("parameters", [])
            if parameter["in"] == "query" and is_integer(parameter.get("schema", {}))]


async def test_every_integer_query_parameter_the_document_names_takes_ascii_digits_only(client: Client) -> None:
    """The list above is written by hand; this one comes from the served document, so a new parameter
    cannot be left out."""
    doc = await (await client.get("/openapi.json")).json()
    found = integer_parameters(doc)
    assert ("get", "/v1/audit/proofs/inclusion", "tree_size") in found and len(found) >= 12
    token = await mint_token(client.app, "digits", ["admin", "audit:read"])
    for method, path, name in found:
        for value in ("+1", "1_000", "1.0", "\uff11"):
            response = await client.request(method.upper(), f"{fill(path)}?{name}={quote(value, safe='')}",
                                            headers=bearer(token))
            problem = await response.json(content_type=None)
            assert (response.status, problem.get("code")) == (400, "validation_error"), (path, name, value, problem)
            assert name in [error["field"] for error in problem["errors"]], (path, name, value, problem)
