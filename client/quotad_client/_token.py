"""User tokens, minted locally from an sk_ key: no call to the server.

A user token lets a pk_ key (in a browser) read the usage of exactly one user of one app.
Its format is quotad.tokens', the one the server verifies.
"""

from __future__ import annotations

import re
import time
from datetime import timedelta

from quotad_contract import limits
from quotad_contract.tokens import KEY_ID_PATTERN, KEY_SECRET_PATTERN, sign_user_token as _sign
from quotad_contract.tokens import token_signing_key

USER_TOKEN_TTL_S_MIN = limits.USER_TOKEN_TTL_NS_MIN // limits.NS_PER_S
USER_TOKEN_TTL_S_MAX = limits.USER_TOKEN_TTL_NS_MAX // limits.NS_PER_S
_SECRET_KEY_PATTERN = re.compile(rf"sk_({KEY_ID_PATTERN})_{KEY_SECRET_PATTERN}")


def sign_user_token(secret_key: str, app: str, user_id: str, expires_at_s: int) -> str:
    """A user token that expires at ``expires_at_s`` (Unix seconds), signed with the sk_ key."""
    match = _SECRET_KEY_PATTERN.fullmatch(secret_key)
    if match is None:
        raise ValueError("secret_key must be an sk_ key as CreateKey returned it")
    return _sign(token_signing_key(secret_key), match.group(1), app, user_id, expires_at_s)


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
