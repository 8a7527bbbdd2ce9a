"""Request-body validation for POST /v1/token (pure parsing, no server)."""

from __future__ import annotations

from typing import Any

import pytest

from broker.errors import InvalidRequestError
from broker.http import parse_token_request

TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"
RESOURCE = "https://api.security.microsoft.com"


def test_scope_and_resource_forms_are_equivalent() -> None:
    """`scope` in OAuth form names the same resource; defaults fill roles and min_ttl."""
    a = parse_token_request({"tenant": TENANT, "resource": RESOURCE + "/"})
    b = parse_token_request({"tenant": TENANT, "scope": RESOURCE + "/.default"})
    assert a == b
    assert (RESOURCE, (), 300) == (a.resource, a.roles, a.min_ttl_seconds)


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ([], "JSON object"),
        ({"resource": RESOURCE}, "'tenant' is required"),
        ({"tenant": "not a tenant!", "resource": RESOURCE}, "GUID or a domain"),
        ({"tenant": TENANT}, "one of 'resource' or 'scope'"),
        ({"tenant": TENANT, "resource": "http://insecure"}, "https://"),
        ({"tenant": TENANT, "scope": RESOURCE}, "/.default"),
        ({"tenant": TENANT, "resource": RESOURCE, "scope": "https://other/.default"}, "different"),
        ({"tenant": TENANT, "resource": RESOURCE, "extra": 1}, "unknown field(s): extra"),
        ({"tenant": TENANT, "resource": RESOURCE, "min_ttl": 3001}, "min_ttl"),
        ({"tenant": TENANT, "resource": RESOURCE, "min_ttl": True}, "min_ttl"),
        ({"tenant": TENANT, "resource": RESOURCE, "roles": "Incident.Read.All"}, "roles"),
        ({"tenant": TENANT, "resource": RESOURCE, "app": 7}, "'app'"),
    ],
)
def test_invalid_bodies_are_400(body: Any, fragment: str) -> None:
    """Each malformed body is a 400 invalid_request whose description says what is wrong."""
    with pytest.raises(InvalidRequestError) as info:
        parse_token_request(body)
    assert 400 == info.value.status
    assert fragment in info.value.description
