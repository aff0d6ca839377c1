"""`edgecv bundle inspect|verify|sign`: look into, check and sign model bundles (directory or .edgecv)."""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgecv.tools.commands.output import EXIT_CODES, add_json_option, print_json, print_rows

if TYPE_CHECKING:
    from edgecv.agent.contract.bundle import Bundle


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("bundle", help="inspect, verify and sign model bundles",
                                   description="Work with model bundles: a directory or a .edgecv archive. "
                                               + EXIT_CODES)
    sub = parser.add_subparsers(dest="bundle_command", metavar="ACTION", required=True)

    inspect = sub.add_parser("inspect", help="show name, version, labels, input, artifacts, metrics, signer",
                             description="Show what a bundle holds: name, version, labels, input spec, self-test, "
                                         "signer, then a table of its artifacts (format, precision, size, sha256) "
                                         "and its recorded metrics; or everything as one JSON object with --json. "
                                         "Nothing is verified (that is 'edgecv bundle verify'). " + EXIT_CODES)
    inspect.add_argument("path", type=Path, help="bundle directory or .edgecv archive")
    add_json_option(inspect, "everything")
    inspect.set_defaults(handler=inspect_cmd)

    verify = sub.add_parser("verify", help="check every file's sha256 and the signature (exit 0 only if valid)",
                            description="Verify a bundle as a device would: sizes and sha256 of every file, "
                                        "then the Ed25519 signature against the keyring. Prints 'OK name version: "
                                        "N files match the manifest, signed by KEY' (a JSON object with --json). "
                                        "Exit status 0 when it verifies, 1 when it does not (the reason on "
                                        "stderr), 2 on a usage error.")
    verify.add_argument("path", type=Path, help="bundle directory or .edgecv archive")
    verify.add_argument("--keyring", type=Path, help="directory of trusted *.pub keys, or one .pub file")
    verify.add_argument("--allow-unsigned", action="store_true",
                        help="accept a bundle without signature (a bad signature is always refused)")
    add_json_option(verify, "the verdict")
    verify.set_defaults(handler=verify_cmd)

    sign = sub.add_parser("sign", help="sign a bundle directory or archive in place",
                          description="Sign a bundle's manifest with an Ed25519 private key (writes manifest.sig; "
                                      "an archive is re-packed). Prints the key id it was signed with. "
                                      + EXIT_CODES)
    sign.add_argument("path", type=Path, help="bundle directory or .edgecv archive (re-packed)")
    sign.add_argument("--key", type=Path, required=True, help="private key from 'edgecv keys generate'")
    add_json_option(sign, "the bundle and key id")
    sign.set_defaults(handler=sign_cmd)


@contextmanager
def opened(path: Path) -> Iterator[Bundle]:
    """The bundle at `path`; an archive is extracted to a temporary directory for the duration."""
    from edgecv.agent.contract.bundle import open_bundle

    tmp = Path(tempfile.mkdtemp(prefix="edgecv-bundle-"))
    try:
        yield open_bundle(Path(path), tmp / "bundle")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def describe(bundle: Bundle, path: Path) -> dict[str, Any]:
    m = bundle.manifest
    return {
        "path": str(path),
        "name": m.name,
        "version": m.version,
        "created": m.created,
        "description": m.description,
        "task": m.task,
        "labels": list(m.labels),
        "input": m.to_dict()["input"],
        "artifacts": [{"path": a.path, "format": a.format, "precision": a.precision, "bytes": a.bytes,
                       "sha256": a.sha256} for a in m.artifacts],
        "selftest": None if m.selftest is None else {"frames": len(m.selftest.expected_top1),
                                                     "min_agreement": m.selftest.min_agreement},
        "metrics": dict(m.metrics),
        "manifest_sha256": bundle.manifest_sha256,
        "signature_key_id": bundle.signature.key_id if bundle.signature else None,
        "archive_bytes": path.stat().st_size if path.is_file() else None,
    }


def inspect_cmd(args: argparse.Namespace) -> int:
    with opened(args.path) as bundle:
        info = describe(bundle, Path(args.path))
    if args.json:
        print_json(info)
        return 0
    inp = info["input"]
    rows = [
        ("bundle", f"{info['name']} {info['version']}"),
        ("created", info["created"]),
        ("labels", f"{len(info['labels'])}: {', '.join(info['labels'])}"),
        ("input", f"{inp['width']}×{inp['height']}×{inp['channels']} {inp['color']} {inp['layout']} "
                  f"{inp['dtype']}, scale {inp['scale']:.6g}, mean {inp['mean']}, std {inp['std']}, "
                  f"resize {inp['resize']}"),
        ("self-test", "none" if info["selftest"] is None else f"{info['selftest']['frames']} frames"),
        ("signed by", info["signature_key_id"] or "UNSIGNED"),
        ("manifest", info["manifest_sha256"][:16]),
    ]
    if info["archive_bytes"] is not None:
        rows.append(("archive", _size(info["archive_bytes"])))
    if info["description"]:
        rows.insert(1, ("description", info["description"]))
    print_rows(rows)
    print()
    print(f"{'artifact':<22} {'format':<7} {'precision':<9} {'size':>10}  sha256")
    for art in info["artifacts"]:
        print(f"{art['path']:<22} {art['format']:<7} {art['precision']:<9} {_size(art['bytes']):>10}  "
              f"{art['sha256'][:16]}")
    if info["metrics"]:
        print()
        print("metrics")
        for key, value in _flatten(info["metrics"]):
            print(f"  {key:<40} {value}")
    return 0


def verify_cmd(args: argparse.Namespace) -> int:
    from edgecv.agent.contract.bundle import verify_bundle
    from edgecv.agent.contract.signing import Keyring
    from edgecv.agent.errors import BundleError, KeyFileError

    if args.keyring is None and not args.allow_unsigned:
        raise KeyFileError("Give --keyring DIR|FILE with the trusted public keys (or --allow-unsigned to check "
                           "only the file hashes of an unsigned bundle)")
    keyring = Keyring.from_path(Path(args.keyring).expanduser()) if args.keyring is not None else None
    if keyring is not None and len(keyring) == 0:
        raise KeyFileError(f"Keyring {args.keyring} holds no *.pub keys; copy the signer's public key into it")
    try:
        with opened(args.path) as bundle:
            result = verify_bundle(bundle, keyring, allow_unsigned=args.allow_unsigned)
            m = bundle.manifest
    except BundleError as exc:
        if args.json:  # the verdict is the result: a script reads it from stdout, the reason too
            print_json({"ok": False, "path": str(args.path), "error": str(exc)})
        raise
    if args.json:
        print_json({"ok": True, "path": str(args.path), "name": m.name, "version": m.version,
                    "checked_files": result.checked_files, "signed_by": result.signed_by})
        return 0
    signer = f"signed by {result.signed_by}" if result.signed_by else "UNSIGNED (allowed by --allow-unsigned)"
    print(f"OK {m.name} {m.version}: {result.checked_files} files match the manifest, {signer}")
    return 0


def sign_cmd(args: argparse.Namespace) -> int:
    from edgecv.agent.contract.bundle import extract_archive, load_bundle, pack_bundle, sign_bundle
    from edgecv.agent.contract.signing import load_private_key

    key = load_private_key(Path(args.key).expanduser())
    path = Path(args.path)
    if path.is_dir():
        load_bundle(path)
        sig = sign_bundle(path, key)
    else:
        tmp = Path(tempfile.mkdtemp(prefix="edgecv-sign-"))
        try:
            root = extract_archive(path, tmp / "bundle")
            load_bundle(root)
            sig = sign_bundle(root, key)
            pack_bundle(root, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        print_json({"path": str(path), "key_id": sig.key_id})
    else:
        print(f"Signed {path} with key {sig.key_id}")
    return 0


def _flatten(doc: Any, prefix: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(doc, dict):
        for key in sorted(doc):
            yield from _flatten(doc[key], f"{prefix}{key}.")
    else:
        value = f"{doc:.4f}" if isinstance(doc, float) else json.dumps(doc) if isinstance(doc, list) else str(doc)
        yield prefix.rstrip("."), value


def _size(n: int) -> str:
    if n >= 1 << 20:
        return f"{n / (1 << 20):.2f} MiB"
    if n >= 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{n} B"
