"""GET /api/openapi.json: a valid OpenAPI document that describes every JSON route and the live answers."""

from __future__ import annotations

import httpx
import jsonschema
import pytest
from openapi_spec_validator import validate

from mjctl import accounts
from mjctl.models import Task
from mjctl.server import create_app
from mjctl.server.openapi import openapi_path
from tests.helpers import app_client


@pytest.fixture
def served(store):
    _, user_token = accounts.create_user("alice")
    _, admin_token = accounts.create_user("admin", role="admin")
    Task.create(user_id=accounts.get_user("alice").id, channel_id=1, mj_id="t1", status="SUCCESS",
                image_url="http://up/t1.png", video_urls='["http://up/v.mp4"]', quota=1000)
    app = create_app(store)
    with app_client(app, timeout=10) as client:
        doc = client.get("/api/openapi.json").json()
        yield app, client, doc, {"user": user_token, "admin": admin_token}


def response_schema(doc: dict, path: str, method: str, status: int) -> dict:
    responses = doc["paths"][path][method]["responses"]
    schema = responses[str(status)]["content"]["application/json"]["schema"]
    return {**schema, "components": doc["components"]}


def check(doc: dict, response: httpx.Response, path: str, method: str = "get") -> None:
    assert response.headers["content-type"].startswith("application/json")
    jsonschema.Draft202012Validator(response_schema(doc, path, method, response.status_code)).validate(response.json())


def test_the_document_is_valid_openapi(served):
    _, _, doc, _ = served

    validate(doc)
    assert doc["openapi"].startswith("3.")


def test_every_json_route_is_documented(served):
    """A route that does not answer JSON (the web page) says so with openapi=False in its route config."""
    app, _, doc, _ = served

    for route in app.routes:
        if route.config.get("openapi") is False:
            continue
        path = openapi_path(route.rule)
        assert path in doc["paths"], route.rule
        assert route.method.lower() in doc["paths"][path], route.rule


def test_listing_parameters_are_documented(served):
    _, _, doc, _ = served

    def names(path):
        return {p["name"] for p in doc["paths"][path]["get"]["parameters"]}

    common = {"p", "page_size", "mj_id", "start_timestamp", "end_timestamp", "status", "action"}
    assert names("/api/mj/self") == common
    assert names("/api/mj/") == names("/api/mj") == common | {"channel_id", "user_id", "mode"}


def test_live_answers_match_the_documented_schemas(served):
    _, client, doc, tokens = served

    def get(path, who=None, **params):
        headers = {"Authorization": f"Bearer {tokens[who]}"} if who else {}
        return client.get(path, params=params, headers=headers)

    cases = [
        ("/api/mj/self", get("/api/mj/self", "user"), 200),
        ("/api/mj/self", get("/api/mj/self", "user", p="abc"), 400),
        ("/api/mj/self", get("/api/mj/self"), 401),
        ("/api/mj/", get("/api/mj/", "admin"), 200),
        ("/api/mj", get("/api/mj", "admin", channel_id=1), 200),
        ("/api/mj/", get("/api/mj/", "user"), 403),
        ("/api/mj/", get("/api/mj/", "admin", channel_id="x"), 400),
        ("/healthz", get("/healthz"), 200),
    ]
    for path, response, status in cases:
        assert response.status_code == status, (path, response.text)
        check(doc, response, path)
    assert get("/api/mj/self", "user").json()["data"]["items"], "the 200 case must check a real item"


def test_the_user_item_schema_forbids_admin_fields(served):
    _, client, doc, tokens = served
    admin_body = client.get("/api/mj/", headers={"Authorization": f"Bearer {tokens['admin']}"}).json()

    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(response_schema(doc, "/api/mj/self", "get", 200)).validate(admin_body)


def test_store_failure_matches_the_documented_500(served):
    _, client, doc, tokens = served
    Task.drop_table()

    response = client.get("/api/mj/self", headers={"Authorization": f"Bearer {tokens['user']}"})

    assert response.status_code == 500
    check(doc, response, "/api/mj/self")
