"""Sign-in: the device authorization grant and silent refresh through msal, the token cache file,
and the texts that explain AADSTS and OAuth errors to people.

May import the shared ground (``agent.config``, ``agent.state``, ``agent.errors``, ``agent.fsutil``,
``agent.net``) and nothing else of the agent.
"""
