"""Signed downgrade grants: the workstation's "install this older archive" that a device can check.

Anti-rollback (docs/DELIVERY.md) refuses a bundle older than the active one. `edgecv push --allow-downgrade`
lifts that for one push, but the push metadata (`begin`) travels unsigned, so on a device that requires signed
bundles the request counts only with a grant signed by a key of the device's keyring. Without it, anyone who can
write the push topic could replay an old, validly signed bundle (a known-bad model) and ask for it to be installed.

A grant binds three things and nothing else, in the signed statement `statement()`:
- `sha256`: the exact archive (the `begin` message's sha256, which the device checks on the received bytes);
- `target`: one device id or group name (the device accepts its own id or one of its groups);
- `expires`: epoch seconds; a device refuses a grant past it, and one valid for more than MAX_GRANT_S from now
  (a device clock far behind, or a grant meant to be replayed later).
A captured grant can therefore only repeat the same downgrade, to the same target, for a short while.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Collection
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgecv.agent.contract import documents as D
from edgecv.agent.contract.names import check_name, shown
from edgecv.agent.contract.signing import Keyring, key_id
from edgecv.agent.errors import DocumentError, EdgecvError, UnsafeNameError

CONTEXT = "edgecv-downgrade-grant/1"
DEFAULT_GRANT_S = 3600  # a grant outlives a slow push (the device checks it when the archive is complete)
MAX_GRANT_S = 24 * 3600  # the longest validity a device accepts, counted from its own clock


class GrantError(EdgecvError):
    """A downgrade grant that is missing, malformed, or does not authorise this archive on this device."""


@dataclass(frozen=True)
class DowngradeGrant:
    target: str
    expires: int
    key_id: str
    sig: str  # base64 of the 64-byte Ed25519 signature of statement(sha256)

    def statement(self, sha256: str) -> bytes:
        return statement(sha256, self.target, self.expires)

    @classmethod
    def from_doc(cls, doc: object) -> DowngradeGrant:
        """Parse strictly (typed and bounded); raises DocumentError naming the field."""
        obj = D.need_object(doc, "downgrade_grant")
        try:
            target = check_name(D.field(obj, "target", prefix="downgrade_grant."), "downgrade_grant.target")
        except UnsafeNameError as exc:
            raise DocumentError(str(exc)) from None
        kid = D.need_str(D.field(obj, "key_id", prefix="downgrade_grant."), "downgrade_grant.key_id", 64)
        if not kid or any(c not in "0123456789abcdef" for c in kid):
            raise DocumentError("downgrade_grant.key_id must be lowercase hex digits")
        sig = D.need_str(D.field(obj, "sig", prefix="downgrade_grant."), "downgrade_grant.sig", 128)
        return cls(target=target, key_id=kid, sig=sig,
                   expires=D.need_int(D.field(obj, "expires", prefix="downgrade_grant."), "downgrade_grant.expires",
                                      0, 1 << 40))


def statement(sha256: str, target: str, expires: int) -> bytes:
    """The exact bytes a grant signs."""
    return f"{CONTEXT}\nsha256={sha256}\ntarget={target}\nexpires={expires}\n".encode()


def grant_downgrade(private_key: Ed25519PrivateKey, sha256: str, target: str, *, valid_s: float = DEFAULT_GRANT_S,
                    now: float | None = None) -> DowngradeGrant:
    """Sign a grant for installing the archive `sha256` on `target` (a device id or group name)."""
    check_name(target, "Downgrade grant target")
    expires = int((time.time() if now is None else now) + valid_s)
    sig = private_key.sign(statement(sha256, target, expires))
    return DowngradeGrant(target=target, expires=expires, key_id=key_id(private_key.public_key()),
                          sig=base64.b64encode(sig).decode())


def check_grant(grant: DowngradeGrant | None, sha256: str, names: Collection[str], keyring: Keyring | None, *,
                now: float | None = None) -> str:
    """The key id that signed a grant valid for `sha256` on a device known as any of `names` (its id and groups);
    raise GrantError saying why not."""
    if grant is None:
        raise GrantError("the request is not signed (push with --allow-downgrade --key <the signing key>)")
    if keyring is None or not len(keyring):
        raise GrantError("this device has no keyring to check a signed request against (security.keyring)")
    if grant.key_id not in keyring.key_ids():
        raise GrantError(f"the request is signed with key {grant.key_id}, which is not in the device keyring "
                         f"(trusted: {', '.join(keyring.key_ids())})")
    try:
        raw = base64.b64decode(grant.sig, validate=True)
    except ValueError:
        raise GrantError("the request's signature is not base64") from None
    try:
        keyring.public_key(grant.key_id).verify(raw, grant.statement(sha256))
    except InvalidSignature:
        raise GrantError("the request's signature does not match this archive, target and expiry (altered, or "
                         "signed for another archive)") from None
    if grant.target not in names:
        raise GrantError(f"the request is for {shown(grant.target)}, not this device or its groups")
    clock = time.time() if now is None else now
    if grant.expires < clock:
        raise GrantError(f"the request expired {clock - grant.expires:.0f} s ago (by this device's clock)")
    if grant.expires > clock + MAX_GRANT_S:
        raise GrantError(f"the request is valid for {(grant.expires - clock) / 3600:.1f} h, more than the "
                         f"{MAX_GRANT_S // 3600} h a device accepts (or this device's clock is behind)")
    return grant.key_id
