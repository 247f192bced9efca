"""Turn the command line's INPUT arguments into the images to run, and say what was left out.

What counts as an input:

* a **file** given on the command line is taken as given, whatever its suffix: the run
  reads it or fails it with a reason (``not-found``, ``unsupported-format``...);
* a **list file** (``*.txt``, ``*.list``) names inputs one per line; blank lines and
  lines starting with ``#`` are ignored, relative paths are resolved against the list
  file's folder, and each entry is treated like a command-line argument (a list inside a
  list is not expanded); an entry that does not exist becomes a ``failed`` result
  (``not-found``, naming the list and line); a list that cannot be read is a usage error;
* a **Zarr folder** (``zarr.json``/``.zarray``/``.zgroup`` at its root) is one input;
* any **other folder** is searched recursively, in sorted order, for files (and Zarr
  folders) whose suffix is one of ``extensions``.

While searching a folder:

* hidden folders (``.git``, ``.snapshot``...) are not searched, and hidden files that
  are not searched for (``.DS_Store``) are ignored silently; a hidden file with a searched
  suffix (``..x.tif``) is an input, except macOS metadata copies ``._x.svs``, which are
  ``skipped`` (``not-an-image``);
* other files whose suffix is not searched become ``skipped`` results with reason
  ``not-an-image`` — they are listed in the report but are not failures;
* a matching entry is passed on even when it is a dangling symbolic link, a symbolic
  link loop or unreadable: the run then fails it with that reason, since a slide that
  should be there and cannot be read is a failure;
* a folder that cannot be listed becomes a ``failed`` result (``unreadable-folder``):
  slides inside it may have been missed;
* symbolic links to folders are followed, each real folder is searched once (so link
  loops end), and the output root (``exclude``) is never searched;
* the same file reached twice (a link and its target, or a file given twice) runs
  once; the repeat becomes ``skipped`` with reason ``duplicate``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

from pipeline.core.report import InputResult
from pipeline.errors import (
    DUPLICATE,
    NOT_AN_IMAGE,
    UNREADABLE_FOLDER,
    InputError,
    NotFoundError,
    PipelineError,
    message,
)
from pipeline.io.formats import SEARCHED_SUFFIXES, is_zarr_dir
from pipeline.io.sink import sanitize_name

LIST_SUFFIXES = (".txt", ".list")


class Found(NamedTuple):
    """The result of :func:`find_inputs`.

    Attributes
    ----------
    paths
        Inputs to run, in order, each once.
    results
        Inputs decided without running, in the order met: ``skipped`` (``not-an-image``,
        ``duplicate``) or ``failed`` (``unreadable-folder``; ``not-found`` for a list
        entry), each with a message naming the path, the problem and a hint.
    """

    paths: list[str]
    results: list[InputResult]


def is_list_file(arg: str | os.PathLike) -> bool:
    """True if ``arg`` names a list of inputs (by suffix; it need not exist)."""
    return os.fspath(arg).lower().endswith(LIST_SUFFIXES) and not os.path.isdir(arg)


def find_inputs(
    args: Sequence[str | os.PathLike],
    extensions: Iterable[str] = SEARCHED_SUFFIXES,
    exclude: Iterable[str | os.PathLike] = (),
) -> Found:
    """Expand files, list files and folders into the inputs to run.

    Parameters
    ----------
    args
        Command-line INPUT arguments.
    extensions
        Suffixes a folder search picks up (case-insensitive, with the dot), e.g.
        ``RunConfig.extensions``. Files named explicitly are taken whatever their suffix.
    exclude
        Folders never searched nor taken as inputs: the output root.

    Raises
    ------
    InputError
        A list file that is missing, unreadable or not UTF-8 text.
    """
    search = _Search(tuple(e.lower() for e in extensions), exclude)
    for arg in args:
        if is_list_file(arg):
            for line, entry in read_list(arg):
                listed = f"listed in {os.fspath(arg)} line {line}"
                if not os.path.lexists(entry):
                    search.fail(
                        NotFoundError(
                            f"does not exist ({listed})",
                            where=entry,
                            hint="check the path; relative paths start at the list's folder",
                        )
                    )
                elif is_list_file(entry):
                    search.skip(
                        entry,
                        NOT_AN_IMAGE,
                        f"is a list file ({listed})",
                        "lists are not expanded inside lists; name its entries in the first one",
                    )
                else:
                    search.add(entry)
        else:
            search.add(os.fspath(arg))
    # a file left out by a search but also named explicitly runs, and is not also "skipped"
    results = [
        r
        for r in search.results
        if r.reason != NOT_AN_IMAGE or os.path.realpath(r.path) not in search.seen
    ]
    return Found(search.paths, results)


def read_list(list_file: str | os.PathLike) -> list[tuple[int, str]]:
    """``(line number, path)`` of each entry of a list file: one path a line (surrounding
    spaces ignored), ``#`` comments, relative paths resolved against the list's folder."""
    where = os.fspath(list_file)
    try:
        text = Path(where).read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise NotFoundError(
            "list file does not exist", where=where, hint="check the path"
        ) from None
    except UnicodeDecodeError as exc:
        raise InputError(
            f"list file is not UTF-8 text ({exc.reason} at byte {exc.start})",
            where=where,
            hint="a list file names one input path per line",
        ) from None
    except OSError as exc:
        raise InputError(
            f"cannot read the list file ({exc.strerror or exc})",
            where=where,
            hint="check its permissions",
        ) from None
    base = os.path.dirname(where)
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        entry = line.strip()
        if entry and not entry.startswith("#"):
            entries.append((number, os.path.join(base, os.path.expanduser(entry))))
    return entries


class _Search:
    """Accumulates inputs in order, each real file once."""

    def __init__(self, extensions: tuple[str, ...], exclude: Iterable[str | os.PathLike]):
        self.extensions = extensions
        self.paths: list[str] = []
        self.results: list[InputResult] = []
        self.seen: dict[str, str] = {}  # real path -> first path naming it
        self.searched: set[str] = {os.path.realpath(p) for p in exclude}
        self.excluded = set(self.searched)

    def add(self, path: str) -> None:
        """An explicit argument or list entry."""
        if os.path.isdir(path) and not is_zarr_dir(path):
            self.walk(path)
        else:
            self.take(path)

    def take(self, path: str) -> None:
        real = os.path.realpath(path)
        if real in self.excluded:
            self.skip(path, DUPLICATE, "is the output of this run", "not read as an input")
        elif real in self.seen:
            self.skip(path, DUPLICATE, f"is the same file as {self.seen[real]}", "it runs once")
        else:
            self.seen[real] = path
            self.paths.append(path)

    def skip(self, path: str, reason: str, problem: str, hint: str) -> None:
        """Left out by design (not a failure): ``reason`` is :data:`NOT_AN_IMAGE` or
        :data:`DUPLICATE`."""
        self.results.append(_result(path, "skipped", reason, message(problem, path, hint)))

    def fail(self, error: PipelineError) -> None:
        """An input that should be there and cannot be run."""
        self.results.append(_result(error.where or "", "failed", error.reason, error.message))

    def walk(self, folder: str) -> None:
        real = os.path.realpath(folder)
        if real in self.searched:
            return  # a link back to a folder already searched, or the output root
        self.searched.add(real)
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            self.fail(
                InputError(
                    f"cannot list the folder ({exc.strerror or exc}); slides in it were not run",
                    where=folder,
                    hint="check its permissions",
                    reason=UNREADABLE_FOLDER,
                )
            )
            return
        for entry in entries:
            path = os.path.join(folder, entry.name)
            wanted = entry.name.lower().endswith(self.extensions)
            if os.path.realpath(path) in self.excluded:
                continue
            if _is_dir(entry) and not is_zarr_dir(path):
                if not entry.name.startswith("."):
                    self.walk(path)
            elif wanted and entry.name.startswith("._"):
                self.skip(
                    path,
                    NOT_AN_IMAGE,
                    "is a macOS metadata file (AppleDouble), not a slide",
                    "it is made when copying from a Mac; it can be deleted",
                )
            elif wanted:
                self.take(path)
            elif not entry.name.startswith("."):
                suffix = os.path.splitext(entry.name)[1].lower() or "(none)"
                self.skip(
                    path,
                    NOT_AN_IMAGE,
                    f"suffix {suffix} is not searched ({', '.join(self.extensions)})",
                    "name the file itself, or add its suffix with --extensions",
                )


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows links; a dangling link or a loop is not a folder
    except OSError:
        return False


def _result(path: str, state: str, reason: str, text: str) -> InputResult:
    return InputResult(path, sanitize_name(path), state=state, reason=reason, message=text)
