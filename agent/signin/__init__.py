"""Sign-in: the device authorization grant and silent refresh through msal (``authenticator``),
app-only sign-in with a certificate (``certificate``), what both flows share (``flow``: timings,
token life, failure kinds, the IdP back-off), the token cache file, and the texts that explain
AADSTS and OAuth errors to people.

May import the shared ground (``agent.config``, ``agent.state``, ``agent.errors``, ``agent.fsutil``,
``agent.net``) and nothing else of the agent.
"""

import sys as _sys

from hw.lazymodule import defer as _defer

# msal imports xml.etree (and pyexpat) at its top for ADFS WS-Trust only (msal.mex,
# msal.wstrust_response), which the agent never uses: ~3.8 ms of CPU and ~0.4 MiB at every start
# (docs/PERFORMANCE.md "Sign-in"). Executed on first use instead (hw.lazymodule); before any
# submodule here imports msal.
if "msal" not in _sys.modules and "xml.etree.ElementTree" not in _sys.modules:
    import xml.etree  # noqa: F401 - the package only, so the deferred modules hang from it

    _defer("xml.etree.ElementTree")
    _defer("xml.etree.cElementTree")
