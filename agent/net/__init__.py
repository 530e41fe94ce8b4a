"""Network ground shared by every capability: one way to talk to the far side.

``tls``: the CA trust (system store plus ``ca_file``) as a ``verify=`` path and an SSLContext;
``https``: the one HTTPS session (verify, timeout, response observers) for the IdP and the sinks;
``retry``: the one ``Retry-After`` parser and the one exponential back-off with jitter;
``hosts``: ``is_loopback_host``, the one exact test for "this machine" (no prefix matching).

May import ``agent.errors`` (and requests) only.
"""
