"""Who may use the server: loopback clients only by default; local bearer-token authentication when exposed.

* **Exposure rule.** Without authentication the app serves loopback only: started with ``--host`` other than a
  loopback address (MONAI Label's default is ``0.0.0.0``) it refuses to start and says why
  (:func:`check_exposure`); and every request is checked by :class:`ExposureGuard`: one that arrived on a
  non-loopback address, from a non-loopback client, with a ``Host`` header that is not a loopback name (DNS
  rebinding) or with the ``Origin`` of another site (a web page in the user's browser) is answered 403.
* **Authentication** (``--conf auth_users <users.json>``, :mod:`lib.users`): MONAI Label's client contract, served
  by the app: ``GET /auth/`` (``{"enabled": true, ...}``), ``POST /auth/token`` (form ``username``/``password`` ->
  ``{"access_token", "token_type": "bearer"}``, as ``MONAILabelClient.auth_token`` and the Slicer module call it),
  ``GET /auth/token/valid``. The bearer token is checked by a FastAPI dependency override of MONAI Label's
  ``get_current_user``, so MONAI Label's own RBAC dependency (on every stock route, and on the app's routes) applies
  the roles: 401 for a missing/expired/forged token, 403 for a role without the right.

MONAI Label 0.8.5's own authentication (Keycloak only, switched at import) is not used.
"""

from __future__ import annotations

import ipaddress
import logging
import sys
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.security import OAuth2PasswordRequestForm
from monailabel.config import settings
from monailabel.endpoints.user.auth import User, get_current_user

from lib.users import ROLES, TokenError, UserFileError, UserStore, roles_including

logger = logging.getLogger(__name__)

LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}
DEFAULT_TOKEN_HOURS = 12.0
FAILED_SIGNIN_LIMIT = 10  # per client address and minute


class SecurityConfigError(RuntimeError):
    """A start-up that would expose the server without authentication (or with an unusable users file)."""


def is_loopback(host) -> bool:
    if not isinstance(host, str) or not host:
        return False
    h = host.strip().strip("[]").lower()
    if h in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def served_host(argv=None) -> str | None:
    """The address ``monailabel start_server`` binds, from its command line (``--host``/``-i``; MONAI Label's
    default ``0.0.0.0``); None when this process is not a server start (an app built by a script or a test)."""
    argv = list(sys.argv if argv is None else argv)
    if "start_server" not in argv:
        return None
    host = "0.0.0.0"
    for i, a in enumerate(argv):
        if a == "-i" or (a.startswith("--h") and len(a) >= 4 and "--host".startswith(a)):
            if i + 1 < len(argv):
                host = argv[i + 1]
        elif a.startswith("--host=") or a.startswith("-i="):
            host = a.split("=", 1)[1]
    return host


def monailabel_roles(role: str) -> list[str]:
    """MONAI Label role names of an msxai role and the roles below it."""
    names = {"admin": settings.MONAI_LABEL_AUTH_ROLE_ADMIN, "reviewer": settings.MONAI_LABEL_AUTH_ROLE_REVIEWER,
             "annotator": settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR, "user": settings.MONAI_LABEL_AUTH_ROLE_USER}
    return [names[r] for r in roles_including(role)]


LOCAL_USER_NAME = "local"


@dataclass
class AuthPolicy:
    store: UserStore | None = None
    token_ttl_s: float = DEFAULT_TOKEN_HOURS * 3600

    @property
    def enabled(self) -> bool:
        return self.store is not None

    @classmethod
    def from_conf(cls, conf) -> "AuthPolicy":
        """``--conf auth_users FILE`` (users file of :mod:`lib.users`), ``--conf auth_token_hours H``."""
        path = (conf or {}).get("auth_users")
        try:
            hours = float((conf or {}).get("auth_token_hours", DEFAULT_TOKEN_HOURS))
        except ValueError:
            raise SecurityConfigError("--conf auth_token_hours must be a number of hours") from None
        if not 0 < hours <= 24 * 30:
            raise SecurityConfigError("--conf auth_token_hours must be in (0, 720]")
        if not path:
            return cls(None, hours * 3600)
        store = UserStore(path)
        try:
            users = store.users()
        except UserFileError as exc:
            raise SecurityConfigError(f"--conf auth_users: {exc}") from None
        if not any(u["role"] == "admin" for u in users.values()):
            logger.warning(f"msxai: {store.path} has no admin user: nobody can delete labels or read /logs")
        if not users:
            raise SecurityConfigError(f"--conf auth_users {store.path}: no users; add one with: python "
                                      f"apps/msxai/lib/users.py --file {store.path} add NAME --role admin")
        if store.path.stat().st_mode & 0o077:
            logger.warning(f"msxai: {store.path} is readable by other users of this machine (chmod 600 it)")
        return cls(store, hours * 3600)


def check_exposure(host: str | None, policy: AuthPolicy) -> None:
    """Refuse a start on a non-loopback address without authentication (before any bundle is loaded)."""
    if host is None:
        return
    if policy.enabled:
        logger.info(f"msxai: serving {host} with authentication (users: {policy.store.path})")
        return
    if not is_loopback(host):
        raise SecurityConfigError(
            f"msxai refuses to start on {host!r} without authentication: every study, label and the delete routes "
            "would be open to anyone who can reach this address. Start with --host 127.0.0.1 (this machine only), "
            "or enable authentication with --conf auth_users <users.json> (docs/security.md)."
        )
    logger.info(f"msxai: serving {host} (loopback) without authentication")


# ---------------------------------------------------------------------------------------- FastAPI glue
class _Policy:
    current = AuthPolicy()


def _unauthorized(msg: str) -> HTTPException:
    return HTTPException(status_code=401, detail=msg, headers={"WWW-Authenticate": "Bearer"})


async def msxai_current_user(request: Request) -> User:
    """MONAI Label's ``get_current_user``, replaced: the user of the request's bearer token (auth on), or the local
    user with every role (auth off: only loopback clients get this far, :class:`ExposureGuard`)."""
    policy = _Policy.current
    if not policy.enabled:
        return User(username=LOCAL_USER_NAME, roles=monailabel_roles("admin"))
    scheme, _, token = (request.headers.get("authorization") or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise _unauthorized("authentication required: send 'Authorization: Bearer <token>' (POST /auth/token with "
                            "username and password gives one)")
    try:
        name, role = policy.store.verify_token(token.strip())
    except TokenError as exc:
        raise _unauthorized(str(exc)) from None
    except UserFileError as exc:
        logger.error(f"msxai: users file: {exc}")
        raise HTTPException(status_code=503, detail="the server's users file cannot be read") from None
    return User(username=name, roles=monailabel_roles(role))


_failures: dict[str, deque] = defaultdict(deque)
_failures_lock = threading.Lock()


def _too_many_failures(client: str) -> bool:
    now = time.monotonic()
    with _failures_lock:
        q = _failures[client]
        while q and now - q[0] > 60:
            q.popleft()
        return len(q) >= FAILED_SIGNIN_LIMIT


def _record_failure(client: str) -> None:
    with _failures_lock:
        _failures[client].append(time.monotonic())


def build_auth_router() -> APIRouter:
    router = APIRouter(prefix="/auth", tags=["Auth"])

    @router.get("/", summary="Check If Auth is Enabled (msxai: local users)")
    def msxai_auth_enabled():
        return {"enabled": _Policy.current.enabled, "client_id": "msxai", "realm": "msxai-local-users"}

    @router.post("/token", summary="Fetch a bearer token (form: username, password)")
    def msxai_auth_token(request: Request, form: OAuth2PasswordRequestForm = Depends()):
        policy = _Policy.current
        if not policy.enabled:
            raise HTTPException(status_code=400, detail="authentication is off: this server answers loopback "
                                                        "clients only and needs no token")
        client = request.client.host if request.client else "?"
        if _too_many_failures(client):
            raise HTTPException(status_code=429, detail=f"too many failed sign-ins from {client}: wait a minute")
        role = policy.store.authenticate(form.username, form.password)
        if role is None:
            _record_failure(client)
            logger.warning(f"msxai: failed sign-in for {form.username!r} from {client}")
            raise _unauthorized("wrong user name or password")
        logger.info(f"msxai: sign-in of {form.username} ({role}) from {client}")
        return {"access_token": policy.store.issue_token(form.username, policy.token_ttl_s), "token_type": "bearer",
                "expires_in": int(policy.token_ttl_s)}

    @router.get("/token/valid", summary="Check If current token is Valid")
    def msxai_auth_token_valid(user: User = Depends(get_current_user)):
        return user.model_dump()

    return router


class ExposureGuard:
    """ASGI middleware: without authentication, answer 403 to anything that is not a same-machine request."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope.get("type") in ("http", "websocket") and not _Policy.current.enabled:
            reason = refusal_reason(scope)
            if reason:
                if scope["type"] == "http":
                    from starlette.responses import JSONResponse

                    logger.warning(f"msxai: refused {scope.get('method')} {scope.get('path')}: {reason}")
                    await JSONResponse({"detail": reason}, status_code=403)(scope, receive, send)
                else:
                    await send({"type": "websocket.close", "code": 1008})
                return
        await self.app(scope, receive, send)


def refusal_reason(scope) -> str | None:
    """Why a request must be refused by a server without authentication (None: a loopback request)."""
    base = "this server runs without authentication and serves this machine only"
    server, client = scope.get("server"), scope.get("client")
    if server and server[0] and not is_loopback(server[0]):
        return f"{base}: request received on {server[0]} (start with --host 127.0.0.1, or enable authentication)"
    if client and client[0] and not is_loopback(client[0]):
        return f"{base}: request from {client[0]}"
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or []}
    host = headers.get("host")
    if host:
        name = host[1:].split("]")[0] if host.startswith("[") else host.rsplit(":", 1)[0] if host.count(":") == 1 \
            else host
        if not is_loopback(name):
            return f"{base}: Host {host!r} is not a loopback name"
    origin = headers.get("origin")
    if origin is not None and not is_loopback(urlsplit(origin).hostname or ""):
        return f"{base}: cross-site request from {origin!r}"
    for h in ("forwarded", "x-forwarded-for"):
        if h in headers:
            return f"{base}: request relayed by a proxy ({h} header); a server behind a proxy needs authentication"
    return None


def install(fastapi_app, policy: AuthPolicy) -> None:
    """Plug ``policy`` into the served FastAPI app: current-user override, MONAI Label's RBAC switch, the guard."""
    _Policy.current = policy
    settings.MONAI_LABEL_AUTH_ENABLE = policy.enabled  # MONAI Label's RBAC checks roles only when this is on
    fastapi_app.dependency_overrides[get_current_user] = msxai_current_user
    if not any(getattr(m, "cls", None) is ExposureGuard for m in fastapi_app.user_middleware):
        fastapi_app.middleware_stack = None
        fastapi_app.add_middleware(ExposureGuard)
    logger.info(f"msxai: authentication {'on (' + str(policy.store.path) + ')' if policy.enabled else 'off'}; "
                f"roles {', '.join(ROLES)}")
