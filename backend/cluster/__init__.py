"""Cluster mode: several edges acting as one service on one PostgreSQL (issue 17).

- :mod:`backend.cluster.schema` — the cluster's own tables (edges, sessions, agent endpoints)
- :mod:`backend.cluster.node` — membership: lease, epoch, fencing, janitor, our rows
- :mod:`backend.cluster.feed` — the LISTEN/NOTIFY change feed feeding the route tables
- :mod:`backend.cluster.peer` — forwarding a public connection to the edge holding the agent
"""
