"""device-agent: device-code sign-in and durable telemetry for headless boxes."""

__version__ = "0.1.0"
