"""sidecar/mitm/flowinfo.py's pure parts, without mitmproxy: which service a host is."""

from __future__ import annotations

import pytest

from sidecar.mitm.flowinfo import ServiceMap


@pytest.mark.parametrize(
    ("host", "service"),
    [
        ("api.stripe.com", "stripe"),
        ("API.Stripe.com:443", "stripe"),
        ("raw.github.com", "github"),
        ("objects.githubusercontent.com", "objects"),  # no glob matches: the first label
        ("api.example.com:8443", "api"),
        ("payments", "payments"),
        ("10.1.2.3:8080", "10.1.2.3"),
        ("[::1]:8080", "[::1]"),
        ("", ""),
    ],
)
def test_service_of_a_host(host: str, service: str) -> None:
    services = ServiceMap.parse("", ["api.stripe.com=Stripe", "*.github.com=github"])
    assert services.service(host.lower()) == service


def test_fixed_service_wins() -> None:
    assert ServiceMap.parse("Web", ["*=other"]).service("anything.example") == "web"


@pytest.mark.parametrize("item", ["stripe", "=stripe", "api.stripe.com=", " = "])
def test_bad_mapping_items(item: str) -> None:
    with pytest.raises(ValueError, match="HOSTGLOB=SERVICE"):
        ServiceMap.parse("", [item])
