"""The simulated world (IdP, telemetry API, Graph) used by `device-agent demo`, `sim` and the tests.

Everything here listens on loopback only.
"""
