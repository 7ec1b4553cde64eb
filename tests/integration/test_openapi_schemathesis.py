"""Schemathesis against the running service: every operation of openapi.yaml, generated requests.

`promvae serve` runs as a subprocess on the demo source (no Prometheus needed) with a tiny
model; once it is ready, schemathesis sends requests generated from the document (positive
and negative) and checks that no answer is a 5xx and that status codes, content types and
bodies conform to the document.
"""

from __future__ import annotations

from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.promstack import PromvaeProcess

SCHEMA_PATH = Path(str(resources.files("grafana_plugin_backend.web").joinpath("openapi.yaml")))
TINY_ENV = {"PROMVAE_WINDOW": "16", "PROMVAE_HISTORY": "6h", "PROMVAE_MODEL_HIDDEN": "8",
            "PROMVAE_MODEL_LATENT": "2", "PROMVAE_MODEL_MAX_EPOCHS": "2",
            "PROMVAE_MODEL_MAX_STEPS": "8", "PROMVAE_MODEL_MC_SAMPLES": "2",
            "OMP_NUM_THREADS": "1"}
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]

schema = schemathesis.openapi.from_path(SCHEMA_PATH)


@schemathesis.serializer("application/x-protobuf")
def _protobuf(ctx, value) -> bytes:
    """Remote-read bodies as generated (random bytes: the endpoint must refuse them, 4xx)."""
    if isinstance(value, bytes):
        return value
    return value.encode() if isinstance(value, str) else repr(value).encode()


@pytest.fixture(scope="module")
def base_url(tmp_path_factory) -> Iterator[str]:
    pv = PromvaeProcess(tmp_path_factory.mktemp("schemathesis"), env=TINY_ENV)
    pv.start()
    try:
        pv.wait_ready(timeout=120)
        yield pv.url
    finally:
        pv.stop(timeout=30)
    text = pv.log.read_text()
    assert "Traceback" not in text, text[-3000:]


def test_the_served_document_is_the_packaged_one(base_url):
    resp = requests.get(f"{base_url}/api/v1/openapi.yaml", timeout=5)
    assert resp.status_code == 200
    assert resp.headers["Content-Type"].startswith("application/yaml")
    assert resp.text == SCHEMA_PATH.read_text(encoding="utf-8")


@schema.parametrize()
@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                 HealthCheck.function_scoped_fixture])
def test_api_conforms_to_openapi(case, base_url):
    case.call_and_validate(base_url=base_url, checks=CHECKS, timeout=30)
