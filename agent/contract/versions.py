"""Ordering bundle versions for anti-rollback: semantic versioning and PEP 440, without extra dependencies.

`version_key("1.2.0rc1")` gives a sort key; `compare(a, b)` gives -1, 0 or 1, or None when either string is not a
version this module can order. Both common spellings compare as one would expect and with each other:

    1.0.dev1 < 1.0a1 == 1.0.0-alpha.1 < 1.0b2 == 1.0.0-beta.2 < 1.0rc1 == 1.0.0-rc.1 < 1.0 == 1.0.0 == v1.0
             < 1.0.post1 < 1.0.1 < 1.10

Release numbers compare numerically with trailing zeros ignored. Pre-releases sort before their release:
semver identifiers by semver's rules (numeric < alphanumeric, numbers numerically, a longer list after its
prefix), PEP 440 `a`/`alpha`, `b`/`beta`, `c`/`rc`/`pre`/`preview` as semver's `alpha`, `beta`, `rc`. PEP 440
post-releases (`.postN`, `-N` after a pre-release-free release is read as semver pre-release, as semver says) and
dev releases (`.devN`) are supported. Build metadata (`+...`) cannot occur: versions are safe names.
"""

from __future__ import annotations

import re

_RELEASE = re.compile(r"[vV]?(\d{1,18}(?:\.\d{1,18}){0,15})(.*)")
_PEP_PRE = re.compile(r"[-_.]?(a|alpha|b|beta|c|rc|pre|preview)[-_.]?(\d{0,18})", re.IGNORECASE)
_PEP_POST = re.compile(r"[-_.]?(post|rev|r)[-_.]?(\d{0,18})", re.IGNORECASE)
_PEP_DEV = re.compile(r"[-_.]?dev[-_.]?(\d{0,18})", re.IGNORECASE)
_SEMVER_PRE = re.compile(r"-([0-9A-Za-z-]{1,64}(?:\.[0-9A-Za-z-]{1,64}){0,15})")
_PRE_WORD = {"a": "alpha", "alpha": "alpha", "b": "beta", "beta": "beta", "c": "rc", "rc": "rc", "pre": "rc",
             "preview": "rc"}
_NONE = 1 << 62  # "absent" for dev (after every dev number)

Key = tuple[tuple[int, ...], tuple[object, ...], int, int]


def version_key(text: str) -> Key | None:
    """A sort key for a semver or PEP 440 version, or None when `text` is neither."""
    m = _RELEASE.fullmatch(text)
    if m is None:
        return None
    release = tuple(int(x) for x in m.group(1).split("."))
    while len(release) > 1 and release[-1] == 0:
        release = release[:-1]
    rest = m.group(2)
    pre: tuple[object, ...] | None = None
    post, dev = -1, _NONE
    if rest:
        pep = _pep_suffix(rest)
        if pep is not None:
            pre, post, dev = pep
        else:
            sm = _SEMVER_PRE.fullmatch(rest)
            if sm is None:
                return None
            pre = _semver_ids(sm.group(1).split("."))
    if pre is None:
        # a final release sorts after its pre-releases; a dev release of it (1.0.dev1) before them
        pre_key: tuple[object, ...] = (-1,) if dev != _NONE and post == -1 else (1,)
    else:
        pre_key = (0, *pre)
    return (release, pre_key, post, dev)


def compare(a: str, b: str) -> int | None:
    """-1, 0 or 1 as `a` is older than, the same version as, or newer than `b`; None if either is unorderable."""
    if a == b:
        return 0
    ka, kb = version_key(a), version_key(b)
    if ka is None or kb is None:
        return None
    return (ka > kb) - (ka < kb)


def _pep_suffix(rest: str) -> tuple[tuple[object, ...] | None, int, int] | None:
    """(pre ids, post, dev) of a PEP 440 suffix such as 'rc1', 'a2.post1', '.post3', '.dev4'; None otherwise."""
    pos = 0
    pre: tuple[object, ...] | None = None
    post, dev = -1, _NONE
    m = _PEP_PRE.match(rest, pos)
    if m and (m.group(2) or m.end() == len(rest) or not rest[m.end()].isalnum()):
        pre = ((1, _PRE_WORD[m.group(1).lower()]), (0, int(m.group(2) or 0)))
        pos = m.end()
    m = _PEP_POST.match(rest, pos)
    if m:
        post, pos = int(m.group(2) or 0), m.end()
    m = _PEP_DEV.match(rest, pos)
    if m:
        dev, pos = int(m.group(1) or 0), m.end()
    if pos != len(rest) or pos == 0:
        return None
    return pre, post, dev


def _semver_ids(ids: list[str]) -> tuple[object, ...]:
    """Semver pre-release identifiers as comparable pairs: numbers (0, n) before words (1, text)."""
    out: list[tuple[int, object]] = []
    for ident in ids:
        if ident.isdigit():
            out.append((0, int(ident)))
        else:
            word = ident.lower()
            out.append((1, _PRE_WORD.get(word, word)))
    return tuple(out)
