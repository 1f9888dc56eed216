"""User tokens, minted locally from an sk_ key: no call to the server.

A user token lets a pk_ key (in a browser) read the usage of exactly one user of one app::

    ut1.<key_id>.<b64url(json {"app","user","exp"})>.<b64url(HMAC-SHA256(signing key, "ut1.<key_id>.<claims>"))>

where the signing key is HMAC-SHA256(key=the whole sk_ key, msg=b"quotad user token v1") and
``exp`` is in Unix seconds. The server checks it with the signing key it keeps for that sk_
key: the format here must match quotad/auth.py byte for byte.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import time
from datetime import timedelta

USER_TOKEN_VERSION = "ut1"
USER_TOKEN_CONTEXT = b"quotad user token v1"
USER_TOKEN_TTL_S_MIN = 1
USER_TOKEN_TTL_S_MAX = 24 * 3600
_SECRET_KEY_PATTERN = re.compile(r"sk_([a-z2-7]{12})_[A-Za-z0-9_-]{43,128}")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def sign_user_token(secret_key: str, app: str, user_id: str, expires_at_s: int) -> str:
    """A user token that expires at ``expires_at_s`` (Unix seconds), signed with the sk_ key."""
    match = _SECRET_KEY_PATTERN.fullmatch(secret_key)
    if match is None:
        raise ValueError("secret_key must be an sk_ key as CreateKey returned it")
    signing_key = hmac.new(secret_key.encode("ascii"), USER_TOKEN_CONTEXT,
                           hashlib.sha256).digest()
    claims = json.dumps({"app": app, "user": user_id, "exp": expires_at_s},
                        separators=(",", ":"), sort_keys=True, ensure_ascii=False)
    signed = f"{USER_TOKEN_VERSION}.{match.group(1)}.{_b64(claims.encode('utf-8'))}"
    mac = hmac.new(signing_key, signed.encode("ascii"), hashlib.sha256).digest()
    return f"{signed}.{_b64(mac)}"


def mint_user_token(secret_key: str, app: str, user_id: str,
                    ttl_s: float | timedelta = 3600) -> str:
    """A token naming ``user_id`` of ``app`` (the sk_ key's app), valid for ``ttl_s`` (1 s to
    24 h). Give it to that user's browser, which sends it with a pk_ key of the same app."""
    seconds = ttl_s.total_seconds() if isinstance(ttl_s, timedelta) else ttl_s
    if not USER_TOKEN_TTL_S_MIN <= seconds <= USER_TOKEN_TTL_S_MAX:
        raise ValueError(f"ttl_s must be {USER_TOKEN_TTL_S_MIN} to {USER_TOKEN_TTL_S_MAX} s")
    if not app or not user_id:
        raise ValueError("app and user_id must not be empty")
    return sign_user_token(secret_key, app, user_id, int(time.time() + seconds))
