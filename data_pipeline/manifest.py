"""Versioned manifests: the last file a stage writes, and the first one a reader checks.

A manifest's presence means the dataset next to it is complete. Each names its `format` and
`version`; a reader refuses a format it does not expect or a version it does not know, rather than
misreading data written by a newer release.
"""

from __future__ import annotations

import json
from typing import Any

from data_pipeline import fs

MANIFEST_NAME = "manifest.json"


class ManifestError(ValueError):
    """A missing, unreadable or incompatible manifest; the message names the file."""


def write_manifest(base: fs.Location, fmt: str, version: int, body: dict[str, Any]) -> fs.Location:
    """Write `base/manifest.json` atomically, after everything it describes."""
    loc = base.join(MANIFEST_NAME)
    doc = {"format": fmt, "version": version, **body}
    fs.write_bytes_atomic(loc, json.dumps(doc, indent=2, sort_keys=True).encode("utf-8"))
    return loc


def read_manifest(base: fs.Location, fmt: str, versions: tuple[int, ...]) -> dict[str, Any]:
    """Read and check `base/manifest.json`: it must exist, parse, and match `fmt` and `versions`."""
    loc = base.join(MANIFEST_NAME)
    if not fs.exists(loc):
        raise ManifestError(
            f"{loc.uri}: no manifest (is the dataset complete, and the path right?)"
        )
    try:
        doc = json.loads(fs.read_bytes(loc))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{loc.uri}: not valid JSON: {e}") from e
    if not isinstance(doc, dict) or doc.get("format") != fmt:
        got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise ManifestError(f"{loc.uri}: format is {got!r}, expected {fmt!r}")
    if doc.get("version") not in versions:
        raise ManifestError(
            f"{loc.uri}: {fmt} version {doc.get('version')!r} is not one this release reads "
            f"({', '.join(map(str, versions))}); upgrade ray-t2i or rebuild the dataset"
        )
    return doc
