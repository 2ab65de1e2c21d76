"""The optional API key of the generation routes."""

from __future__ import annotations

import hmac

from fastapi import Request
from pydantic import SecretStr

from service.errors import APIError


def authorize(request: Request, key: SecretStr | None) -> None:
    """Raise 401 unless `key` is unset or the request carries `Authorization: Bearer <key>`."""
    if key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    # compare_digest takes as long for a near miss as for a wild guess, so timing leaks nothing.
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.get_secret_value().encode()):
        raise APIError(
            401,
            "missing or wrong API key: send 'Authorization: Bearer <key>'",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
