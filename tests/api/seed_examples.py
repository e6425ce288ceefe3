"""Example responses copied verbatim from the seed documents (the wire contract).

ENDPOINTS_* come from ../shared/seeds/001_596dc04dc8262707.txt (Cloud API /endpoints),
AGENT_INGRESSES_* from ../shared/seeds/002_d78d8992e6ff40e6.txt (/agent_ingresses);
the comment above each names its section. Extracted with ``json`` from the seed text.
"""

# 001_596dc04dc8262707.txt: "Create Endpoint" -> Example Response
ENDPOINTS_CREATE = {
    "bindings": ["public"],
    "created_at": "2024-10-17T20:26:43Z",
    "description": "sample cloud endpoint",
    "domain": {
        "id": "rd_2na2K4obUiVgxjyGhELNXZRomOt",
        "uri": "https://api.ngrok.com/reserved_domains/rd_2na2K4obUiVgxjyGhELNXZRomOt",
    },
    "hostport": "endpoint-example2.com:443",
    "id": "ep_2na2KihUjFYIhLR6demIzdJsxTH",
    "metadata": '{"environment": "staging"}',
    "proto": "https",
    "public_url": "https://endpoint-example2.com",
    "traffic_policy": '{"on_http_request":[{"actions":[{"type":"deny","config":{"status_code":404}}]}]}',
    "type": "cloud",
    "updated_at": "2024-10-17T20:26:43Z",
    "uri": "https://api.ngrok.com/endpoints/ep_2na2KihUjFYIhLR6demIzdJsxTH",
    "url": "https://endpoint-example2.com",
}

# 001_596dc04dc8262707.txt: "List Endpoints" -> Example Response
ENDPOINTS_LIST = {
    "endpoints": [
        {
            "bindings": ["public"],
            "created_at": "2024-10-17T20:26:41Z",
            "hostport": "e3c98b29d802.ngrok.paid:443",
            "id": "ep_2na2KRmwQ3xUTK7fsBf4gPPtWhu",
            "name": "command_line",
            "principal": {"id": "usr_2na2I2d8Ao6a5681xuYxdgYUSB3", "uri": ""},
            "proto": "https",
            "public_url": "https://e3c98b29d802.ngrok.paid",
            "tunnel": {
                "id": "tn_2na2KRmwQ3xUTK7fsBf4gPPtWhu",
                "uri": "https://api.ngrok.com/tunnels/tn_2na2KRmwQ3xUTK7fsBf4gPPtWhu",
            },
            "tunnel_session": {
                "id": "ts_2na2KPli9fvvUbVYYCIjWPE8zWg",
                "uri": "https://api.ngrok.com/tunnel_sessions/ts_2na2KPli9fvvUbVYYCIjWPE8zWg",
            },
            "type": "ephemeral",
            "updated_at": "2024-10-17T20:26:41Z",
            "upstream_url": "http://localhost:80",
            "url": "https://e3c98b29d802.ngrok.paid",
        },
        {
            "bindings": ["public"],
            "created_at": "2024-10-17T20:26:39Z",
            "domain": {
                "id": "rd_2na2K4obUiVgxjyGhELNXZRomOt",
                "uri": "https://api.ngrok.com/reserved_domains/rd_2na2K4obUiVgxjyGhELNXZRomOt",
            },
            "edge": {
                "id": "edgtls_2na2K2SHqq1jVXErSG2EhkglPNe",
                "uri": "https://api.ngrok.com/edges/tls/edgtls_2na2K2SHqq1jVXErSG2EhkglPNe",
            },
            "hostport": "endpoint-example2.com:443",
            "id": "ep_2na2KDE8CTY0AZG8vME1nBU7Eed",
            "proto": "tls",
            "public_url": "tls://endpoint-example2.com",
            "type": "edge",
            "updated_at": "2024-10-17T20:26:39Z",
        },
    ],
    "next_page_uri": None,
    "uri": "https://api.ngrok.com/endpoints",
}

# 001_596dc04dc8262707.txt: "Get Endpoint" -> Example Response
ENDPOINTS_GET = {
    "bindings": ["public"],
    "created_at": "2024-10-17T20:26:44Z",
    "description": "sample cloud endpoint",
    "domain": {
        "id": "rd_2na2K4obUiVgxjyGhELNXZRomOt",
        "uri": "https://api.ngrok.com/reserved_domains/rd_2na2K4obUiVgxjyGhELNXZRomOt",
    },
    "edge": {
        "id": "edgtls_2na2K2SHqq1jVXErSG2EhkglPNe",
        "uri": "https://api.ngrok.com/edges/tls/edgtls_2na2K2SHqq1jVXErSG2EhkglPNe",
    },
    "hostport": "endpoint-example2.com:443",
    "id": "ep_2na2KihUjFYIhLR6demIzdJsxTH",
    "proto": "https",
    "public_url": "https://endpoint-example2.com",
    "type": "cloud",
    "updated_at": "2024-10-17T20:26:44Z",
    "uri": "https://api.ngrok.com/endpoints/ep_2na2KihUjFYIhLR6demIzdJsxTH",
    "url": "https://endpoint-example2.com",
}

# 001_596dc04dc8262707.txt: "Update Endpoint" -> Example Response
ENDPOINTS_UPDATE = {
    "bindings": ["public"],
    "created_at": "2024-10-17T20:26:43Z",
    "description": "Sample Cloud Endpoint",
    "domain": {
        "id": "rd_2na2K4obUiVgxjyGhELNXZRomOt",
        "uri": "https://api.ngrok.com/reserved_domains/rd_2na2K4obUiVgxjyGhELNXZRomOt",
    },
    "hostport": "endpoint-example2.com:443",
    "id": "ep_2na2KihUjFYIhLR6demIzdJsxTH",
    "metadata": '{"environment": "staging"}',
    "proto": "https",
    "public_url": "https://endpoint-example2.com",
    "traffic_policy": '{"on_http_request":[{"actions":[{"type":"deny","config":{"status_code":404}}]}]}',
    "type": "cloud",
    "updated_at": "2024-10-17T20:26:43Z",
    "uri": "https://api.ngrok.com/endpoints/ep_2na2KihUjFYIhLR6demIzdJsxTH",
    "url": "https://endpoint-example2.com",
}

# 002_d78d8992e6ff40e6.txt: "Create Agent Ingress" -> Example Response
AGENT_INGRESSES_CREATE = {
    "certificate_management_policy": None,
    "certificate_management_status": None,
    "created_at": "2024-08-02T07:15:39Z",
    "description": "acme devices",
    "domain": "connect.acme.com",
    "id": "agin_2k5okIo7afS6bKA3xNDLRZ9rjqk",
    "ns_targets": [
        "1.kube-dns.kube-system.svc.cluster.local.",
        "2.kube-dns.kube-system.svc.cluster.local.",
        "3.kube-dns.kube-system.svc.cluster.local.",
        "4.kube-dns.kube-system.svc.cluster.local.",
    ],
    "region_domains": ["tunnel.us.connect.acme.com"],
    "uri": "/agent_ingresses/agin_2k5okIo7afS6bKA3xNDLRZ9rjqk",
}

# 002_d78d8992e6ff40e6.txt: "Get Agent Ingress" -> Example Response
AGENT_INGRESSES_GET = {
    "certificate_management_policy": None,
    "certificate_management_status": None,
    "created_at": "2024-08-02T07:15:39Z",
    "description": "ACME Co. Device Ingress",
    "domain": "connect.acme.com",
    "id": "agin_2k5okIo7afS6bKA3xNDLRZ9rjqk",
    "metadata": '{"device_sku": "824JS4RZ1F8X"}',
    "ns_targets": [
        "1.kube-dns.kube-system.svc.cluster.local.",
        "2.kube-dns.kube-system.svc.cluster.local.",
        "3.kube-dns.kube-system.svc.cluster.local.",
        "4.kube-dns.kube-system.svc.cluster.local.",
    ],
    "region_domains": ["tunnel.us.connect.acme.com"],
    "uri": "/agent_ingresses/agin_2k5okIo7afS6bKA3xNDLRZ9rjqk",
}

# 002_d78d8992e6ff40e6.txt: "List Agent Ingresses" -> Example Response
AGENT_INGRESSES_LIST = {
    "ingresses": [
        {
            "certificate_management_policy": None,
            "certificate_management_status": None,
            "created_at": "2024-08-02T07:15:39Z",
            "description": "acme devices",
            "domain": "connect.acme.com",
            "id": "agin_2k5okIo7afS6bKA3xNDLRZ9rjqk",
            "ns_targets": [
                "1.kube-dns.kube-system.svc.cluster.local.",
                "2.kube-dns.kube-system.svc.cluster.local.",
                "3.kube-dns.kube-system.svc.cluster.local.",
                "4.kube-dns.kube-system.svc.cluster.local.",
            ],
            "region_domains": ["tunnel.us.connect.acme.com"],
            "uri": "/agent_ingresses/agin_2k5okIo7afS6bKA3xNDLRZ9rjqk",
        }
    ],
    "next_page_uri": None,
    "uri": "https://api.ngrok.com/agent_ingresses",
}

# 002_d78d8992e6ff40e6.txt: "Update Agent Ingress" -> Example Response
AGENT_INGRESSES_UPDATE = {
    "certificate_management_policy": None,
    "certificate_management_status": None,
    "created_at": "2024-08-02T07:15:39Z",
    "description": "ACME Co. Device Ingress",
    "domain": "connect.acme.com",
    "id": "agin_2k5okIo7afS6bKA3xNDLRZ9rjqk",
    "metadata": '{"device_sku": "824JS4RZ1F8X"}',
    "ns_targets": [
        "1.kube-dns.kube-system.svc.cluster.local.",
        "2.kube-dns.kube-system.svc.cluster.local.",
        "3.kube-dns.kube-system.svc.cluster.local.",
        "4.kube-dns.kube-system.svc.cluster.local.",
    ],
    "region_domains": ["tunnel.us.connect.acme.com"],
    "uri": "/agent_ingresses/agin_2k5okIo7afS6bKA3xNDLRZ9rjqk",
}

# The example requests of the same seeds ("curl -d ..." bodies).
# 001_596dc04dc8262707.txt: "Create Endpoint" -> Example Request
ENDPOINTS_CREATE_REQUEST = {
    "bindings": ["public"],
    "description": "sample cloud endpoint",
    "metadata": '{"environment": "staging"}',
    "traffic_policy": '{"on_http_request":[{"actions":[{"type":"deny","config":{"status_code":404}}]}]}',
    "type": "cloud",
    "url": "https://endpoint-example2.com:443",
}
# 001_596dc04dc8262707.txt: "Update Endpoint" -> Example Request
ENDPOINTS_UPDATE_REQUEST = {"description": "Sample Cloud Endpoint"}
# 002_d78d8992e6ff40e6.txt: "Create Agent Ingress" -> Example Request
AGENT_INGRESSES_CREATE_REQUEST = {"description": "acme devices", "domain": "connect.acme.com"}
# 002_d78d8992e6ff40e6.txt: "Update Agent Ingress" -> Example Request
AGENT_INGRESSES_UPDATE_REQUEST = {
    "description": "ACME Co. Device Ingress",
    "metadata": '{"device_sku": "824JS4RZ1F8X"}',
}
