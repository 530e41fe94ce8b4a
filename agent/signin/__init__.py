"""Sign-in: the device authorization grant and silent refresh through msal (``authenticator``),
app-only sign-in with a certificate (``certificate``), what both flows share (``flow``: timings,
token life, failure kinds, the IdP back-off), the token cache file, and the texts that explain
AADSTS and OAuth errors to people.

May import the shared ground (``agent.config``, ``agent.state``, ``agent.errors``, ``agent.fsutil``,
``agent.net``) and nothing else of the agent.
"""

import sys as _sys

from hw.lazymodule import defer as _defer

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
if "msal" not in _sys.modules and "xml.etree.ElementTree" not in _sys.modules:
    _defer("xml.etree.ElementTree")
    _defer("xml.etree.cElementTree")
if "msal" not in _sys.modules:
    _defer("msal.oauth2cli.authcode", stand_ins=("AuthCodeReceiver", "is_wsl"))
if "urllib3" not in _sys.modules:
    _defer("urllib3.http2")
