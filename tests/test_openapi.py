"""The OpenAPI contract (hsplitlora/federation/openapi.json) held against the server: it is valid
OpenAPI 3.1, it documents exactly the routes `make_app` registers, and a real server's JSON answers
match its schemas."""

import asyncio
import json
import re
from pathlib import Path

import aiohttp
import pytest
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate
from referencing import Registry
from referencing.jsonschema import DRAFT202012

from conftest import running_server, server_config
from server.app import PUBLIC, STATE, make_app

DOCUMENT = Path(__file__).resolve().parents[1] / "hsplitlora" / "federation" / "openapi.json"
URI = "urn:hsplitlora:openapi"  # where the schemas' "#/components/..." references resolve
METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
# Served by the document itself; the route is not in make_app yet (the test below fails until it is).
SELF = ("GET", "/v1/openapi.json")


@pytest.fixture(scope="module")
def doc() -> dict:
    return json.loads(DOCUMENT.read_text())


@pytest.fixture
def routes(tmp_path) -> set[tuple[str, str]]:
    """(method, path) of every route make_app registers, paths as OpenAPI writes them."""
    app = make_app(server_config(tmp_path))
    state = app[STATE]
    try:
        found = set()
        for route in app.router.routes():
            resource = route.resource
            if route.method == "HEAD" and any(r.method == "GET" for r in resource):
                continue  # aiohttp adds HEAD to every GET route
            # '{round:\d+}' -> '{round}' (canonical already drops the pattern; this holds either way)
            found.add((route.method, re.sub(r"\{(\w+):[^{}]*(?:\{[^{}]*\}[^{}]*)*\}", r"{\1}", resource.canonical)))
        return found
    finally:
        state.model_thread.shutdown()
        state.store.close()


def operations(doc: dict) -> set[tuple[str, str]]:
    return {(m.upper(), path) for path, item in doc["paths"].items() for m in item if m in METHODS}


def response_validator(doc: dict, path: str, method: str, code: str,
                       media: str = "application/json") -> Draft202012Validator:
    """A validator for the schema of one documented response, its $refs resolved in the document."""
    where = ["paths", path, method, "responses", code]
    response = doc["paths"][path][method]["responses"][code]
    if "$ref" in response:  # a shared response under components/responses
        where = response["$ref"].removeprefix("#/").split("/")
    pointer = "/".join(p.replace("~", "~0").replace("/", "~1") for p in [*where, "content", media, "schema"])
    registry = Registry().with_resource(URI, DRAFT202012.create_resource(doc))
    return Draft202012Validator({"$ref": f"{URI}#/{pointer}"}, registry=registry)


def test_the_document_is_valid_openapi_3_1(doc):
    assert doc["openapi"] == "3.1.0"
    validate(doc)


def test_every_registered_route_is_documented(doc, routes):
    assert routes, "make_app registered no routes"
    assert routes - operations(doc) == set()


def test_every_documented_operation_is_a_registered_route(doc, routes):
    # Fails while GET /v1/openapi.json is not served yet: that route is part of the contract.
    assert SELF in operations(doc)
    assert operations(doc) - routes == set()


def test_public_routes_need_no_token_and_the_others_a_bearer_token(doc):
    bearer = doc["components"]["securitySchemes"]["bearer"]
    assert (bearer["type"], bearer["scheme"]) == ("http", "bearer")
    assert doc["security"] == [{"bearer": []}]
    public = {path for path, item in doc["paths"].items() for m, op in item.items()
              if m in METHODS and op.get("security") == []}
    assert public == set(PUBLIC) | {SELF[1]}
    for path, item in doc["paths"].items():
        for m, op in item.items():
            if m in METHODS and path not in public:
                assert "security" not in op and "401" in op["responses"], (m, path)
            elif m in METHODS:
                assert op["security"] == [] and "401" not in op["responses"], (m, path)


def test_a_live_server_answers_as_documented(tmp_path, doc):
    def check(path: str, method: str, code: str, status: int, content_type: str, body) -> None:
        assert (status, content_type) == (int(code), "application/json"), (method, path, body)
        errors = [e.message for e in response_validator(doc, path, method, code).iter_errors(body)]
        assert errors == [], (method, path, code, body)

    async def main():
        async with running_server(server_config(tmp_path)) as (url, state), aiohttp.ClientSession() as s:
            for path in ("/healthz", "/v1/settings", "/v1/status"):
                async with s.get(url + path) as r:
                    check(path, "get", "200", r.status, r.content_type, await r.json())
            for bad in (b"{}", b"not json", json.dumps({"profile": {"memory_bytes": -1}, "examples": 3}).encode()):
                async with s.post(url + "/v1/register", data=bad) as r:
                    check("/v1/register", "post", "400", r.status, r.content_type, await r.json())
            async with s.get(url + "/v1/probe?bytes=many") as r:
                check("/v1/probe", "get", "400", r.status, r.content_type, await r.json())
            async with s.get(url + "/v1/me") as r:
                check("/v1/me", "get", "401", r.status, r.content_type, await r.json())
            # A registered client: its registration, its resume and the status that lists it.
            async with s.post(url + "/v1/register", json={"profile": {"memory_bytes": 15e6}, "examples": 10}) as r:
                registration = await r.json()
                check("/v1/register", "post", "200", r.status, r.content_type, registration)
            async with s.get(url + "/v1/me", headers={"Authorization": f"Bearer {registration['token']}"}) as r:
                check("/v1/me", "get", "200", r.status, r.content_type, await r.json())
            async with s.get(url + "/v1/status") as r:
                status = await r.json()
                check("/v1/status", "get", "200", r.status, r.content_type, status)
            assert [c["id"] for c in status["clients"]] == [registration["client_id"]]

    asyncio.run(main())


def test_the_schemas_refuse_what_the_server_never_answers(doc):
    """The live check above means something only if the schemas are not vacuous."""
    error = response_validator(doc, "/v1/register", "post", "400")
    assert error.is_valid({"error": "x"}) and not error.is_valid({}) and not error.is_valid({"error": 1})
    status = response_validator(doc, "/v1/status", "get", "200")
    assert not status.is_valid({"round": 1, "completed_rounds": 0, "uploaded": 0, "clients": [{"id": "c"}]})
    assert not response_validator(doc, "/healthz", "get", "200").is_valid({"ok": False})
