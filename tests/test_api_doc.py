"""docs/api.md is what jaxclf.serve.api_doc writes from the route table and the OpenAPI schemas."""

from pathlib import Path

from jaxclf.serve import api_doc

API_MD = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def test_api_md_is_generated_from_the_route_table():
    assert API_MD.read_text() == api_doc.render(), \
        "docs/api.md is stale: run `python -m jaxclf.serve.api_doc > docs/api.md`"


def test_every_endpoint_has_a_curl_example():
    from jaxclf.serve.routes import ENDPOINTS
    text = api_doc.render()
    for endpoint in ENDPOINTS:
        assert f"## {endpoint.method} {endpoint.path}\n" in text
        assert f"http://localhost:8000{endpoint.path}" in text
