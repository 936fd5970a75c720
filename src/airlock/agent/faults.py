"""Fault injection for the demo and the tests: an agent that misbehaves in one well-defined way.

`--misbehave MODE` (hidden from --help) selects one of these; each is a small subclass of `Behaviour`,
whose hooks the task runner calls at fixed points. The honest agent is `Behaviour()` itself.

* vanish  — start the first task's payload, then abandon it: no heartbeat is ever sent for it, no output
            uploaded, no report; the agent kills the payload after `VANISH_AFTER_S` and exits with code 0
            (abandoning any other task it holds). The server only learns of it when the lease expires.
* corrupt — after the payload, flip bytes in each output file but declare the ORIGINAL checksums in the
            `Digest` header: the data bridge must refuse the upload (422). The agent then reports anyway,
            listing the outputs with their original checksums.
* tamper  — change each output consistently and declare the new checksums, so the upload succeeds and only
            replication (a quorum of copies) can catch it. A `.root` output is rewritten with uproot with
            its first floating-point branch scaled by (1 + 1e-3), so it stays a readable ROOT file (and
            passes the app's sanity checks); any other file gets a line appended.
* fail    — run the payload, then report exit code 3 whatever it returned (outputs still uploaded).
* extra   — after the declared outputs, also upload an undeclared `extra.bin` next to them: the bridge
            must refuse it (403); the agent logs that and carries on normally.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from airlock.core.checksums import Digest, digest_file

log = logging.getLogger(__name__)

MODES: tuple[str, ...] = ("vanish", "corrupt", "tamper", "fail", "extra")
VANISH_AFTER_S = 2.0
EXTRA_NAME = "extra.bin"
TAMPER_SCALE = 1.0 + 1e-3


class Behaviour:
    """The honest agent. Subclasses override one hook each."""

    name: str | None = None
    vanish_after_s: float | None = None  # abandon the task this long after starting its payload
    report_refused_outputs = False  # list outputs the bridge refused in the report anyway

    def exit_code(self, code: int) -> int:
        """The exit code to report for a payload that exited with `code`."""
        return code

    def prepare_output(self, path: Path, digest: Digest) -> Digest:
        """Called after the payload for each declared output, before upload, with its real digest;
        returns the digest to declare in the `Digest` header and the report."""
        return digest

    def extra_uploads(self, task_dir: Path) -> list[tuple[str, Path]]:
        """Undeclared files to upload after the declared outputs: (name, path)."""
        return []


class Vanish(Behaviour):
    name = "vanish"
    vanish_after_s = VANISH_AFTER_S


class Corrupt(Behaviour):
    name = "corrupt"
    report_refused_outputs = True

    def prepare_output(self, path: Path, digest: Digest) -> Digest:
        flip_bytes(path)
        log.warning("misbehave=corrupt: flipped bytes in %s, declaring its original checksums", path.name)
        return digest


class Tamper(Behaviour):
    name = "tamper"

    def prepare_output(self, path: Path, digest: Digest) -> Digest:
        tamper_file(path)
        new = digest_file(path)
        log.warning("misbehave=tamper: altered %s consistently (sha256 %s)", path.name, new.sha256[:12])
        return new


class Fail(Behaviour):
    name = "fail"

    def exit_code(self, code: int) -> int:
        log.warning("misbehave=fail: reporting exit code 3 instead of %d", code)
        return 3


class Extra(Behaviour):
    name = "extra"

    def extra_uploads(self, task_dir: Path) -> list[tuple[str, Path]]:
        path = task_dir.parent / f"{task_dir.name}.{EXTRA_NAME}"
        path.write_bytes(b"not a declared output\n" * 64)
        return [(EXTRA_NAME, path)]


_BY_NAME: dict[str, type[Behaviour]] = {
    cls.name: cls for cls in (Vanish, Corrupt, Tamper, Fail, Extra) if cls.name is not None
}


def behaviour(mode: str | None) -> Behaviour:
    """The Behaviour for a `--misbehave` value (None: honest)."""
    if mode is None:
        return Behaviour()
    try:
        return _BY_NAME[mode]()
    except KeyError:
        raise ValueError(f"unknown misbehave mode {mode!r}; choose from {', '.join(MODES)}") from None


def flip_bytes(path: Path) -> None:
    """Invert a few bytes in the middle of a file (an empty file gets one byte)."""
    data = bytearray(path.read_bytes())
    if not data:
        path.write_bytes(b"\xff")
        return
    mid = len(data) // 2
    for i in range(mid, min(mid + 8, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def tamper_file(path: Path) -> None:
    """Change a file's content plausibly: ROOT files stay readable ROOT files."""
    if path.suffix == ".root":
        try:
            tamper_root(path)
            return
        except Exception as exc:  # a ROOT file uproot cannot rewrite: fall back to appending
            log.warning("misbehave=tamper: cannot rewrite %s with uproot (%s); appending", path.name, exc)
    with path.open("ab") as fh:
        fh.write(b"\n# tampered by a misbehaving agent\n")


def tamper_root(path: Path) -> None:
    """Rewrite a ROOT file's trees (TTree or RNTuple, flat numeric columns) and 1-D histograms, scaling
    the first floating-point column of the tree with the most entries by TAMPER_SCALE. Each tree keeps
    its kind, so the file reads back the way the honest one does."""
    import numpy as np
    import uproot

    trees: dict[str, tuple[str, dict[str, Any]]] = {}
    hists: dict[str, Any] = {}
    with uproot.open(path) as f:
        for key, classname in f.classnames(recursive=False).items():
            name = key.split(";")[0]
            if name in trees or name in hists:
                continue  # an older cycle
            if classname in ("TTree", "ROOT::RNTuple"):
                columns = f[key].arrays(library="np")
                trees[name] = (classname, {k: np.asarray(v) for k, v in columns.items()})
            elif classname.startswith("TH1"):
                hists[name] = f[key].to_numpy()
    if not trees:
        raise ValueError("no tree to alter")
    target = max(trees, key=lambda t: max((len(a) for a in trees[t][1].values()), default=0))
    columns = trees[target][1]
    branch = next((b for b, a in columns.items() if a.dtype.kind == "f" and a.size), None)
    if branch is None:
        raise ValueError("no floating-point column to alter")
    columns[branch] = columns[branch] * TAMPER_SCALE
    tmp = path.with_name(path.name + ".tamper")
    with uproot.recreate(tmp) as out:
        for name, (classname, cols) in trees.items():
            if classname == "TTree":
                out.mktree(name, {k: v.dtype for k, v in cols.items()}).extend(cols)
            else:
                out[name] = cols
        for name, hist in hists.items():
            out[name] = hist
    tmp.replace(path)
