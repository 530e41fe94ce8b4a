"""Sign-in: the device authorization grant and silent refresh through msal (``authenticator``),
app-only sign-in with a certificate (``certificate``), what both flows share (``flow``: timings,
token life, failure kinds, the IdP back-off), the token cache file, and the texts that explain
AADSTS and OAuth errors to people.

May import the shared ground (``agent.config``, ``agent.state``, ``agent.errors``, ``agent.fsutil``,
``agent.net``) and nothing else of the agent.
"""
