"""Network ground shared by every capability: CA bundles and TLS contexts (``tls``).

May import ``agent.errors`` only.
"""
