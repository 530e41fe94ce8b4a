"""The agent's one exception tree.

    AgentError
     ├── ConfigError (also ValueError)   bad config: exit 78, one line, no traceback
     ├── UploadError                     a sink failed; ``retryable`` says whether to try again
     └── NotifyError                     MQTT could not be set up (bad URL, TLS files, credentials)

Sign-in has no exception class on purpose: its failures become state (``AgentState``: phase and
error text for screen, status file and MQTT), and the authenticator retries; nothing raises.
"""

from __future__ import annotations


class AgentError(Exception):
    """Root of everything the agent raises on purpose."""


class ConfigError(AgentError, ValueError):
    """The configuration is wrong; the message names file and key."""


class UploadError(AgentError):
    """A batch could not be delivered.

    ``retryable`` is False for rejections that will never succeed (dead-letter the batch);
    ``retry_after_s`` is the minimum wait the server asked for, if any; ``endpoint`` the URL
    (without query string) that answered, for "the endpoint is wrong" reports; ``claims`` the
    claims challenge of a 401 (``WWW-Authenticate: Bearer error="insufficient_claims"``).
    """

    def __init__(self, message: str, *, retryable: bool, retry_after_s: float | None = None,
                 status: int | None = None, endpoint: str | None = None,
                 claims: str | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.retry_after_s = retry_after_s
        self.status = status
        self.endpoint = endpoint
        self.claims = claims


class NotifyError(AgentError):
    """The MQTT connection could not be set up (agent/mqtt: publisher and watch)."""
