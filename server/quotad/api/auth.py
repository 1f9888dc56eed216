"""Who is calling, and what they may do: API keys, user tokens, permission rules.

Two modes. Without an admin key ("open" mode) every call acts as app "default" and the server
listens only on loopback. With one, every call carries `authorization: Bearer <key>`:

- the admin key (configured, never stored) may create, list and revoke keys of any app,
  export any app's usage (ExportUsage), and read the whole server's state digest
  (GetStateDigest, which covers every app), nothing else;
- a secret key `sk_<key_id>_<secret>` may do everything within its own app (GetStateDigest,
  which would show other apps' activity, is not within an app);
- a public key `pk_<key_id>_<secret>` may only read usage (GetUsage, WatchUsage, ListGrants)
  of the user named by a user token of its app, sent as `x-quotad-user-token`.

Keys are stored as SHA-256 only and compared in constant time. A user token is
`ut1.<key_id>.<b64url(json {"app","user","exp"})>.<b64url(mac)>`, the MAC an HMAC-SHA256
under HMAC-SHA256(key=the whole sk key, msg=b"quotad user token v1"), which the server keeps
with the sk key; revoking that key invalidates its tokens. `exp` is Unix seconds.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from quotad.core import limits
from quotad.core.commands import MintUserToken
from quotad.core.machine import KeyState
from quotad.core.errors import FailedPrecondition, PermissionDenied, Unauthenticated
from quotad_contract.errors import ErrorReason
from quotad_contract.tokens import (
    KEY_ID_PATTERN, KEY_SECRET_PATTERN, USER_TOKEN_HEADER, USER_TOKEN_VERSION, sign_user_token,
    token_mac, token_signing_key, unb64,
)

DEFAULT_APP = "default"
ADMIN = "admin"
SECRET = "secret"
PUBLIC = "public"
OPEN = "open"
"""The kind of every caller when no admin key is configured."""

AUTHORIZATION_HEADER = "authorization"
KEY_PREFIXES = {SECRET: "sk", PUBLIC: "pk"}
KEY_SECRET_BYTES = 32
_KEY_PATTERN = re.compile(rf"(sk|pk)_({KEY_ID_PATTERN})_({KEY_SECRET_PATTERN})")
_KINDS_BY_PREFIX = {prefix: kind for kind, prefix in KEY_PREFIXES.items()}

KEY_RPCS = frozenset({"CreateKey", "RevokeKey", "ListKeys", "MintUserToken"})
MOVE_RPCS = frozenset({"FreezeSlots", "ExportSlots", "AdoptSlots", "ForgetSlots", "ThawSlots"})
"""Moving slots between shards: they cover every app's users of the slots."""
ADMIN_RPCS = frozenset({"CreateKey", "RevokeKey", "ListKeys", "GetStateDigest",
                        "ExportUsage"}) | MOVE_RPCS
SERVER_RPCS = frozenset({"GetStateDigest"}) | MOVE_RPCS
"""RPCs about the whole server, every app at once: the admin key's alone when keys are on."""
PUBLIC_RPCS = frozenset({"GetUsage", "WatchUsage", "ListGrants"})
"""RPCs a pk key may call, each for the user its user token names."""
ANY_CALLER_RPCS = frozenset({"GetShardMap"})
"""RPCs every caller whose key is valid may call (any kind, the admin key's too)."""


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller: its app (empty for the admin key), its kind, and its key id."""

    app: str
    kind: str
    key_id: str = ""


OPEN_PRINCIPAL = Principal(app=DEFAULT_APP, kind=OPEN)
ADMIN_PRINCIPAL = Principal(app="", kind=ADMIN)


@dataclass(frozen=True, slots=True)
class UserToken:
    """A user token that verified: whose it is, the sk key that signed it, when it expires."""

    app: str
    user_id: str
    key_id: str
    expires_at_s: int


@dataclass(frozen=True, slots=True)
class UsageGrant:
    """A usage read let in, and what its right rests on, so that a read that lasts (a watch)
    ends when that right does: when a key named here is revoked, or at expires_at_s."""

    principal: Principal
    token: UserToken | None = None
    """The user token a pk key came with (None for any other caller)."""

    @property
    def app(self) -> str:
        return self.principal.app

    @property
    def key_ids(self) -> frozenset[str]:
        """The keys whose revocation ends the right: the caller's, and its token's signer."""
        ids = {self.principal.key_id, self.token.key_id if self.token else ""}
        return frozenset(ids - {""})

    @property
    def expires_at_s(self) -> int | None:
        return None if self.token is None else self.token.expires_at_s


@dataclass(frozen=True, slots=True)
class NewKey:
    """A key just made: the whole key (shown once) and what is stored of it."""

    key_id: str
    kind: str
    whole: str
    secret_sha256: str
    token_signing_key: str


def new_key(kind: str) -> NewKey:
    """A fresh random key of this kind (secret or public)."""
    key_id = base64.b32encode(secrets.token_bytes(10)).decode("ascii").lower()[:12]
    whole = f"{KEY_PREFIXES[kind]}_{key_id}_{secrets.token_urlsafe(KEY_SECRET_BYTES)}"
    return NewKey(key_id=key_id, kind=kind, whole=whole, secret_sha256=_sha256_hex(whole),
                  token_signing_key=token_signing_key(whole).hex() if kind == SECRET else "")


def _sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def header(metadata: Iterable[Any] | Mapping[str, str], name: str) -> str | None:
    """The value of one header in gRPC metadata (key, value pairs) or an HTTP header mapping;
    None when absent."""
    pairs = metadata.items() if isinstance(metadata, Mapping) else metadata
    for key, value in pairs:
        if key.lower() == name:
            return value.decode("latin-1") if isinstance(value, bytes) else value
    return None


def presented_key_id(authorization: str | None) -> str:
    """The key id of the API key an authorization header presents, read without checking the
    key ("" if it presents none): what a log line may name, the id being no secret (ListKeys
    shows it) and the rest of the key never read here."""
    if authorization is None:
        return ""
    scheme, _, candidate = authorization.strip().partition(" ")
    match = _KEY_PATTERN.fullmatch(candidate.strip())
    return match.group(2) if scheme.lower() == "bearer" and match is not None else ""


class Authenticator:
    """Turns call metadata into a Principal and applies the permission rules.

    `keys` is the core's key table, read on the event loop that owns the core, so a revoked
    key fails on the very next call."""

    def __init__(self, admin_key: str, keys: Mapping[str, KeyState],
                 now_s: Callable[[], float] = time.time) -> None:
        self.admin_key = admin_key
        self.keys = keys
        self._now_s = now_s

    def authenticate(self, metadata: Iterable[Any] | Mapping[str, str]) -> Principal:
        """The caller, or Unauthenticated: missing, malformed, unknown or revoked key."""
        if not self.admin_key:
            return OPEN_PRINCIPAL
        value = header(metadata, AUTHORIZATION_HEADER)
        if value is None:
            raise Unauthenticated("this server takes API keys: send "
                                  "'authorization: Bearer <key>'")
        scheme, _, candidate = value.strip().partition(" ")
        candidate = candidate.strip()
        if scheme.lower() != "bearer" or not candidate:
            raise Unauthenticated("the authorization header must be 'Bearer <key>'")
        if hmac.compare_digest(candidate.encode("utf-8", "surrogatepass"),
                               self.admin_key.encode("utf-8")):
            return ADMIN_PRINCIPAL
        match = _KEY_PATTERN.fullmatch(candidate)
        if match is None:
            raise Unauthenticated("not an API key of this server")
        prefix, key_id, _ = match.groups()
        key = self.keys.get(key_id)
        if (key is None or key.kind != _KINDS_BY_PREFIX[prefix]
                or not hmac.compare_digest(_sha256_hex(candidate), key.secret_sha256)):
            raise Unauthenticated("unknown API key")
        if key.revoked_at_ns is not None:
            raise Unauthenticated(f"API key {key_id} is revoked")
        return Principal(app=key.app, kind=key.kind, key_id=key_id)

    def identify(self, metadata: Iterable[Any] | Mapping[str, str]) -> tuple[str, str]:
        """(app, key id) a call's credentials name, for its log lines, whether or not they
        verify (a refused call's may not): the open mode's ("default", ""), the admin key's
        ("", "admin"), a key's id and the app of the key known by that id ("" if none)."""
        if not self.admin_key:
            return DEFAULT_APP, ""
        value = header(metadata, AUTHORIZATION_HEADER)
        _, _, candidate = (value or "").strip().partition(" ")
        if candidate and hmac.compare_digest(candidate.strip().encode("utf-8", "surrogatepass"),
                                             self.admin_key.encode("utf-8")):
            return "", ADMIN
        key_id = presented_key_id(value)
        key = self.keys.get(key_id)
        return (key.app if key is not None else ""), key_id

    def authorize(self, principal: Principal, rpc: str) -> None:
        """May this caller call this RPC at all? (What it touches is checked later: the app
        of a reservation by the core, the user of a usage read by authorize_usage_read.)"""
        if principal.kind == OPEN:
            if rpc in KEY_RPCS:
                raise FailedPrecondition(
                    ErrorReason.KEYS_DISABLED,
                    "API keys are off: start quotad with an admin key (QUOTAD_ADMIN_KEY or "
                    "--admin-key-file) to create and use them")
            return
        if rpc in ANY_CALLER_RPCS:
            return
        if principal.kind == ADMIN:
            if rpc not in ADMIN_RPCS:
                raise PermissionDenied(f"the admin key may only create, list and revoke keys, "
                                       f"read the state digest, export usage and move "
                                       f"slots, not call "
                                       f"{rpc}; use an sk_ key of the app")
            return
        if rpc in SERVER_RPCS:
            raise PermissionDenied(f"{rpc} covers every app's state: only the admin key may "
                                   "call it")  # the state digest, and the moves of slots
        if principal.kind == PUBLIC and rpc not in PUBLIC_RPCS:
            raise PermissionDenied(f"a pk_ key may only read usage, not call {rpc}")

    def authorize_usage_read(self, principal: Principal,
                             metadata: Iterable[Any] | Mapping[str, str],
                             user_id: str) -> UsageGrant:
        """May this caller read this user's usage (GetUsage, WatchUsage, HTTP)? A pk key needs
        a valid user token of its app naming exactly this user."""
        self.authorize(principal, "GetUsage")
        if principal.kind != PUBLIC:
            return UsageGrant(principal)
        token = self.verify_user_token(header(metadata, USER_TOKEN_HEADER))
        if token.app != principal.app:
            raise PermissionDenied("the user token belongs to another app")
        if token.user_id != user_id:
            raise PermissionDenied("the user token names another user")
        return UsageGrant(principal, token)

    def verify_user_token(self, token: str | None) -> UserToken:
        """The user token, once it verifies; else Unauthenticated."""
        if not token:
            raise Unauthenticated(f"a pk_ key needs a user token in '{USER_TOKEN_HEADER}'")
        if len(token) > limits.USER_TOKEN_BYTES_MAX:
            raise Unauthenticated(f"the user token is longer than "
                                  f"{limits.USER_TOKEN_BYTES_MAX} bytes")
        parts = token.split(".")
        if len(parts) != 4 or parts[0] != USER_TOKEN_VERSION:
            raise Unauthenticated("malformed user token")
        _, key_id, claims_b64, mac_b64 = parts
        key = self.keys.get(key_id)
        if key is None or key.kind != SECRET or key.revoked_at_ns is not None:
            raise Unauthenticated("the user token's signing key is unknown or revoked")
        try:
            mac = unb64(mac_b64)
            expected = token_mac(bytes.fromhex(key.token_signing_key),
                                 f"{parts[0]}.{key_id}.{claims_b64}")
        except (ValueError, binascii.Error, UnicodeEncodeError):
            raise Unauthenticated("malformed user token") from None
        if not hmac.compare_digest(mac, expected):
            raise Unauthenticated("the user token's signature does not verify")
        try:
            claims = json.loads(unb64(claims_b64).decode("utf-8"))
            app, user_id, expires_at_s = claims["app"], claims["user"], claims["exp"]
        except (ValueError, KeyError, TypeError, binascii.Error):
            raise Unauthenticated("malformed user token") from None
        if not (isinstance(app, str) and isinstance(user_id, str)
                and type(expires_at_s) is int) or app != key.app:
            raise Unauthenticated("malformed user token")
        if expires_at_s <= self._now_s():
            raise Unauthenticated("the user token has expired")
        return UserToken(app=app, user_id=user_id, key_id=key_id, expires_at_s=expires_at_s)

    def mint_user_token(self, principal: Principal, request: MintUserToken) -> tuple[str, int]:
        """(token, expires_at_s) for a user of the caller's app, signed with the caller's sk
        key. Only an sk key (authorize rules out the rest), for a request of its own app."""
        key = self.keys[principal.key_id]
        assert request.app == key.app, (request.app, key.app)
        expires_at_s = int(self._now_s() + request.ttl_ns / limits.NS_PER_S)
        return (sign_user_token(bytes.fromhex(key.token_signing_key), key.key_id, key.app,
                                request.user_id, expires_at_s), expires_at_s)
