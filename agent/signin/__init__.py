"""Sign-in: the device authorization grant and silent refresh through msal (``authenticator``),
app-only sign-in with a certificate (``certificate``), what both flows share (``flow``: timings,
token life, failure kinds, the IdP back-off), the token cache file, and the texts that explain
AADSTS and OAuth errors to people.

May import the shared ground (``agent.config``, ``agent.state``, ``agent.errors``, ``agent.fsutil``,
``agent.net``) and nothing else of the agent.
"""

import os as _os
import sys as _sys

from hw.lazymodule import defer as _defer
from hw.lazymodule import is_deferred as _is_deferred
from hw.lazymodule import load as _load

# What msal and urllib3 import at their top for flows the agent never runs, executed on first
# use instead (hw.lazymodule; docs/PERFORMANCE.md "Sign-in"), before any submodule here imports
# msal (and through agent.net, requests and urllib3): the service imports sign-in first.
# - xml.etree (and pyexpat): ADFS WS-Trust only (msal.mex, msal.wstrust_response), ~3.8 ms of
#   CPU and ~0.4 MiB.
# - msal.oauth2cli.authcode with http.server (socketserver, html and its entity table): the
#   browser flow's redirect listener; msal binds AuthCodeReceiver and is_wsl from it and only
#   calls them, so they are stand-ins until then. ~3 ms.
# - urllib3.http2's package code, which imports importlib.metadata (zipfile, csv,
#   importlib.resources...) for inject_into_urllib3, an opt-in requests never makes; urllib3's
#   connections import only its probe submodule. ~5 ms.
# - certifi.core, whose where() requests calls at its import (requests.utils'
#   DEFAULT_CA_BUNDLE_PATH) through importlib.resources: ~0.3 MiB and ~10 ms for one path, in a
#   package pip installs as plain files. where() is answered with that file's path; a package
#   that is no plain directory runs the real one. The agent verifies with its own context
#   (agent.net.tls), so requests' default bundle is not read.
# - zipfile, which requests.utils imports for extract_zipped_paths: a CA bundle inside a zip
#   archive (a path that does not exist as a file). ~0.2 MiB (docs/PERFORMANCE.md "Memory").
#   Only while it is one module (Python 3.11): from 3.12 on it is a package whose submodules
#   import it, and a deferred package's submodule runs without its package's code.
if "msal" not in _sys.modules and "xml.etree.ElementTree" not in _sys.modules:
    _defer("xml.etree.ElementTree")
    _defer("xml.etree.cElementTree")
if "msal" not in _sys.modules:
    _defer("msal.oauth2cli.authcode", stand_ins=("AuthCodeReceiver", "is_wsl"))
if "urllib3" not in _sys.modules:
    _defer("urllib3.http2")
if "requests" not in _sys.modules and _sys.version_info < (3, 12):
    _defer("zipfile")
if "certifi" not in _sys.modules:
    def _certifi_where() -> str:
        """certifi.where(): its cacert.pem, the path importlib.resources gives a plain package."""
        core = _sys.modules["certifi.core"]
        if not _is_deferred(core):
            return str(core.where())
        assert core.__spec__ is not None          # a deferred module has the spec hw.lazymodule made
        path = _os.path.join(_os.path.dirname(core.__spec__.origin or ""), "cacert.pem")
        return path if _os.path.isfile(path) else str(_load(core).where())

    _defer("certifi.core", stand_ins=("contents",), answers={"where": _certifi_where})
