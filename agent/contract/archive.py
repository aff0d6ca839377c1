"""Bundle archives read strictly: a small tar(.gz) reader for the only layout bundles use, bounded before it reads.

Python's tarfile reads a PAX or GNU long-name header's whole body into memory before anyone can look at its size
(a 1 GiB header in a 1 MB gzip took 3 GB of RSS). This reader decompresses as a stream, parses each 512-byte
header itself and checks every size against a hard limit *before* reading what follows:

- formats: plain tar or one gzip stream of it, ustar/PAX/GNU headers (what `pack_bundle`, Python's tarfile and
  GNU tar write); anything else (bz2, xz, zip, no `ustar` magic, bad header checksum) is refused;
- members: regular files and directories only; links, devices, FIFOs, sparse or contiguous files are refused;
  at most `max_members` members and `max_members * 4` header blocks;
- PAX extended headers (`x`, `g`) up to MAX_PAX_BYTES, GNU long names (`L`) up to MAX_LONGNAME_BYTES, GNU long
  link names (`K`) never; PAX `linkpath` and `GNU.sparse.*` records are refused, `path` and `size` are applied,
  other records ignored (as POSIX says);
- names: each path component must be a safe name (`names.check_name`; a leading `./` is dropped), no duplicates,
  and the total content at most `max_bytes`, counted from the headers before any data is written;
- files are created with O_EXCL|O_NOFOLLOW inside `dest` (a fresh directory), after `names.inside` checked the
  resolved path.

Any malformed input raises BundleFormatError, anything unsafe UnsafeArchiveError; `dest` is then removed.
"""

from __future__ import annotations

import os
import shutil
import zlib
from pathlib import Path
from typing import BinaryIO

from edgecv.agent.contract.names import check_name, inside, shown
from edgecv.agent.errors import BundleFormatError, UnsafeArchiveError, UnsafeNameError

BLOCK = 512
READ = 64 * 1024
MAX_PAX_BYTES = 64 * 1024
MAX_LONGNAME_BYTES = 4096
MAX_PATH_CHARS = 255
_ZERO = bytes(BLOCK)
REGULAR = (b"0", b"\x00")
DIRECTORY = b"5"
_REFUSED_TYPES = {b"1": "a hard link", b"2": "a symbolic link", b"3": "a character device", b"4": "a block device",
                  b"6": "a FIFO", b"7": "a contiguous file", b"S": "a sparse file", b"K": "a GNU long link name",
                  b"V": "a volume header", b"M": "a multi-volume continuation", b"D": "a GNU dump directory"}


class _Stream:
    """Decompressed archive bytes, read in bounded pieces (never more than READ bytes decompressed at once)."""

    def __init__(self, fh: BinaryIO, gzip: bool, limit: int) -> None:
        self.fh = fh
        self.z = zlib.decompressobj(16 + zlib.MAX_WBITS) if gzip else None
        self.buf = bytearray()
        self.total = 0
        self.limit = limit
        self.ended = False

    def _fill(self, want: int) -> None:
        while len(self.buf) < want and not self.ended:
            if self.z is None:
                out = self.fh.read(READ)
                if not out:
                    self.ended = True
            else:
                if self.z.eof:
                    self.ended = True
                    break
                src = self.z.unconsumed_tail or self.fh.read(READ)
                if not src:
                    raise BundleFormatError("Bundle archive is truncated or corrupt: the gzip stream ends early")
                try:
                    out = self.z.decompress(src, READ)
                except zlib.error as exc:
                    raise BundleFormatError(f"Bundle archive is truncated or corrupt: gzip error ({exc})") from None
            self.total += len(out)
            if self.total > self.limit:
                raise UnsafeArchiveError(f"Bundle archive decompresses to more than {self.limit} bytes")
            self.buf += out

    def read_exact(self, n: int, what: str) -> bytes:
        self._fill(n)
        if len(self.buf) < n:
            raise BundleFormatError(f"Bundle archive is truncated or corrupt: it ends inside {what}")
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    def copy(self, n: int, fd: int | None, what: str) -> None:
        """Move the next `n` bytes to the file descriptor `fd` (None: drop them), READ bytes at a time."""
        left = n
        while left:
            self._fill(min(left, READ))
            if not self.buf:
                raise BundleFormatError(f"Bundle archive is truncated or corrupt: it ends inside {what}")
            piece = min(left, len(self.buf))
            if fd is not None:
                view = memoryview(self.buf)[:piece]
                try:
                    written = 0
                    while written < piece:
                        written += os.write(fd, view[written:])
                finally:
                    view.release()
            del self.buf[:piece]
            left -= piece

    def drain(self) -> None:
        """Read to the end of the stream (the tar padding after the end marker), so gzip checks its CRC and
        length trailer: a corrupt archive is refused even where the corruption is past the last member."""
        while not self.ended:
            self._fill(len(self.buf) + READ)
            self.buf.clear()

    def skip(self, n: int, what: str) -> None:
        self.copy(n, None, what)


def extract(archive: Path, dest: Path, *, max_bytes: int, max_members: int = 64) -> Path:
    """Extract a bundle archive into `dest` (which must not exist yet) and return it; see the module docstring."""
    archive, dest = Path(archive), Path(dest)
    try:
        fh = open(archive, "rb")
    except OSError as exc:
        raise BundleFormatError(f"{archive} is not a readable bundle archive: {exc.strerror or exc}") from exc
    with fh:
        magic = fh.read(6)
        fh.seek(0)
        gzip = magic[:2] == b"\x1f\x8b"
        if not gzip and (magic[:3] == b"BZh" or magic == b"\xfd7zXZ\x00" or magic[:4] == b"PK\x03\x04"):
            raise BundleFormatError(f"{archive.name} is compressed in a format bundles do not use; a bundle archive "
                                    "is a gzip-compressed tar (edgecv bundle / pack_bundle writes one)")
        overhead = max_members * 4 * (BLOCK + MAX_PAX_BYTES) + 2 * BLOCK
        stream = _Stream(fh, gzip, limit=max_bytes + overhead + max_members * BLOCK)
        dest.mkdir(parents=True, exist_ok=False)
        try:
            _extract_members(stream, dest, max_bytes=max_bytes, max_members=max_members)
        except (FileExistsError, IsADirectoryError, NotADirectoryError) as exc:
            shutil.rmtree(dest, ignore_errors=True)
            raise UnsafeArchiveError(f"Bundle archive entries collide: {shown(exc.filename)} is both a file and a "
                                     "directory, or appears twice") from None
        except BaseException:
            shutil.rmtree(dest, ignore_errors=True)
            raise
    return dest


def _extract_members(stream: _Stream, dest: Path, *, max_bytes: int, max_members: int) -> None:
    pax: dict[str, str] = {}
    longname: str | None = None
    headers = members = total = 0
    seen: set[str] = set()
    while True:
        header = stream.read_exact(BLOCK, "a header")
        if header == _ZERO:
            if pax or longname is not None:
                raise BundleFormatError("Bundle archive ends after an extended header without its member")
            if members == 0:
                raise BundleFormatError("Bundle archive is empty")
            stream.drain()  # end-of-archive marker: what follows is padding, then the gzip trailer
            return
        headers += 1
        if headers > max_members * 4:
            raise UnsafeArchiveError(f"Bundle archive has more than {max_members * 4} headers")
        _check_header(header)
        kind = header[156:157]
        size = _number(header[124:136], "size")
        if kind in (b"x", b"g"):
            if size > MAX_PAX_BYTES:
                raise UnsafeArchiveError(f"Bundle archive has a PAX header of {size} bytes; the limit is "
                                         f"{MAX_PAX_BYTES}")
            records = _pax_records(stream.read_exact(_padded(size), "a PAX header")[:size])
            if kind == b"x":
                pax = records
            continue
        if kind == b"L":
            if size > MAX_LONGNAME_BYTES:
                raise UnsafeArchiveError(f"Bundle archive has a GNU long name of {size} bytes; the limit is "
                                         f"{MAX_LONGNAME_BYTES}")
            longname = _text(stream.read_exact(_padded(size), "a GNU long name")[:size].rstrip(b"\x00"), "name")
            continue
        if kind in _REFUSED_TYPES:
            raise UnsafeArchiveError(f"Bundle archive entry {_raw_name(header)} is {_REFUSED_TYPES[kind]}; only "
                                     "regular files and directories are allowed")
        if kind not in REGULAR and kind != DIRECTORY:
            raise UnsafeArchiveError(f"Bundle archive entry {_raw_name(header)} has the unknown type "
                                     f"{shown(kind.decode('latin-1'))}")
        if "path" in pax:
            name = pax["path"]
        elif longname is not None:
            name = longname
        else:
            name = _text(header[0:100].split(b"\x00", 1)[0], "name")
            prefix = _text(header[345:500].split(b"\x00", 1)[0], "name") if header[257:263] == b"ustar\x00" else ""
            if prefix:
                name = f"{prefix}/{name}"
        if "size" in pax:
            if not pax["size"].isdigit() or len(pax["size"]) > 18:
                raise BundleFormatError(f"Bundle archive PAX size {shown(pax['size'])} is not a number")
            size = int(pax["size"])
        pax, longname = {}, None
        parts = _safe_parts(name)
        if kind == DIRECTORY:
            if size:
                raise BundleFormatError(f"Bundle archive directory {shown(name)} has content")
            if parts:
                inside(dest, dest.joinpath(*parts)).mkdir(parents=True, exist_ok=True)
            continue
        members += 1
        if members > max_members:
            raise UnsafeArchiveError(f"Bundle archive has more than {max_members} entries")
        rel = "/".join(parts)
        if not parts:
            raise UnsafeArchiveError(f"Bundle archive entry {shown(name)} has no file name")
        if rel in seen:
            raise UnsafeArchiveError(f"Bundle archive holds {shown(rel)} twice")
        seen.add(rel)
        total += size
        if total > max_bytes:
            raise UnsafeArchiveError(f"Bundle archive content exceeds the limit of {max_bytes} bytes")
        target = dest.joinpath(*parts)
        if len(parts) > 1:
            inside(dest, target.parent).mkdir(parents=True, exist_ok=True)
        inside(dest, target)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        try:
            stream.copy(size, fd, f"entry {shown(rel)}")
        finally:
            os.close(fd)
        stream.skip(_padded(size) - size, f"entry {shown(rel)}")


def _check_header(header: bytes) -> None:
    if header[257:262] != b"ustar":
        raise BundleFormatError("Bundle archive is not a tar archive (no ustar header); build it with "
                                "'edgecv bundle' or pack_bundle")
    stored = _number(header[148:156], "checksum")
    body = header[:148] + b" " * 8 + header[156:]
    unsigned = sum(body)
    signed = unsigned - 256 * sum(1 for b in body if b > 127)
    if stored not in (unsigned, signed):
        raise BundleFormatError("Bundle archive is truncated or corrupt: a header has a wrong checksum")


def _number(field: bytes, what: str) -> int:
    """An octal header field (NUL/space padded). Base-256 sizes (over 8 GiB) are refused outright."""
    if field[:1] and field[0] & 0x80:
        raise UnsafeArchiveError(f"Bundle archive header {what} uses base-256 (a member over 8 GiB)")
    text = field.replace(b"\x00", b" ").strip()
    if not text:
        return 0
    if any(c not in b"01234567" for c in text):
        raise BundleFormatError(f"Bundle archive header {what} is not an octal number (corrupt)")
    return int(text, 8)


def _padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


def _text(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UnsafeArchiveError(f"Bundle archive has a {what} that is not UTF-8") from None


def _raw_name(header: bytes) -> str:
    return shown(header[0:100].split(b"\x00", 1)[0].decode("utf-8", "replace"))


def _pax_records(data: bytes) -> dict[str, str]:
    """'<len> <key>=<value>\\n' records, strictly (each length counts its own digits, space and newline)."""
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos, pos + 20)
        digits = data[pos:space] if space != -1 else b""
        if not digits.isdigit():
            if not data[pos:].strip(b"\x00"):
                break  # NUL padding after the last record
            raise BundleFormatError("Bundle archive has a malformed PAX record")
        length = int(digits)
        record = data[space + 1:pos + length]
        if length <= len(digits) + 1 or pos + length > len(data) or not record.endswith(b"\n") \
                or b"=" not in record:
            raise BundleFormatError("Bundle archive has a malformed PAX record")
        key, _, value = record[:-1].partition(b"=")
        name = _text(key, "PAX record key")
        if name == "linkpath" or name.startswith("GNU.sparse"):
            raise UnsafeArchiveError(f"Bundle archive has a PAX {name} record (links and sparse files are refused)")
        if name in ("path", "size"):
            records[name] = _text(value, f"PAX {name}")
        pos += length
    return records


def _safe_parts(name: str) -> list[str]:
    """The components of a member name, each a safe name; a leading './' (GNU tar) and a trailing '/' dropped."""
    if len(name) > MAX_PATH_CHARS:
        raise UnsafeArchiveError(f"Bundle archive entry name is {len(name)} characters; the limit is "
                                 f"{MAX_PATH_CHARS}")
    if name.startswith("/") or "\\" in name:
        raise UnsafeArchiveError(f"Bundle archive entry {shown(name)} would escape the bundle")
    parts = name.rstrip("/").split("/")
    if parts and parts[0] == ".":
        parts = parts[1:]
    try:
        return [check_name(p, "Bundle archive entry name part") for p in parts] if parts != [""] else []
    except UnsafeNameError:
        raise UnsafeArchiveError(f"Bundle archive entry {shown(name)} would escape the bundle or has an unsafe "
                                 "name (only letters, digits, '.', '_' and '-' in each part)") from None
