"""The read side of the checkpoint layout (written by `trainer/checkpoint.py`): which step
directories of a run are complete, and where a run's exported weights are.

    <run>/checkpoints/step_00000100/ ... manifest.json   (written last: size + sha256 per file)

A directory without a valid manifest, or whose files do not match it, is not a checkpoint.
"""

from __future__ import annotations

import json
import re

import pyarrow.fs as pafs

from data_pipeline import fs

FORMAT = "ray-t2i/checkpoint"
VERSION = 1
STEP_RE = re.compile(r"step_(\d{8})$")


def check_complete(ckpt: fs.Location) -> tuple[dict | None, str]:
    """(manifest, "") if `ckpt` is complete (manifest valid, every file present with its size),
    else (None, why not)."""
    loc = ckpt.join("manifest.json")
    try:
        doc = json.loads(fs.read_bytes(loc))
    except FileNotFoundError:
        return None, "no manifest.json (a save that did not finish)"
    except (OSError, ValueError) as e:
        return None, f"manifest.json unreadable: {e}"
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") != VERSION:
        return None, f"manifest.json is not a {FORMAT} v{VERSION} manifest"
    infos = {
        i.path: i.size
        for i in ckpt.fs.get_file_info(pafs.FileSelector(ckpt.path, recursive=True))
        if i.type == pafs.FileType.File
    }
    for rel, meta in doc.get("files", {}).items():
        size = infos.get(f"{ckpt.path}/{rel}")
        if size is None:
            return None, f"{rel} is missing"
        if size != meta["bytes"]:
            return None, f"{rel} has {size} bytes, the manifest says {meta['bytes']}"
    return doc, ""


def read_manifest(ckpt: fs.Location) -> dict | None:
    """The manifest if `ckpt` is complete, else None."""
    return check_complete(ckpt)[0]


def list_steps(run: fs.Location) -> list[tuple[int, fs.Location]]:
    """(step, location) of every step directory of a run, complete or not, newest first."""
    base = run.join("checkpoints")
    try:
        infos = base.fs.get_file_info(pafs.FileSelector(base.path, allow_not_found=True))
    except OSError:
        return []
    found = []
    for info in infos:
        m = STEP_RE.search(info.path)
        if info.type == pafs.FileType.Directory and m:
            found.append((int(m.group(1)), base.join(info.base_name)))
    return sorted(found, key=lambda t: -t[0])


def list_complete(run: fs.Location) -> list[tuple[int, fs.Location]]:
    """(step, location) of every complete checkpoint of a run, newest first."""
    return [(step, loc) for step, loc in list_steps(run) if read_manifest(loc) is not None]


def find_exported(loc: fs.Location, *, weights: str, config: str, what: str) -> fs.Location:
    """`loc` itself when it holds `weights` + `config` (an exported checkpoint or a `t2i convert`
    output); else the newest complete checkpoint of the `t2i train` run at `loc` holding both.

    `what` names the artifact in the error ("image tokenizer", "DALL-E model").
    """
    if fs.exists(loc.join(weights)) and fs.exists(loc.join(config)):
        return loc
    for _, ckpt in list_complete(loc):
        if fs.exists(ckpt.join(weights)) and fs.exists(ckpt.join(config)):
            return ckpt
    raise FileNotFoundError(
        f"{loc.uri}: no {what} here: expected {weights} + {config} (an exported checkpoint or a "
        f"`t2i convert` output) or a `t2i train` run with a complete checkpoint holding {weights}"
    )
