"""MQTT: the broker connection and its TLS (``connection``), the topics and payloads as pure code
(``protocol``), the device's publisher of status, code and command results (``publisher``), and the
admin's view of a fleet (``watch``).

May import the shared ground (``agent.config``, ``agent.state``, ``agent.errors``, ``agent.net``)
and nothing else of the agent.
"""
