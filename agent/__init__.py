"""device-agent: device-code sign-in and durable telemetry for headless boxes.

The tree is laid out by capability (docs/INTERNALS.md has the module map):

* the process, at the top: ``cli``, ``service`` (wiring and lifecycle), ``config``, ``state``,
  ``statusfile``, ``sdnotify``, ``logs``, ``errors``, ``fsutil``, ``demo``;
* the shared ground every capability stands on: ``config``, ``state``, ``errors``, ``fsutil``,
  ``logs`` and ``net`` (HTTPS, TLS, retry and back-off);
* the capabilities: ``signin``, ``telemetry``, ``mqtt``, ``panel``; none imports another;
* ``sim``: the simulated IdP, API and Graph, imported by nothing but the process and the tests.

Imports point one way: process -> capabilities -> shared ground -> ``hw``. tests/test_layout.py
checks it.
"""

__version__ = "0.1.0"
