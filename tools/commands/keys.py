"""`edgecv keys`: create the Ed25519 signing key pair and show key ids."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from edgecv.agent.errors import KeyFileError

DEFAULT_KEY = Path("~/.config/edgecv/signing.key")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("keys", help="create signing keys and show their ids",
                                   description="Manage the Ed25519 key that signs model bundles.")
    sub = parser.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    gen = sub.add_parser("generate", help="create a private key (mode 0600) and its .pub beside it",
                         description="Create an Ed25519 signing key. Copy the .pub file into each device's "
                                     "keyring (security.keyring); keep the .key private.")
    gen.add_argument("--out", type=Path, default=DEFAULT_KEY,
                     help=f"private key path; the public key goes to <name>.pub (default {DEFAULT_KEY})")
    gen.add_argument("--force", action="store_true", help="overwrite an existing key pair")
    gen.set_defaults(handler=generate)
    show = sub.add_parser("id", help="print the key id of a private or public key file")
    show.add_argument("path", type=Path)
    show.set_defaults(handler=show_id)


def generate(args: argparse.Namespace) -> int:
    from edgecv.agent.contract.signing import PUBLIC_KEY_SUFFIX, generate_private_key, key_id, write_keypair

    out = Path(args.out).expanduser()
    pub = out.with_suffix(PUBLIC_KEY_SUFFIX)
    if out.suffix == PUBLIC_KEY_SUFFIX:
        raise KeyFileError(f"--out {out} names a public key; give the private key path, e.g. signing.key")
    existing = [p for p in (out, pub) if p.exists()]
    if existing and not args.force:
        raise KeyFileError(f"{existing[0]} already exists; pass --force to replace it (bundles signed with the "
                           "old key will no longer verify on devices that trust only the new one)")
    key = generate_private_key()
    write_keypair(key, out)
    out.chmod(0o600)  # write_keypair sets 0600 on creation only; an overwritten file keeps its old mode
    print(f"private key: {out} (keep it secret)")
    print(f"public key:  {pub} (copy into each device's keyring)")
    print(f"key id:      {key_id(key.public_key())}")
    return 0


def show_id(args: argparse.Namespace) -> int:
    from edgecv.agent.contract.signing import key_id, load_private_key, load_public_key

    path = Path(args.path).expanduser()
    text = path.read_bytes() if path.is_file() else b""
    if b"PRIVATE KEY" in text:
        print(key_id(load_private_key(path).public_key()))
    else:
        print(key_id(load_public_key(path)))
    return 0
