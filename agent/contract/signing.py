"""Ed25519 keys, detached manifest signatures and the device keyring.

A signature covers the exact bytes of manifest.json; the manifest binds every artifact by sha256, so
one signature protects the whole bundle. Keys are identified by `key_id`: the first 16 hex digits of
the sha256 of the raw 32-byte public key.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgecv.agent.errors import DocumentError, KeyFileError, SignatureError

SIGNATURE_ALG = "ed25519"
PUBLIC_KEY_SUFFIX = ".pub"
MAX_SIGNATURE_BYTES = 4096  # manifest.sig is ~150 bytes; anything much larger is not a signature


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


@dataclass(frozen=True)
class Signature:
    """The content of manifest.sig."""

    key_id: str
    signature: bytes
    alg: str = SIGNATURE_ALG

    def to_bytes(self) -> bytes:
        doc = {"alg": self.alg, "key_id": self.key_id, "sig": base64.b64encode(self.signature).decode()}
        return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Signature:
        """Parse manifest.sig strictly: bounded, typed (a key id of hex digits, base64 of 64 bytes)."""
        from edgecv.agent.contract import documents as D

        try:
            doc = D.need_object(D.parse(data, "manifest.sig", max_bytes=MAX_SIGNATURE_BYTES, max_depth=2),
                                "manifest.sig")
            alg = D.need_str(D.field(doc, "alg"), "alg", 32)
            if alg != SIGNATURE_ALG:
                raise SignatureError(f"Unsupported signature algorithm {alg[:32]!r}; only {SIGNATURE_ALG} is known")
            kid = D.need_str(D.field(doc, "key_id"), "key_id", 64)
            if not kid or any(c not in "0123456789abcdef" for c in kid):
                raise DocumentError("key_id must be lowercase hex digits")
            raw = base64.b64decode(D.need_str(D.field(doc, "sig"), "sig", 256), validate=True)
            sig = cls(key_id=kid, signature=raw, alg=alg)
        except (DocumentError, ValueError) as exc:
            raise SignatureError(f"manifest.sig is not a valid signature document: {exc}") from None
        if sig.alg != SIGNATURE_ALG:
            raise SignatureError(f"Unsupported signature algorithm {sig.alg!r}; only {SIGNATURE_ALG} is known")
        return sig


def generate_private_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def write_keypair(private_key: Ed25519PrivateKey, private_path: Path) -> Path:
    """Write the private key (PEM, mode 0600) and its public key beside it as `<name>.pub`; return that."""
    private_path = Path(private_path)
    private_path.parent.mkdir(parents=True, exist_ok=True)
    pem = private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    public_path = private_path.with_suffix(PUBLIC_KEY_SUFFIX)
    public_path.write_bytes(public_key_pem(private_key.public_key()))
    return public_path


def public_key_pem(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except FileNotFoundError as exc:
        raise KeyFileError(f"Private key {path} does not exist; create one with 'edgecv keys generate'") from exc
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"Private key {path} is not an unencrypted PEM Ed25519 key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"Private key {path} is not an Ed25519 key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except FileNotFoundError as exc:
        raise KeyFileError(f"Public key {path} does not exist") from exc
    except ValueError as exc:
        raise KeyFileError(f"Public key {path} is not a PEM public key: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"Public key {path} is not an Ed25519 key")
    return key


def sign(manifest_bytes: bytes, private_key: Ed25519PrivateKey) -> Signature:
    return Signature(key_id=key_id(private_key.public_key()), signature=private_key.sign(manifest_bytes))


class Keyring:
    """Trusted public keys, by key id. Loaded from a directory of `*.pub` PEM files or given keys."""

    def __init__(self, keys: list[Ed25519PublicKey] | None = None) -> None:
        self._keys: dict[str, Ed25519PublicKey] = {}
        for key in keys or []:
            self.add(key)

    @classmethod
    def from_path(cls, path: Path) -> Keyring:
        """A directory of `*.pub` files, or one `.pub` file."""
        path = Path(path)
        if path.is_file():
            return cls([load_public_key(path)])
        if not path.is_dir():
            raise KeyFileError(f"Keyring {path} does not exist; create it and copy the workstation's .pub key in")
        return cls([load_public_key(p) for p in sorted(path.glob(f"*{PUBLIC_KEY_SUFFIX}"))])

    def add(self, key: Ed25519PublicKey) -> str:
        kid = key_id(key)
        self._keys[kid] = key
        return kid

    def __len__(self) -> int:
        return len(self._keys)

    def key_ids(self) -> list[str]:
        return sorted(self._keys)

    def public_key(self, kid: str) -> Ed25519PublicKey:
        """The trusted key with this id (KeyError if there is none)."""
        return self._keys[kid]

    def verify(self, manifest_bytes: bytes, signature: Signature) -> str:
        """Return the key id that verified; raise SignatureError otherwise."""
        key = self._keys.get(signature.key_id)
        if key is None:
            raise SignatureError(
                f"Bundle is signed with key {signature.key_id}, which is not in the device keyring "
                f"(trusted: {', '.join(self.key_ids()) or 'none'})")
        try:
            key.verify(signature.signature, manifest_bytes)
        except InvalidSignature as exc:
            raise SignatureError(
                f"Signature by key {signature.key_id} does not match manifest.json: the manifest was altered "
                "or signed by another key") from exc
        return signature.key_id


def load_keyring(path: str | Path) -> Keyring | None:
    """The configured keyring (`security.keyring`: a directory of `*.pub` files or one file), or None if unset."""
    return Keyring.from_path(Path(path)) if path else None
