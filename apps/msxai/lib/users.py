"""Local users of the msxai app: a JSON file of users with scrypt-hashed passwords and a role, and the signing key of
the bearer tokens the server issues (HS256 JWT, PyJWT).

File (mode 0600, written atomically)::

    {"version": 1, "secret": "<64 hex chars>",
     "users": {"alice": {"role": "annotator", "password": "scrypt$16384$8$1$<salt b64>$<hash b64>", "since": 1767225600}}}

Roles, each including the rights of the ones after it: ``admin`` > ``reviewer`` > ``annotator`` > ``user`` (MONAI
Label's four roles). ``since``: tokens issued before it are refused (set when the password or role changes).
Changing the secret (``rotate-secret``) refuses every token issued so far.

Command line (no server needed; the server re-reads the file when it changes)::

    python apps/msxai/lib/users.py --file ~/.msxai/users.json add alice --role annotator   # asks the password
    python apps/msxai/lib/users.py --file F passwd alice | role alice reviewer | remove alice | list | rotate-secret
"""

from __future__ import annotations

import argparse
import base64
import getpass
import hashlib
import hmac
import json
import os
import re
import secrets
import sys
import threading
import time
from pathlib import Path

ROLES = ("admin", "reviewer", "annotator", "user")
ISSUER = "msxai"
ALGORITHM = "HS256"
SCRYPT_N, SCRYPT_R, SCRYPT_P, SCRYPT_LEN = 2**14, 8, 1, 32
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
MIN_PASSWORD = 8


class UserFileError(ValueError):
    """A users file that cannot be used (missing, malformed) or a refused change."""


class TokenError(ValueError):
    """A bearer token that is missing, malformed, forged, expired or of a user who no longer has access."""


def roles_including(role: str) -> list[str]:
    """``annotator`` -> ``["annotator", "user"]``: a role and the ones below it."""
    if role not in ROLES:
        raise UserFileError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    return list(ROLES[ROLES.index(role):])


# -------------------------------------------------------------------------------------------------- passwords
def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    dk = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=SCRYPT_LEN)
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${b64(salt)}${b64(dk)}"


def check_password(password: str, stored: str) -> bool:
    try:
        kind, n, r, p, salt, dk = stored.split("$")
        if kind != "scrypt":
            return False
        want = base64.b64decode(dk)
        got = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p),
                             dklen=len(want))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, want)


_DUMMY = None


def _dummy_hash() -> str:
    global _DUMMY
    if _DUMMY is None:
        _DUMMY = hash_password(secrets.token_hex(8))
    return _DUMMY


# ------------------------------------------------------------------------------------------------------ store
def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


class UserStore:
    """The users file, re-read when it changes on disk."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        self._data: dict | None = None
        self._stamp = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------------ file
    @classmethod
    def create(cls, path: str | Path) -> "UserStore":
        store = cls(path)
        if store.path.exists():
            raise UserFileError(f"{store.path} exists")
        store._save({"version": 1, "secret": secrets.token_hex(32), "users": {}})
        return store

    def load(self) -> dict:
        with self._lock:
            try:
                st = self.path.stat()
            except OSError:
                raise UserFileError(f"users file {self.path} not found; create it with: python "
                                    f"apps/msxai/lib/users.py --file {self.path} add NAME --role admin") from None
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            if self._data is None or stamp != self._stamp:
                try:
                    data = json.loads(self.path.read_text())
                except ValueError as exc:
                    raise UserFileError(f"users file {self.path} is not valid JSON ({exc})") from None
                if not isinstance(data, dict) or not isinstance(data.get("users"), dict) or \
                        not isinstance(data.get("secret"), str) or len(data["secret"]) < 32:
                    raise UserFileError(f"users file {self.path}: expected {{'secret': ..., 'users': {{...}}}}")
                self._data, self._stamp = data, stamp
            return self._data

    def _save(self, data: dict) -> None:
        _atomic_write(self.path, json.dumps(data, indent=1, sort_keys=True))
        with self._lock:
            self._data, self._stamp = None, None

    def users(self) -> dict[str, dict]:
        return {k: {"role": v.get("role")} for k, v in self.load()["users"].items()}

    # ---------------------------------------------------------------------------------------- changes
    def add(self, name: str, password: str, role: str) -> None:
        data = self.load()
        if not NAME_RE.match(name or ""):
            raise UserFileError(f"user name {name!r}: 1-64 characters of letters, digits, '.', '_', '@', '-'")
        if name in data["users"]:
            raise UserFileError(f"user {name!r} exists (use passwd / role)")
        roles_including(role)
        self._check_password_rules(password)
        data = dict(data, users=dict(data["users"]))
        data["users"][name] = {"role": role, "password": hash_password(password), "since": int(time.time())}
        self._save(data)

    def set_password(self, name: str, password: str) -> None:
        data = self._user_data(name)
        self._check_password_rules(password)
        data["users"][name].update(password=hash_password(password), since=int(time.time()))
        self._save(data)

    def set_role(self, name: str, role: str) -> None:
        data = self._user_data(name)
        roles_including(role)
        data["users"][name].update(role=role, since=int(time.time()))
        self._save(data)

    def remove(self, name: str) -> None:
        data = self._user_data(name)
        del data["users"][name]
        self._save(data)

    def rotate_secret(self) -> None:
        data = json.loads(json.dumps(self.load()))
        data["secret"] = secrets.token_hex(32)
        self._save(data)

    def _user_data(self, name: str) -> dict:
        data = json.loads(json.dumps(self.load()))
        if name not in data["users"]:
            raise UserFileError(f"no user {name!r}")
        return data

    @staticmethod
    def _check_password_rules(password: str) -> None:
        if not isinstance(password, str) or len(password) < MIN_PASSWORD:
            raise UserFileError(f"password: at least {MIN_PASSWORD} characters")

    # ------------------------------------------------------------------------------------- sign-in
    def authenticate(self, name: str, password: str) -> str | None:
        """The user's role if ``password`` is theirs, else None (the same work either way)."""
        user = self.load()["users"].get(name) if isinstance(name, str) else None
        ok = check_password(password or "", user["password"] if user else _dummy_hash())
        return user["role"] if (user and ok) else None

    def issue_token(self, name: str, ttl_s: float) -> str:
        import jwt

        data = self.load()
        user = data["users"][name]
        now = int(time.time())
        claims = {"iss": ISSUER, "sub": name, "preferred_username": name, "role": user["role"], "iat": now,
                  "exp": now + int(ttl_s), "jti": secrets.token_hex(8)}
        return jwt.encode(claims, data["secret"], algorithm=ALGORITHM)

    def verify_token(self, token: str) -> tuple[str, str]:
        """``(user name, role)`` of a valid token; :class:`TokenError` naming why otherwise. The role is the one in the
        users file now (a lowered role applies at once); a removed user, or a token older than the user's last
        password/role change, is refused."""
        import jwt

        data = self.load()
        try:
            claims = jwt.decode(token, data["secret"], algorithms=[ALGORITHM], issuer=ISSUER,
                                options={"require": ["exp", "iat", "sub", "iss"]})
        except jwt.ExpiredSignatureError:
            raise TokenError("token expired: get a new one from POST /auth/token") from None
        except jwt.InvalidTokenError as exc:
            raise TokenError(f"invalid token ({type(exc).__name__}): get one from POST /auth/token") from None
        name = claims.get("sub")
        user = data["users"].get(name) if isinstance(name, str) else None
        if user is None:
            raise TokenError(f"user {name!r} no longer has access")
        if int(claims.get("iat", 0)) < int(user.get("since", 0)):
            raise TokenError("token issued before the user's last password/role change: sign in again")
        return name, user["role"]


# -------------------------------------------------------------------------------------------------------- CLI
def _read_password(args) -> str:
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\n")
    p1 = getpass.getpass("password: ")
    p2 = getpass.getpass("again: ")
    if p1 != p2:
        raise UserFileError("the passwords differ")
    return p1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="users.py", description="Users of the msxai MONAI Label app (auth_users file)")
    ap.add_argument("--file", required=True, help="the users file (created by the first 'add')")
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("add", help="add a user")
    a.add_argument("name")
    a.add_argument("--role", choices=ROLES, required=True)
    pw = sub.add_parser("passwd", help="change a password")
    pw.add_argument("name")
    for p in (a, pw):
        p.add_argument("--password-stdin", action="store_true", help="read the password from the first line of stdin")
    r = sub.add_parser("role", help="change a role")
    r.add_argument("name")
    r.add_argument("role", choices=ROLES)
    sub.add_parser("remove", help="remove a user").add_argument("name")
    sub.add_parser("list", help="list users and roles")
    sub.add_parser("rotate-secret", help="new token signing key: every issued token is refused")
    args = ap.parse_args(argv)
    try:
        store = UserStore(args.file)
        if args.cmd == "add" and not store.path.exists():
            store = UserStore.create(args.file)
        if args.cmd == "add":
            store.add(args.name, _read_password(args), args.role)
        elif args.cmd == "passwd":
            store.set_password(args.name, _read_password(args))
        elif args.cmd == "role":
            store.set_role(args.name, args.role)
        elif args.cmd == "remove":
            store.remove(args.name)
        elif args.cmd == "rotate-secret":
            store.rotate_secret()
        else:
            for name, u in sorted(store.users().items()):
                print(f"{name}\t{u['role']}")
            return 0
    except UserFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.cmd}: done ({store.path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
