"""Paths inside an output folder (OUT): relative row URIs, containment and symlink checks.

Rows record their images relative to OUT (``images/<id>/clean.png``), so an OUT can be moved or
copied and still verified; :func:`resolve` turns a recorded URI back into a readable one (older
rows that recorded absolute URIs resolve to themselves). On local disk every write first passes
:func:`check_local_target`: the target must lie under OUT's real path and no folder or file
between OUT and the target may be a symbolic link, so a pre-created ``OUT/images/<id>`` or
``OUT/pairs`` link to another folder cannot carry writes outside OUT.
"""

from __future__ import annotations

import os
import posixpath
import stat

from fundus_batch.io import storage

__all__ = [
    "IMAGES_DIR",
    "OutsideOutError",
    "absolute_out",
    "check_local_target",
    "check_out_root",
    "folder_escape",
    "image_paths",
    "is_local",
    "is_relative",
    "link_escape",
    "relative_to_out",
    "resolve",
    "stored_uri_problem",
]

LOGS_DIR = "logs"  # a Ray job's own log files (fundus_batch.jobs)
# The entries a run writes directly under OUT; none of them may be a link elsewhere.
IMAGES_DIR = "images"
TOP_LEVEL = (IMAGES_DIR, "pairs", "run.json", LOGS_DIR)


class OutsideOutError(ValueError):
    """A write or a recorded URI that would reach outside the output folder."""


def is_local(uri: str) -> bool:
    """Whether ``uri`` is on local disk (a path or a ``file://`` URL)."""
    return "://" not in uri or uri.startswith("file://")


def _local_path(uri: str) -> str:
    return uri[len("file://") :] if uri.startswith("file://") else uri


def absolute_out(out: str) -> str:
    """``out`` with a relative local path made absolute (against this process's working
    directory): Ray workers run elsewhere, and would otherwise write under their own."""
    if "://" in out:
        return out
    return os.path.abspath(os.path.expanduser(out))


def is_relative(uri: str) -> bool:
    """Whether ``uri`` is a path relative to OUT (no scheme, not absolute)."""
    return "://" not in uri and not uri.startswith(("/", "\\")) and not os.path.isabs(uri)


def relative_to_out(out: str, uri: str) -> str:
    """``uri`` (a path built with ``storage.join(out, ...)``) as a path relative to ``out``."""
    root = out.rstrip("/") + "/"
    if not uri.startswith(root):
        raise OutsideOutError(f"{storage.redact(uri)} is not inside {storage.redact(out)}")
    rel = uri[len(root) :]
    if not rel or ".." in rel.split("/") or rel.startswith("/"):
        raise OutsideOutError(f"{storage.redact(uri)} is not inside {storage.redact(out)}")
    return rel


def resolve(out: str, stored: str) -> str:
    """A recorded row URI as a readable URI: relative ones are joined onto ``out``, absolute
    ones (rows written before URIs were relative) are returned unchanged."""
    if is_relative(stored):
        return storage.join(out, stored)
    return stored


def stored_uri_problem(out: str, stored: str) -> str | None:
    """Why a recorded row URI points outside ``out``, or None when it stays inside.

    Relative URIs may not hold ``..`` segments; absolute ones (older rows) must start with
    ``out``, and on local disk their real path must lie under ``out``'s real path.
    """
    if is_relative(stored):
        if ".." in stored.replace("\\", "/").split("/"):
            return "climbs out of the output folder with '..'"
        return None
    root = out.rstrip("/") + "/"
    if is_local(out) and is_local(stored):
        real_out = os.path.realpath(_local_path(out))
        real = os.path.realpath(_local_path(stored))
        if os.path.commonpath([real_out, real]) != real_out:
            return _OUTSIDE
        return None
    if not stored.startswith(root) or ".." in stored[len(root) :].split("/"):
        return _OUTSIDE
    return None


# Only rows of fundus-batch 0.1 record absolute URIs: the likely story is a folder moved since.
_OUTSIDE = (
    "lies outside the output folder (an absolute path, as fundus-batch 0.1 recorded them: "
    "if the folder was moved since, check or use it where it was made)"
)


def folder_escape(out: str, folder: str, real_dirs: dict[str, str] | None = None) -> str | None:
    """Why the local ``folder`` (inside ``out`` by name) really lives outside ``out`` (a
    symbolic link on its way), or None. Object stores: None. ``real_dirs`` caches the real
    paths of folders between calls."""
    if not (is_local(out) and is_local(folder)):
        return None
    cache = real_dirs if real_dirs is not None else {}
    for path in (_local_path(out), _local_path(folder)):
        if path not in cache:
            cache[path] = os.path.realpath(path)
    real_out, real_folder = cache[_local_path(out)], cache[_local_path(folder)]
    if os.path.commonpath([real_out, real_folder]) != real_out:
        return f"lies outside the output folder through a symbolic link (in {real_folder})"
    return None


def link_escape(out: str, uri: str, real_dirs: dict[str, str] | None = None) -> str | None:
    """Why the local file ``uri`` (inside ``out`` by name) really lives outside ``out`` (a
    symbolic link on its way, or itself a link), or None. Object stores: None. ``real_dirs``
    caches the real paths of folders between calls."""
    if not (is_local(out) and is_local(uri)):
        return None
    path = _local_path(uri)
    escape = folder_escape(out, os.path.dirname(path), real_dirs)
    if escape is not None:
        return escape
    if os.path.islink(path):
        return f"is a symbolic link (to {os.readlink(path)})"
    return None


def check_local_target(out: str, uri: str) -> None:
    """Refuse a local write to ``uri`` unless it stays inside ``out``: no component between
    ``out`` and the target (the target included) may be a symbolic link, and the target's real
    path must lie under ``out``'s real path. A no-op for object stores (they have no links)."""
    if not (is_local(out) and is_local(uri)):
        return
    rel = relative_to_out(_local_path(out), _local_path(uri))
    base = _local_path(out).rstrip("/") or "/"
    current = base
    for part in rel.split("/"):
        current = posixpath.join(current, part)
        try:
            mode = os.lstat(current).st_mode
        except FileNotFoundError:
            break  # nothing further down exists yet, so no link can be there
        if stat.S_ISLNK(mode):
            raise OutsideOutError(
                f"refusing to write {uri}: {current} is a symbolic link inside the output folder"
            )
    real_out = os.path.realpath(base)
    real = os.path.realpath(_local_path(uri))
    if os.path.commonpath([real_out, real]) != real_out:
        raise OutsideOutError(
            f"refusing to write {uri}: its real path {real} is outside {real_out}"
        )


def check_out_root(out: str) -> None:
    """Refuse to run on a local OUT whose ``images``, ``pairs``, ``run.json`` or ``logs`` is a
    symbolic link (object stores: nothing to check)."""
    if not is_local(out):
        return
    base = _local_path(out)
    for name in TOP_LEVEL:
        path = os.path.join(base, name)
        if os.path.islink(path):
            raise OutsideOutError(
                f"{path} is a symbolic link (to {os.readlink(path)}); a run writes only into "
                "real folders inside its output folder: remove the link or choose another --out"
            )


def image_paths(
    out: str, image_id: str, variant: int | None, type_code: str | None, image_format: str
) -> dict[str, str]:
    """Deterministic output URIs of one row's images (``clean``, ``mask``, ``degraded``,
    ``enhanced``); enhance and score rows (``variant`` None or < 0) have no ``degraded``."""
    ext = "jpg" if image_format == "jpeg" else "png"
    base = storage.join(out, IMAGES_DIR, image_id)
    paths = {"clean": storage.join(base, f"clean.{ext}"), "mask": storage.join(base, "mask.png")}
    if variant is None or variant < 0:
        paths["enhanced"] = storage.join(base, f"enhanced.{ext}")
        return paths
    stem = f"v{variant:03d}" + (f"_{type_code}" if type_code else "")
    paths["degraded"] = storage.join(base, f"{stem}.{ext}")
    paths["enhanced"] = storage.join(base, f"{stem}_enhanced.{ext}")
    return paths
