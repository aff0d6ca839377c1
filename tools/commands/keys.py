"""`edgecv keys`: create the Ed25519 signing key pair and show key ids."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from edgecv.agent.errors import KeyFileError
from edgecv.tools.commands.output import EXIT_CODES, add_json_option, print_json

DEFAULT_KEY = Path("~/.config/edgecv/signing.key")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("keys", help="create signing keys and show their ids",
                                   description="Manage the Ed25519 key that signs model bundles. " + EXIT_CODES)
    sub = parser.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    gen = sub.add_parser("generate", help="create a private key (mode 0600) and its .pub beside it",
                         description="Create an Ed25519 signing key. Copy the .pub file into each device's "
                                     "keyring (security.keyring); keep the .key private. Prints both paths and "
                                     "the key id (a JSON object with --json). Refuses to replace an existing key "
                                     "without --force (exit status 1). " + EXIT_CODES)
    gen.add_argument("--out", type=Path, default=DEFAULT_KEY,
                     help=f"private key path; the public key goes to <name>.pub (default {DEFAULT_KEY})")
    gen.add_argument("--force", action="store_true", help="overwrite an existing key pair")
    add_json_option(gen, "the paths and key id")
    gen.set_defaults(handler=generate)
    show = sub.add_parser("id", help="print the key id of a private or public key file",
                          description="Print the key id (what bundles and device logs name the signer by) of a "
                                      "private or public key file. " + EXIT_CODES)
    show.add_argument("path", type=Path)
    add_json_option(show, "the path and key id")
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
    kid = key_id(key.public_key())
    if args.json:
        print_json({"private_key": str(out), "public_key": str(pub), "key_id": kid})
    else:
        print(f"private key: {out} (keep it secret)")
        print(f"public key:  {pub} (copy into each device's keyring)")
        print(f"key id:      {kid}")
    return 0


def show_id(args: argparse.Namespace) -> int:
    from edgecv.agent.contract.signing import key_id, load_private_key, load_public_key

    path = Path(args.path).expanduser()
    text = path.read_bytes() if path.is_file() else b""
    kid = key_id(load_private_key(path).public_key()) if b"PRIVATE KEY" in text else key_id(load_public_key(path))
    if args.json:
        print_json({"path": str(path), "key_id": kid, "private": b"PRIVATE KEY" in text})
    else:
        print(kid)
    return 0
