"""Telemetry: the durable outbox (SQLite), the sampler that fills it, the uploader that drains
it, and ``sinks/`` (one module per destination: the user's HTTPS API, Graph lists, Excel).

The outbox (``outbox.py``, the ``Outbox`` the others use) has its parts beside it, none of
which imports ``outbox.py`` (tests/test_layout.py): ``intake`` (the log in front of SQLite), ``storage`` (a
full or read-only disk), ``corruption`` (a corrupt file moved aside and counted), ``readonly``
(the file read without writing, for ``status``), ``rowcodec`` (a reading as a row) and
``sidefile`` (``<db>.meta.json``: seq reservations); ``dead_letters`` is the operator's command.

May import the shared ground (``agent.config``, ``agent.state``, ``agent.errors``, ``agent.fsutil``,
``agent.net``) and ``hw``; tokens arrive through the uploader's ``TokenSource`` protocol, never by
importing ``agent.signin``.
"""
