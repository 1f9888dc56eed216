"""The user-token format, shared by the server (auth.py verifies and mints) and the client
library (which mints locally from its sk_ key). Standard library only.

    ut1.<key_id>.<b64url(json {"app","user","exp"})>.<b64url(HMAC-SHA256(signing key, "ut1.<key_id>.<claims>"))>

The signing key is HMAC-SHA256(key=the whole sk_ key, msg=b"quotad user token v1"); `exp` is
in Unix seconds.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

USER_TOKEN_VERSION = "ut1"
USER_TOKEN_CONTEXT = b"quotad user token v1"
USER_TOKEN_HEADER = "x-quotad-user-token"
KEY_ID_PATTERN = "[a-z2-7]{12}"
"""A key id: 12 lower-case base32 characters (60 random bits)."""
KEY_SECRET_PATTERN = "[A-Za-z0-9_-]{43,128}"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def token_signing_key(whole_key: str) -> bytes:
    """The HMAC key the user tokens of this sk_ key are signed with."""
    return hmac.new(whole_key.encode("ascii"), USER_TOKEN_CONTEXT, hashlib.sha256).digest()


def token_mac(signing_key: bytes, signed: str) -> bytes:
    return hmac.new(signing_key, signed.encode("ascii"), hashlib.sha256).digest()


def sign_user_token(signing_key: bytes, key_id: str, app: str, user_id: str,
                    expires_at_s: int) -> str:
    claims = json.dumps({"app": app, "user": user_id, "exp": expires_at_s},
                        separators=(",", ":"), sort_keys=True, ensure_ascii=False)
    signed = f"{USER_TOKEN_VERSION}.{key_id}.{b64(claims.encode('utf-8'))}"
    return f"{signed}.{b64(token_mac(signing_key, signed))}"
