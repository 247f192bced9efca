"""The run ledger inside the output: what each output was made from, its name, its history.

Layout (all internal state lives in one hidden folder of the output root)::

    OUT/.pipeline/              hidden; readers of OUT see only the images its collection
                                metadata lists (pipeline.io.collection)
        inputs/<id>.json        one record per input (id: hash of the input's real path)
        names/<name>.json       an output name, bound to one input for good (lower case)
        runs/<run id>.json      each run's own report
        locks/  staging/  old/  trash/     see batch/lock.py and io/staging.py

A **run key** is a SHA-256 over the input's fingerprint (real path, size, mtime and a
content sample), the model's SHA-256, the settings that change output pixels
(:data:`OUTPUT_FIELDS`) and the package version. Settings that only change speed
(workers, threads, scheduler, batch size, block size, device) are not part of it. An
input whose key matches the key stored in its published output is up to date.

Records are written atomically (temporary file, fsync, rename); each input has its own
file, so shards of a job array, which run disjoint inputs, never write the same file and
their ledgers merge by construction. Names are claimed by creating a file exclusively, so
two shards can never bind one name to two inputs.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline import __version__
from pipeline.backends.files import sha256_of
from pipeline.core import atomic
from pipeline.io.fingerprint import Fingerprint
from pipeline.io.sink import unique_names
from pipeline.io.staging import published_attrs, published_key

STATE_DIR = ".pipeline"
#: History entries kept per input.
HISTORY = 20
#: Run settings that change output pixels or layout. Options added later that change the
#: output (e.g. an NGFF version, class thresholds) belong here too; absent ones are skipped.
#: Class names change no pixel but the metadata written inside the image (label and
#: channel names): a published image is never rewritten in place, so they are here too.
#: The GeoJSON settings (``geojson``, ``simplify``, ``object_type``) are not: they do not
#: change the image, and a missing or other GeoJSON is made alone from the published
#: label image (``OUT/.pipeline/inputs`` records what each output has, see
#: :mod:`pipeline.batch.products`).
OUTPUT_FIELDS = (
    "tile",
    "overlap",
    "blend",
    "backend",
    "precision",
    "dtype",
    "normalize",
    "chunk",
    "pyramid_min",
    "in_channels",
    "classes",
    "series",
    "level",
    "mpp",
    "mpp_input",
    "channels",
    "skip_background",
    "mask",
    "tta",
    "ngff",
    "threshold",
    "class_names",
)


def state_dir(out: str | os.PathLike) -> Path:
    return Path(out) / STATE_DIR


def init_state_dir(out: str | os.PathLike) -> Path:
    """Create ``OUT/.pipeline`` and its folders (idempotent); returns it."""
    root = state_dir(out)
    for sub in ("inputs", "names", "runs", "locks"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    return root


def input_id(real: str) -> str:
    """A file-name safe id of an input's real path."""
    return hashlib.sha256(real.encode("utf-8", "surrogateescape")).hexdigest()[:24]


def output_settings(cfg: Any) -> dict[str, Any]:
    """The settings of ``cfg`` that change output pixels (see :data:`OUTPUT_FIELDS`);
    a mask file is represented by its content hash, not its path."""
    out = {}
    for name in OUTPUT_FIELDS:
        if not hasattr(cfg, name):
            continue
        value = getattr(cfg, name)
        if name == "mask" and value is not None:
            value = sha256_of(value)
        out[name] = list(value) if isinstance(value, tuple) else value
    return out


def run_key(
    fp: Fingerprint, model_sha256: str, settings: dict[str, Any], version: str = __version__
) -> str:
    """The run key of one input (hex SHA-256; see the module docstring)."""
    text = json.dumps(
        {"input": fp.to_dict(), "model": model_sha256, "settings": settings, "version": version},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(text.encode()).hexdigest()


class Ledger:
    """The records of one output root (load once, then update as inputs progress)."""

    def __init__(self, out: str | os.PathLike) -> None:
        self.out = Path(out)
        self.root = state_dir(out)
        self.records: dict[str, dict[str, Any]] = {}  # input id -> record
        self.claims: dict[str, dict[str, Any]] = {}  # lower-case name -> claim

    def load(self) -> Ledger:
        """(Re)read every record and name claim from disk (other shards' included)."""
        self.records = {}
        for file in sorted((self.root / "inputs").glob("*.json")):
            rec = atomic.read_json(file)
            if isinstance(rec, dict) and rec.get("input"):
                self.records[file.stem] = rec
        self.claims = {}
        for file in sorted((self.root / "names").glob("*.json")):
            claim = atomic.read_json(file)
            if isinstance(claim, dict) and claim.get("name") and claim.get("input"):
                self.claims[file.stem] = claim
        return self

    def record(self, real: str) -> dict[str, Any] | None:
        return self.records.get(input_id(real))

    # --- names -----------------------------------------------------------------------

    def bind_names(self, paths: Sequence[str | os.PathLike]) -> list[str]:
        """Output names of ``paths``: the name bound earlier, else a new one claimed for good.

        New names are told apart by folders as :func:`~pipeline.io.sink.unique_names` does;
        a name bound to another input (or an image of another input found in the output) is
        never taken: ``-2``, ``-3``... are tried instead.
        """
        reals = [os.path.realpath(p) for p in paths]
        bound = {c["input"]: c["name"] for c in self.claims.values()}
        names: list[str | None] = [bound.get(real) for real in reals]
        fresh = [i for i, n in enumerate(names) if n is None]
        for i, base in zip(fresh, unique_names([paths[i] for i in fresh])):
            names[i] = self._claim(base, reals[i])
        return [str(n) for n in names]

    def _claim(self, base: str, real: str) -> str:
        for n in range(1, 10_000):
            name = base if n == 1 else f"{base}-{n}"
            if self._foreign_image(name, real):
                continue
            claim = {"name": name, "input": real, "id": input_id(real), "at": _now()}
            path = self.root / "names" / f"{name.lower()}.json"
            if not atomic.create_json(path, claim):
                held = atomic.read_json(path) or {}
                if held.get("input") != real:
                    continue
                claim = held
            self.claims[name.lower()] = claim
            return name
        raise RuntimeError(f"no free output name for {real}")  # 10 000 clashes: a bug

    def _foreign_image(self, name: str, real: str) -> bool:
        """True if OUT holds an image ``name`` made from another input (by a run that
        predates the ledger); an image of unknown origin counts as foreign."""
        final = self.out / name
        if not final.exists():
            return False
        made_from = (published_attrs(final).get("input") or {}).get("path")
        return not made_from or os.path.realpath(made_from) != real

    # --- states ----------------------------------------------------------------------

    def start(self, real: str, path: str, name: str, key: str, run: str) -> None:
        """An input is being run with ``key`` by ``run``."""
        rec = self.records.setdefault(input_id(real), {"input": real, "history": []})
        rec.update(path=str(path), name=name, key=key, run=run, state="running", updated=_now())
        self._write(real, rec)

    def finish(
        self,
        real: str,
        result: dict[str, Any],
        run: str,
        key: str | None,
        published: bool,
        products: dict[str, Any] | None = None,
    ) -> None:
        """Record an input's outcome (``result``: its report entry); ``published``: its
        output now holds ``key``; ``products``: what it has besides its image (see
        :func:`pipeline.batch.products.products_record`)."""
        rec = self.records.setdefault(input_id(real), {"input": real, "history": []})
        rec.update(state=result.get("state"), run=run, result=result, updated=_now())
        if key is not None:
            rec["key"] = key
        if published:
            rec["output_key"] = key
        if products is not None:
            rec["products"] = products
        history = rec.setdefault("history", [])
        history.append(
            {
                "run": run,
                "at": rec["updated"],
                "state": result.get("state"),
                "reason": result.get("reason"),
                "key": (key or "")[:12],
                "seconds": result.get("seconds"),
            }
        )
        del history[:-HISTORY]
        self._write(real, rec)

    def up_to_date(self, key: str, name: str) -> bool:
        """True if ``OUT/name`` is published and made with ``key`` (whatever the record
        says: a run killed after publishing but before recording still counts)."""
        return published_key(self.out / name) == key

    def entries(self, exclude: set[str] = frozenset()) -> list[dict[str, Any]]:
        """Report entries of every recorded input whose real path is not in ``exclude``."""
        out = []
        for rec in sorted(self.records.values(), key=lambda r: r.get("path", r["input"])):
            if rec["input"] in exclude or not isinstance(rec.get("result"), dict):
                continue
            out.append(rec["result"])
        return out

    def _write(self, real: str, rec: dict[str, Any]) -> None:
        atomic.write_json(self.root / "inputs" / f"{input_id(real)}.json", rec)


def new_run_id() -> str:
    """``20250131T020000Z-1a2b3c``: sortable by start time, unique."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return f"{stamp}-{os.urandom(3).hex()}"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
