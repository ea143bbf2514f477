"""Signing keys fetched from a JWKS URL or an OIDC issuer's discovery document: cached, bounded."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
import jwt

__all__ = ["MAX_JWKS_BYTES", "MAX_JWKS_KEYS", "KeysUnavailable", "RemoteJwks", "check_url"]

log = logging.getLogger(__name__)

#: A discovery document or key set larger than this is refused (a real one is a few KiB).
MAX_JWKS_BYTES = 1 << 20
#: A key set with more keys than this is refused (issuers publish a handful).
MAX_JWKS_KEYS = 100
_MAX_AGE = re.compile(r"(?:^|,)\s*max-age\s*=\s*\"?(\d+)", re.IGNORECASE)


class KeysUnavailable(Exception):
    """No key set could be fetched and none cached is still usable: the token must be refused."""


class _FetchError(Exception):
    """A discovery or JWKS fetch failed; the message names the URL and goes to the log only."""


def check_url(url: str, *, allow_insecure_http: bool) -> None:
    """Refuse anything but https, or plain http to a loopback host unless explicitly allowed."""
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError(f"{url!r} is not an http(s) URL")
    if parts.scheme == "http" and not allow_insecure_http and not _is_loopback(parts.hostname):
        raise ValueError(
            f"{url!r}: plain http is only allowed to a loopback host; use https "
            "(or set allow_insecure_http = true)"
        )


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class _Key:
    key: Any
    #: The JWK's own ``alg``, when it declares one: then only tokens of that alg may use it.
    alg: str | None


@dataclass(frozen=True)
class _KeySet:
    keys: dict[str, _Key]
    fresh_until: float
    #: Past ``fresh_until`` the set still answers while refreshes fail, until this.
    usable_until: float


class RemoteJwks:
    """The keys at a JWKS URL, or at the ``jwks_uri`` an issuer's discovery document names.

    Fetched on first use and cached for ``cache_s`` (less if ``Cache-Control: max-age`` says
    so). An expired cache or a token naming an unknown ``kid`` triggers a refetch, at most one
    per ``min_refresh_s`` whatever the traffic, so random kids cannot make us hammer the
    issuer. While the issuer is down the last set keeps answering until ``stale_s`` past its
    expiry; with nothing usable cached, ``find`` raises ``KeysUnavailable`` (fail closed).
    """

    def __init__(
        self,
        *,
        jwks_url: str | None = None,
        issuer_url: str | None = None,
        timeout_s: float = 5.0,
        cache_s: float = 300.0,
        min_refresh_s: float = 30.0,
        stale_s: float = 3600.0,
        allow_insecure_http: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if (jwks_url is None) == (issuer_url is None):
            raise ValueError("RemoteJwks needs exactly one of jwks_url and issuer_url")
        self._jwks_url = jwks_url
        self._issuer_url = issuer_url
        self._discovered: str | None = None
        self._timeout_s = timeout_s
        self._cache_s = cache_s
        self._min_refresh_s = min_refresh_s
        self._stale_s = stale_s
        self._allow_insecure_http = allow_insecure_http
        self._clock = clock
        self._cached: _KeySet | None = None
        self._last_attempt: float | None = None
        # One fetch at a time: concurrent requests for an unknown kid wait for it, not refetch.
        self._lock = asyncio.Lock()

    async def find(self, kid: str | None, alg: str) -> Any | None:
        """The key for a token's ``kid`` and ``alg``; None if the set has no such key.

        Raises ``KeysUnavailable`` when there is no usable key set at all.
        """
        cached = self._cached
        fresh = cached is not None and self._clock() < cached.fresh_until
        key = self._pick(kid, alg)
        # An unknown kid may be a rotation; an expired set is refreshed, but a stale key that
        # answers does not wait for a refresh another request already has in flight.
        if key is None or (not fresh and not self._lock.locked()):
            await self._refresh()
            key = self._pick(kid, alg)
        if key is None and not self._usable():
            raise KeysUnavailable
        return key

    def _usable(self) -> bool:
        return self._cached is not None and self._clock() < self._cached.usable_until

    def _pick(self, kid: str | None, alg: str) -> Any | None:
        if not self._usable():
            return None
        assert self._cached is not None
        keys = self._cached.keys
        if kid is None:
            found = next(iter(keys.values())) if len(keys) == 1 else None
        else:
            found = keys.get(kid)
        if found is None or (found.alg is not None and found.alg != alg):
            return None
        return found.key

    async def _refresh(self) -> None:
        async with self._lock:
            now = self._clock()
            if self._last_attempt is not None and now - self._last_attempt < self._min_refresh_s:
                return  # fetched (or failed) just now, maybe by the request we waited behind
            self._last_attempt = now
            try:
                keys, max_age = await self._fetch()
            except _FetchError as exc:
                log.warning("jwt: could not refresh signing keys: %s", exc)
                return
            ttl = self._cache_s if max_age is None else min(self._cache_s, max_age)
            now = self._clock()
            self._cached = _KeySet(keys, now + ttl, now + ttl + self._stale_s)

    async def _fetch(self) -> tuple[dict[str, _Key], float | None]:
        # trust_env: HTTPS_PROXY / NO_PROXY apply, as a deployment behind a proxy needs.
        async with httpx.AsyncClient(timeout=self._timeout_s, follow_redirects=False) as client:
            url = self._jwks_url or self._discovered or await self._discover(client)
            try:
                body, max_age = await self._get(client, url)
                return _parse_jwks(body, url), max_age
            except _FetchError:
                self._discovered = None  # the issuer may have moved its keys: rediscover
                raise

    async def _discover(self, client: httpx.AsyncClient) -> str:
        issuer = self._issuer_url
        assert issuer is not None
        url = issuer.rstrip("/") + "/.well-known/openid-configuration"
        body, _ = await self._get(client, url)
        document = _json_object(body, url)
        # OpenID Connect Discovery 1.0 §4.3: the document must name exactly this issuer.
        if document.get("issuer") != issuer:
            raise _FetchError(f"{url}: issuer {document.get('issuer')!r} is not {issuer!r}")
        jwks_uri = document.get("jwks_uri")
        if not isinstance(jwks_uri, str):
            raise _FetchError(f"{url}: no jwks_uri")
        try:
            check_url(jwks_uri, allow_insecure_http=self._allow_insecure_http)
        except ValueError as exc:
            raise _FetchError(f"{url}: jwks_uri {exc}") from None
        self._discovered = jwks_uri
        return jwks_uri

    async def _get(self, client: httpx.AsyncClient, url: str) -> tuple[bytes, float | None]:
        """GET ``url``: 200 only, at most MAX_JWKS_BYTES, within the timeout as a whole."""
        try:
            async with asyncio.timeout(self._timeout_s):
                headers = {"Accept": "application/json"}
                async with client.stream("GET", url, headers=headers) as response:
                    if response.status_code != 200:
                        raise _FetchError(f"GET {url}: HTTP {response.status_code}")
                    declared = response.headers.get("content-length", "")
                    if declared.isdigit() and int(declared) > MAX_JWKS_BYTES:
                        raise _FetchError(f"GET {url}: {declared} bytes, over {MAX_JWKS_BYTES}")
                    body = bytearray()
                    async for chunk in response.aiter_bytes():
                        body += chunk
                        if len(body) > MAX_JWKS_BYTES:
                            raise _FetchError(f"GET {url}: response over {MAX_JWKS_BYTES} bytes")
                    return bytes(body), _max_age(response.headers.get("cache-control", ""))
        except TimeoutError:
            raise _FetchError(f"GET {url}: no answer within {self._timeout_s:g} s") from None
        except httpx.HTTPError as exc:
            raise _FetchError(f"GET {url}: {type(exc).__name__}: {exc}") from None


def _max_age(cache_control: str) -> float | None:
    match = _MAX_AGE.search(cache_control)
    return float(match[1]) if match else None


def _json_object(body: bytes, url: str) -> dict[str, Any]:
    try:
        document = json.loads(body)
    except ValueError:
        raise _FetchError(f"{url}: not JSON") from None
    if not isinstance(document, dict):
        raise _FetchError(f"{url}: not a JSON object")
    return document


def _parse_jwks(body: bytes, url: str) -> dict[str, _Key]:
    entries = _json_object(body, url).get("keys")
    if not isinstance(entries, list):
        raise _FetchError(f"{url}: not a JWKS (no 'keys' list)")
    if len(entries) > MAX_JWKS_KEYS:
        raise _FetchError(f"{url}: {len(entries)} keys, more than {MAX_JWKS_KEYS}")
    keys: dict[str, _Key] = {}
    for entry in entries:
        # Encryption keys never verify a signature, and a published set holds no secrets.
        if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
            continue
        if entry.get("kty") == "oct":
            continue
        try:
            jwk = jwt.PyJWK(entry)
        except (jwt.PyJWTError, KeyError, TypeError, ValueError) as exc:
            log.info("jwt: %s: skipping key %r: %s", url, entry.get("kid"), exc)
            continue
        alg = entry.get("alg")
        keys[str(entry.get("kid") or "")] = _Key(jwk.key, alg if isinstance(alg, str) else None)
    if not keys:
        raise _FetchError(f"{url}: no usable signing keys")
    return keys
