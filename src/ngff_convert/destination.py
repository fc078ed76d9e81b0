"""Where a conversion writes, and when the result takes the target's name.

A local store is written into a sibling folder, ``<target>.incomplete``, and renamed to
the target only once complete: an interrupted or failed conversion never leaves a
half-written store under the target's name, and a failed ``--overwrite`` leaves the old
store as it was. ``--resume`` finishes the sibling. Object stores (``s3://``...) have no
rename: there the store is written in place, marked incomplete until its last write.

``--overwrite`` replaces only what :mod:`ngff_convert.ownership` proves to be the
converter's own output.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zarr

from . import ConvertError
from .ownership import check_replaceable
from .store import PROGRESS_KEY, Output, open_output

#: the sibling a local store is written into until it is complete
WORK_SUFFIX = ".incomplete"


@dataclass
class Destination:
    final: Output  # where the finished store lives
    work: Output  # where it is written: ``final`` itself for object stores
    resuming: bool = False
    state: dict[str, Any] | None = None  # the interrupted run's record, when resuming
    protected: tuple[Path, ...] = ()  # files that must survive (the input slide)

    @property
    def in_place(self) -> bool:
        return self.work is self.final


def progress_state(out: Output) -> dict[str, Any] | None:
    """The converter's record in a store's attributes (None: not a converted image)."""
    try:
        group = zarr.open_group(out.store, mode="r")
    except Exception:  # noqa: BLE001 - not a zarr group
        return None
    state = group.attrs.get(PROGRESS_KEY)
    return state if isinstance(state, dict) else None


def work_sibling(final: Output) -> Output | None:
    """The local sibling a store is written into (None for object stores)."""
    if final.local is None:
        return None
    path = final.local.absolute()
    if not path.name or path.name in (".", ".."):
        raise ConvertError(f"{final.url}: name a store folder to write (e.g. out.zarr)")
    return open_output(str(path.with_name(path.name + WORK_SUFFIX)))


def _remove_own(out: Output, protected: Iterable[Path]) -> None:
    """Delete ``out`` after proving it is the converter's own output."""
    if out.local is not None and out.local.is_dir() and not any(out.local.iterdir()):
        out.local.rmdir()  # an empty folder holds nothing to lose
        return
    check_replaceable(out.url, progress_state(out), out.all_keys(), out.local, protected,
                      out.is_bucket_root())
    out.remove()


def prepare(final: Output, overwrite: bool, resume: bool, protected: Iterable[Path],
            log: Callable[[str], None]) -> Destination | None:
    """Decide where to write; None when ``--resume`` finds the store already complete.
    Refusals are one-line :class:`ConvertError`\\ s raised before anything is touched."""
    protected = list(protected)
    work = work_sibling(final)
    final_state = progress_state(final) if final.exists() else None
    work_state = progress_state(work) if work is not None and work.exists() else None
    if resume:
        if work_state is not None and final.exists():
            # an interrupted --overwrite: its store will replace the target
            check_replaceable(final.url, final_state, final.all_keys(), final.local,
                              protected, final.is_bucket_root())
        if work_state is not None and work_state.get("complete"):
            # killed between the last write and the rename
            publish(Destination(final, work, protected=tuple(protected)))
            log(f"{final.url}: complete; nothing else to do")
            return None
        if work_state is not None:
            log(f"resuming the interrupted conversion in {work.url}")
            work.discard_partial_writes()
            return Destination(final, work, True, work_state, tuple(protected))
        if final.exists():
            if final_state is None:
                raise ConvertError(f"{final.url}: exists but was not written by ngff-convert; "
                                   "cannot --resume it")
            if final_state.get("complete"):
                log(f"{final.url}: already complete, nothing to do")
                return None
            log(f"resuming the interrupted conversion in {final.url}")
            final.discard_partial_writes()
            return Destination(final, final, True, final_state, tuple(protected))
        log(f"{final.url}: no interrupted conversion to resume; converting from the start")
    elif overwrite:
        # prove both are ours before touching either
        if final.exists():
            check_replaceable(final.url, final_state, final.all_keys(), final.local,
                              protected, final.is_bucket_root())
        if work is not None and work.exists():
            _remove_own(work, protected)
        if final.local is None and final.exists():
            final.remove()  # no rename on object stores: replaced in place
    else:
        if work is not None and work.exists():
            if work_state is None:
                raise ConvertError(f"{work.url}: exists and was not written by ngff-convert; "
                                   f"move it away to write {final.url}")
            raise ConvertError(f"{final.url}: an interrupted conversion is in {work.url} "
                               "(use --resume to finish it, or --overwrite to start over)")
        if final.exists():
            if final_state is None:
                raise ConvertError(f"{final.url}: already exists and was not written by "
                                   "ngff-convert; choose another output")
            raise ConvertError(f"{final.url}: already exists (use --overwrite to replace it"
                               + (", or --resume to finish it)"
                                  if not final_state.get("complete") else ")"))
    return Destination(final, work if work is not None else final,
                       protected=tuple(protected))


def publish(dest: Destination) -> None:
    """Give the complete store the target's name (local paths; a replaced store of ours
    is deleted only after the new one is in place)."""
    if dest.in_place:
        return
    final, work = dest.final.local, dest.work.local
    assert final is not None and work is not None
    old = None
    if final.exists() and (not final.is_dir() or any(final.iterdir())):
        # proven ours when the conversion started; proven again now, in case anything
        # else was put there meanwhile (the new store then waits in its sibling)
        check_replaceable(dest.final.url, progress_state(dest.final), dest.final.all_keys(),
                          final, dest.protected)
        old = final.with_name(f"{final.name}.replaced-{os.getpid()}")
        os.replace(final, old)
    os.replace(work, final)
    if old is not None:
        shutil.rmtree(old)


def discard_if_empty(dest: Destination) -> bool:
    """Remove the work folder a conversion made when it holds nothing (it failed or was
    interrupted before writing); whether nothing was written."""
    work = dest.work
    if work.exists() and progress_state(work) is not None:
        return False
    if not dest.in_place and work.local is not None and work.local.is_dir() \
            and not any(work.local.iterdir()):
        work.local.rmdir()
    return True


def interrupted_message(dest: Destination | None) -> str:
    """What an interrupted conversion left, truthfully, and what to do next (an empty
    work folder it made is removed)."""
    nothing = "interrupted before anything was written; nothing to resume"
    if dest is None or discard_if_empty(dest):
        return nothing
    work = dest.work
    where = "" if dest.in_place else f" (in {work.url})"
    return (f"interrupted; {dest.final.url} is incomplete{where}: re-run the same command "
            "with --resume to finish it, keeping the chosen quality and every block "
            "already written")
