"""/agent_ingresses through the official ngrok-api client: CRUD, paging, limits, certificates."""

from __future__ import annotations

from pathlib import Path

import ngrok
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from backend.store import SQLiteStore


def test_create_get_update_delete(api):
    ing = api.agent_ingresses.create(domain="connect.acme.com", description="acme devices")
    assert ing.id.startswith("agin_") and len(ing.id) == len("agin_") + 27
    assert ing.domain == "connect.acme.com"
    assert ing.description == "acme devices"
    assert ing.metadata is None
    assert ing.region_domains == ["tunnel.local.connect.acme.com"]
    assert ing.ns_targets == []
    assert ing.certificate_management_policy is None
    assert ing.certificate_management_status is None
    assert ing.uri.endswith(f"/agent_ingresses/{ing.id}") and ing.uri.startswith("http://")
    assert ing.created_at.endswith("Z")

    got = api.agent_ingresses.get(ing.id)
    assert got.id == ing.id and got.domain == ing.domain

    upd = api.agent_ingresses.update(
        ing.id, description="ACME Co. Device Ingress", metadata='{"device_sku": "824JS4RZ1F8X"}'
    )
    assert upd.description == "ACME Co. Device Ingress"
    assert upd.metadata == '{"device_sku": "824JS4RZ1F8X"}'
    assert upd.domain == "connect.acme.com"
    # a partial update leaves the other fields alone
    upd2 = api.agent_ingresses.update(ing.id, metadata="m2")
    assert upd2.description == "ACME Co. Device Ingress" and upd2.metadata == "m2"
    assert api.agent_ingresses.get(ing.id).metadata == "m2"

    api.agent_ingresses.delete(ing.id)
    with pytest.raises(ngrok.NotFoundError) as exc:
        api.agent_ingresses.get(ing.id)
    assert exc.value.error_code == "ERR_NGROK_404"
    with pytest.raises(ngrok.NotFoundError):
        api.agent_ingresses.delete(ing.id)


def test_list_iterates_across_pages_newest_first(api):
    made = [api.agent_ingresses.create(domain=f"d{i}.example.com").id for i in range(7)]
    page = api.agent_ingresses.list(limit="3")
    assert [i.id for i in page.ingresses] == made[::-1][:3]
    assert page.next_page_uri.startswith(page.uri.split("/agent_ingresses")[0])
    assert "before_id=" in page.next_page_uri and "limit=3" in page.next_page_uri
    # the client's iterator follows next_page_uri with plain GETs
    assert [i.id for i in page] == made[::-1]
    last = api.agent_ingresses.list(before_id=made[1], limit="3")
    assert [i.id for i in last.ingresses] == [made[0]]
    assert last.next_page_uri is None


def test_default_page_is_100_and_the_client_iterates_past_it(api):
    made = {api.agent_ingresses.create(domain=f"n{i}.example.org").id for i in range(101)}
    first = api.agent_ingresses.list()
    assert len(first.ingresses) == 100 and first.next_page_uri is not None
    assert {i.id for i in first} == made
    assert len(api.agent_ingresses.list(limit="100").ingresses) == 100
    with pytest.raises(ngrok.Error) as exc:  # ngrok refuses more than 100, never cuts
        api.agent_ingresses.list(limit="500")
    assert exc.value.http_status_code == 400 and exc.value.error_code == "ERR_NGROK_215"


@pytest.mark.parametrize(
    ("kwargs", "code"),
    [
        ({"domain": "x.example.com", "description": "d" * 256}, "ERR_NGROK_215"),
        ({"domain": "x.example.com", "description": "é" * 128}, "ERR_NGROK_215"),  # 256 bytes
        ({"domain": "x.example.com", "metadata": "m" * 4097}, "ERR_NGROK_215"),
        ({"domain": ""}, "ERR_NGROK_215"),
        ({"domain": "not a domain"}, "ERR_NGROK_215"),
        ({"domain": "*.example.com"}, "ERR_NGROK_215"),
        ({"domain": "10.0.0.1"}, "ERR_NGROK_215"),
        ({"domain": "api.internal"}, "ERR_NGROK_215"),
        ({"domain": "burrow.localhost"}, "ERR_NGROK_6705"),  # the edge's own domain
        ({"domain": "x.burrow.localhost"}, "ERR_NGROK_6705"),
    ],
)
def test_create_validation_errors(api, kwargs, code):
    with pytest.raises(ngrok.Error) as exc:
        api.agent_ingresses.create(**kwargs)
    assert exc.value.error_code == code
    assert exc.value.http_status_code == 400


def test_limits_are_inclusive(api):
    ing = api.agent_ingresses.create(
        domain="edge.example.com", description="d" * 255, metadata="m" * 4096
    )
    assert len(ing.description) == 255 and len(ing.metadata) == 4096


def test_duplicate_domain_is_a_conflict(api, other):
    api.agent_ingresses.create(domain="Connect.Example.com.")
    for client in (api, other.client):
        with pytest.raises(ngrok.Error) as exc:
            client.agent_ingresses.create(domain="connect.example.com")
        assert exc.value.error_code == "ERR_NGROK_6706"
        assert exc.value.http_status_code == 409


def _policy(client, **props):
    return ngrok.datatypes.AgentIngressCertPolicy(client, props)


@pytest.mark.parametrize(
    ("key_type", "key_class"), [("rsa", rsa.RSAPublicKey), ("ecdsa", ec.EllipticCurvePublicKey)]
)
def test_certificate_is_provisioned_by_the_edge_ca(edge, api, key_type, key_class):
    ing = api.agent_ingresses.create(
        domain="tunnels.example.net",
        certificate_management_policy=_policy(
            api, authority="letsencrypt", private_key_type=key_type
        ),
    )
    pol = ing.certificate_management_policy
    assert (pol.authority, pol.private_key_type) == ("letsencrypt", key_type)
    status = ing.certificate_management_status
    assert status.provisioning_job is None
    assert status.renews_at.endswith("Z")
    # the certificate really exists, for the ingress's names, signed by the edge's CA
    with SQLiteStore(Path(edge.ready["data_dir"]) / "burrow.db") as store:
        stored = store.get_agent_ingress(store.default_account().id, ing.id)
    cert = x509.load_pem_x509_certificate(stored.certificate.chain_pem.encode())
    ca = x509.load_pem_x509_certificate(Path(edge.ready["ca_file"]).read_bytes())
    cert.verify_directly_issued_by(ca)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) == {
        "tunnel.local.tunnels.example.net",
        "tunnels.example.net",
    }
    assert isinstance(cert.public_key(), key_class)
    assert status.renews_at < stored.certificate.not_after.strftime("%Y-%m-%dT%H:%M:%SZ")


def test_certificate_policy_defaults_update_and_disable(api, raw):
    ing = api.agent_ingresses.create(
        domain="c.example.net", certificate_management_policy=_policy(api)
    )
    assert ing.certificate_management_policy.authority == "letsencrypt"
    assert ing.certificate_management_policy.private_key_type == "rsa"
    upd = api.agent_ingresses.update(
        ing.id, certificate_management_policy=_policy(api, private_key_type="ecdsa")
    )
    assert upd.certificate_management_policy.private_key_type == "ecdsa"
    assert upd.certificate_management_status.renews_at is not None
    # explicit null turns management off (the official client drops None, so raw HTTP)
    r = raw.patch(f"/agent_ingresses/{ing.id}", json={"certificate_management_policy": None})
    assert r.status_code == 200, r.text
    assert r.json()["certificate_management_policy"] is None
    assert r.json()["certificate_management_status"] is None
    assert api.agent_ingresses.get(ing.id).certificate_management_status is None


@pytest.mark.parametrize(
    ("policy", "fragment"),
    [
        ({"authority": "zerossl"}, "letsencrypt"),
        ({"private_key_type": "dsa"}, "rsa or ecdsa"),
        ({"authority": 3}, "authority"),
        ({"key_type": "rsa"}, "key_type"),
    ],
)
def test_certificate_policy_validation(api, policy, fragment):
    with pytest.raises(ngrok.Error) as exc:
        api.agent_ingresses.create(
            domain="v.example.net", certificate_management_policy=_policy(api, **policy)
        )
    assert exc.value.http_status_code == 400
    assert exc.value.error_code in ("ERR_NGROK_214", "ERR_NGROK_215")
    assert fragment in str(exc.value)


def test_domain_cannot_be_updated(raw, api):
    ing = api.agent_ingresses.create(domain="fixed.example.com")
    r = raw.patch(f"/agent_ingresses/{ing.id}", json={"domain": "other.example.com"})
    assert r.status_code == 400 and r.json()["error_code"] == "ERR_NGROK_214"
    assert "domain" in r.json()["msg"]
