"""Telemetry: the durable outbox (SQLite), the sampler that fills it, the uploader that drains
it, and ``sinks/`` (one module per destination: the user's HTTPS API, Graph lists, Excel).

May import the shared ground (``agent.config``, ``agent.state``, ``agent.errors``, ``agent.fsutil``,
``agent.net``) and ``hw``; tokens arrive through the uploader's ``TokenSource`` protocol, never by
importing ``agent.signin``.
"""
