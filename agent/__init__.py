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

# requests guesses the encoding of an answer that declares none with charset_normalizer (or
# chardet) when one is importable: ~2.4 MiB of code and tables in a 40 MiB process
# (docs/PERFORMANCE.md "Memory"). Every answer the agent reads is JSON, which requests decodes
# as UTF-8 without guessing (RFC 8259), so neither is loaded (unless something already did).
import sys as _sys  # noqa: E402
import warnings as _warnings  # noqa: E402

for _guesser in ("charset_normalizer", "chardet"):
    _sys.modules.setdefault(_guesser, None)  # type: ignore[arg-type]
_warnings.filterwarnings("ignore", "Unable to find acceptable character detection", module="requests")
