"""The one HTTPS session of the agent: the IdP's (given to msal) and every sink's.

Every request carries ``verify=`` (``agent.net.tls.ca_bundle``: the system store plus
``ca_file``) and a timeout, explicitly and per request: requests merges ``REQUESTS_CA_BUNDLE`` /
``CURL_CA_BUNDLE`` from the environment into any request whose ``verify`` is left at True, even
when the session's ``verify`` is set, which would silently replace the configured ``ca_file``.
MSAL's own default timeout is None (wait for ever); this one is never None.

Observers see every response (and every transport failure) of a session: add a callable to
``session.on_response`` / ``session.on_failure``, or, for all sessions of the process (e.g.
reading every response's ``Date`` header to judge the local clock),
``observe_responses(callback)``, which returns a function that removes it again. Observers are
called on the requesting thread, must be quick and must not raise (an exception is logged and
swallowed: an observer can never break a request).

Redirects: msal may follow them (the IdP's discovery documents); sinks pass
``follow_redirects=False``: following would turn a POST into a GET and may carry the token to
another host.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import requests

from agent.net.tls import ca_bundle

log = logging.getLogger(__name__)

ResponseObserver = Callable[[requests.Response], None]
FailureObserver = Callable[[requests.RequestException], None]

_global_observers: list[ResponseObserver] = []
_global_lock = threading.Lock()


def observe_responses(callback: ResponseObserver) -> Callable[[], None]:
    """Call ``callback(response)`` for every response of every ``HttpsSession`` in the process
    (the IdP and the sinks). Returns the function that unregisters it."""
    with _global_lock:
        _global_observers.append(callback)

    def remove() -> None:
        with _global_lock:
            if callback in _global_observers:
                _global_observers.remove(callback)

    return remove


class HttpsSession(requests.Session):
    """A ``requests.Session`` whose every request has ``verify`` and ``timeout`` set.

    ``sent`` counts requests attempted (a caller can tell whether a library failed before or
    after asking); ``last_status`` is the last reply's status, None after a transport failure.
    """

    def __init__(self, ca_file: str, timeout_s: float, *, follow_redirects: bool = True,
                 on_response: list[ResponseObserver] | None = None,
                 on_failure: list[FailureObserver] | None = None) -> None:
        super().__init__()
        self.ca_verify = ca_bundle(ca_file)
        self.timeout_s = timeout_s
        self.follow_redirects = follow_redirects
        self.on_response: list[ResponseObserver] = list(on_response or ())
        self.on_failure: list[FailureObserver] = list(on_failure or ())
        self.last_status: int | None = None
        self.sent = 0

    def request(self, method: str | bytes, url: str | bytes,  # type: ignore[override]
                *args: Any, **kwargs: Any) -> requests.Response:
        kwargs["verify"] = self.ca_verify
        kwargs["timeout"] = self.timeout_s
        if not self.follow_redirects:
            kwargs["allow_redirects"] = False
        self.last_status = None
        self.sent += 1
        try:
            resp = super().request(method, url, *args, **kwargs)  # type: ignore[arg-type]
        except requests.RequestException as err:
            for failure_observer in list(self.on_failure):
                _call(failure_observer, err)
            raise
        self.last_status = resp.status_code
        with _global_lock:
            observers = [*self.on_response, *_global_observers]
        for observer in observers:
            _call(observer, resp)
        return resp


def https_session(ca_file: str, timeout_s: float, *, follow_redirects: bool = True) -> HttpsSession:
    """The session for one HTTPS peer (the IdP, or a sink's API / Graph)."""
    return HttpsSession(ca_file, timeout_s, follow_redirects=follow_redirects)


def _call(observer: Callable[[Any], None], arg: Any) -> None:
    try:
        observer(arg)
    except Exception:  # an observer must never break a request
        log.exception("HTTPS observer %r failed", observer)
