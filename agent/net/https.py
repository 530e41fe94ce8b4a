"""The one HTTPS session of the agent: the IdP's (given to msal) and every sink's.

Every HTTPS connection verifies against one SSL context per ``ca_file``, built once
(``agent.net.tls.shared_context``: the system store plus ``ca_file``), which the session's adapter
gives urllib3 whatever ``verify`` says: requests merges ``REQUESTS_CA_BUNDLE`` / ``CURL_CA_BUNDLE``
from the environment into ``verify``, which would silently replace the configured ``ca_file``, and
a ``verify=`` path is loaded again into a new context for every connection (~45 ms for the
system bundle). Every request has a timeout: MSAL's own default is None (wait for ever).

The environment still gives proxies (``trust_env``: devices sit behind them), but never
credentials: requests would put a ``~/.netrc`` entry for the IdP or API host on every request
without ``auth=`` (and on redirects), replacing the agent's ``Authorization: Bearer`` header.

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
import ssl
import threading
from collections.abc import Callable
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from requests.auth import AuthBase

from agent.net.tls import shared_context

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


class _NoAuth(AuthBase):
    """The session's ``auth``: leaves the request as the caller built it (requests looks up
    ``~/.netrc`` only when neither the request nor the session has one)."""

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        return r


class _TrustAdapter(HTTPAdapter):
    """HTTPS through the one shared context, never through ``verify``'s path or flag."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context
        super().__init__()

    def build_connection_pool_key_attributes(self, request: requests.PreparedRequest, verify: Any,
                                             cert: Any = None) -> tuple[dict[str, Any], dict[str, Any]]:
        host_params, pool_kwargs = super().build_connection_pool_key_attributes(request, True, cert)
        pool_kwargs.pop("ca_certs", None)
        pool_kwargs.pop("ca_cert_dir", None)
        pool_kwargs["cert_reqs"] = "CERT_REQUIRED"
        pool_kwargs["ssl_context"] = self.context
        return host_params, pool_kwargs

    def cert_verify(self, conn: Any, url: str, verify: Any, cert: Any) -> None:
        super().cert_verify(conn, url, False, cert)   # client certificate only; no CA path
        conn.cert_reqs = "CERT_REQUIRED"


class HttpsSession(requests.Session):
    """A ``requests.Session`` whose every request has ``verify`` and ``timeout`` set.

    ``sent`` counts requests attempted (a caller can tell whether a library failed before or
    after asking); ``last_status`` is the last reply's status, None after a transport failure.
    """

    def __init__(self, ca_file: str, timeout_s: float, *, follow_redirects: bool = True,
                 on_response: list[ResponseObserver] | None = None,
                 on_failure: list[FailureObserver] | None = None) -> None:
        super().__init__()
        self.mount("https://", _TrustAdapter(shared_context(ca_file)))
        self.auth = _NoAuth()
        self.timeout_s = timeout_s
        self.follow_redirects = follow_redirects
        self.on_response: list[ResponseObserver] = list(on_response or ())
        self.on_failure: list[FailureObserver] = list(on_failure or ())
        self.last_status: int | None = None
        self.sent = 0

    def request(self, method: str | bytes, url: str | bytes,
                *args: Any, **kwargs: Any) -> requests.Response:
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


    def rebuild_auth(self, prepared_request: requests.PreparedRequest, response: requests.Response) -> None:
        """A redirect to another host drops ``Authorization`` (as requests does), and
        ``~/.netrc`` is never consulted (unlike requests with ``trust_env``)."""
        original = response.request
        if ("Authorization" in prepared_request.headers and original is not None
                and self.should_strip_auth(str(original.url), str(prepared_request.url))):
            del prepared_request.headers["Authorization"]


def https_session(ca_file: str, timeout_s: float, *, follow_redirects: bool = True) -> HttpsSession:
    """The session for one HTTPS peer (the IdP, or a sink's API / Graph)."""
    return HttpsSession(ca_file, timeout_s, follow_redirects=follow_redirects)


def _call(observer: Callable[[Any], None], arg: Any) -> None:
    try:
        observer(arg)
    except Exception:  # an observer must never break a request
        log.exception("HTTPS observer %r failed", observer)
