"""Model registry: exported models kept as numbered versions, with aliases and a history.

Layout under the root (a local folder, a file:// URI or any pyarrow filesystem URI):

    <root>/<model>/v0001/                 the export as it was: weights, tokenizer, shoprank.json;
                                          for a retriever its index/, blend.json, signals/ and
                                          rerank.json (its stage one and stage two, as served)
    <root>/<model>/v0001/registry.json    metadata and the sha256 of every file; written last, so
                                          a version folder without it is ignored
    <root>/<model>/aliases.json           {"production": 3, "candidate": 4}
    <root>/<model>/history.jsonl          one event a line: register, promote, refuse, rollback,
                                          alias, each with its time and reason
    <root>/<model>/.lock                  local roots: serialises numbering and alias updates
    <root>/<model>/.leases/<id>.json      object stores: the same, as a lease (see below)

Concurrency. On a local filesystem a version is copied into a hidden `.staging-*` folder, then
numbered and renamed into place while holding an fcntl lock on `.lock`: concurrent writers get
distinct numbers and a reader never sees half a version. Aliases and history change under the
same lock, and aliases.json is replaced atomically. Object stores (s3://, gs://) have neither
rename nor locks: files are written straight into the version folder and registry.json last, so
a half-written version stays invisible; numbering, aliases and history are serialised by a
lease: a writer puts its own object under `.leases/`, then lists the folder, and goes on only if
no other live lease is there (else the oldest contender keeps its lease and waits, the others
take theirs back and put them up again only once no live lease is left, so nobody starves). Two
writers cannot both go on: the later of the two listings sees the other's lease (S3 and GCS list
what was written before). A lease is renewed while held and expires `LEASE_S` after a writer
dies; a writer that waits longer than `lock_wait_s` gets a RegistryError naming the holder.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import posixpath
import random
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pyarrow.fs as pafs

from shoprank.console import log
from shoprank.data.read import resolve

MANIFEST = "registry.json"
ALIASES = "aliases.json"
LEASES = ".leases"
LEASE_S = 120.0  # a dead writer's lease blocks the others this long at most
HISTORY = "history.jsonl"
PRODUCTION = "production"
LATEST = "latest"  # not an alias: always the newest complete version
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_CHUNK = 1 << 24
# Copied from the export's shoprank.json into registry.json (the file itself is kept as well).
_EXPORT_KEYS = ("kind", "base_model", "metrics", "config", "data", "code")


class RegistryError(ValueError):
    """A request the registry cannot satisfy; the message says what to change."""


@dataclass(frozen=True)
class Version:
    """One complete version: where its files are and what registry.json says about it."""

    name: str
    version: int
    uri: str  # the version folder: a local path, or a URI on an object store
    metadata: dict = field(repr=False, compare=False)

    @property
    def metrics(self) -> dict:
        return self.metadata.get("metrics") or {}


@dataclass(frozen=True)
class Decision:
    """What promote decided and why; refusals are decisions too, not errors."""

    promoted: bool
    reason: str
    metric: str
    mode: str
    margin: float
    candidate: int
    candidate_value: float
    production: int | None
    production_value: float | None


class Registry:
    def __init__(
        self, root: str, filesystem: pafs.FileSystem | None = None, lock_wait_s: float = 300.0
    ):
        """`filesystem` is for one built by hand (credentials, endpoint); `root` is then a path
        inside it. `lock_wait_s`: how long a writer waits for another one (object stores)."""
        self.root, self.lock_wait_s = root, lock_wait_s
        if filesystem is None:
            self.fs, base = resolve(root)
            self._scheme = None if "://" not in root else root.split("://")[0]
        else:
            self.fs, base, self._scheme = filesystem, root, None
        self.base = base.rstrip("/")
        self.local = isinstance(self.fs, pafs.LocalFileSystem)
        if self.local:
            self._scheme = None  # file:// versions are plain paths, which loaders take

    # -- reading -------------------------------------------------------------------------------

    def models(self) -> list[str]:
        return sorted(
            i.base_name
            for i in self._ls(self.base)
            if i.type == pafs.FileType.Directory and _NAME.fullmatch(i.base_name)
        )

    def versions(self, name: str) -> list[Version]:
        """Complete versions, oldest first; staging folders and versions without a manifest
        (still being written, or abandoned) are not listed."""
        found = []
        for n in self._numbers(name):
            try:
                meta = self._read_json(self._path(name, _folder(n), MANIFEST))
            except RegistryError as err:  # one broken version must not hide the others
                log(f"registry: {name} v{n} is left out: {err}")
                continue
            if meta is not None:
                found.append(Version(name, n, self._uri(self._path(name, _folder(n))), meta))
        return found

    def aliases(self, name: str) -> dict[str, int]:
        return self._read_json(self._path(name, ALIASES)) or {}

    def get(self, name: str, ref: str | int) -> Version:
        """A version by number (3, "3", "v3"), alias ("production") or "latest"."""
        if isinstance(ref, int) or re.fullmatch(r"v?\d+", ref):
            n = int(str(ref).lstrip("v"))
        elif ref == LATEST:
            complete = self.versions(name)
            if not complete:
                raise RegistryError(f"{name} has no versions under {self.root}; register one")
            return complete[-1]
        else:
            aliases = self.aliases(name)
            if ref not in aliases:
                known = ", ".join(sorted(aliases)) or "none"
                raise RegistryError(
                    f"{name} has no alias {ref!r} (aliases: {known}); give a version number"
                )
            n = aliases[ref]
        meta = self._read_json(self._path(name, _folder(n), MANIFEST))
        if meta is None:
            known = ", ".join(str(v.version) for v in self.versions(name)) or "none"
            raise RegistryError(f"{name} has no version {n} under {self.root} (versions: {known})")
        return Version(name, n, self._uri(self._path(name, _folder(n))), meta)

    def history(self, name: str) -> list[dict]:
        path = self._path(name, HISTORY)
        if self.fs.get_file_info(path).type == pafs.FileType.NotFound:
            return []
        with self.fs.open_input_stream(path) as f:
            lines = f.read().decode().splitlines()
        events = []
        for i, line in enumerate(lines, 1):
            if line.strip():
                try:
                    events.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise RegistryError(f"{path} line {i} is not JSON ({e}); fix it by hand") from e
        return events

    def compare(self, name: str, a: str | int, b: str | int) -> dict:
        """Every metric of both versions with b - a, and the config keys that differ."""
        va, vb = self.get(name, a), self.get(name, b)
        metrics = {}
        for key in sorted(set(va.metrics) | set(vb.metrics)):
            x, y = va.metrics.get(key), vb.metrics.get(key)
            numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (x, y))
            metrics[key] = {"a": x, "b": y, "diff": y - x if numeric else None}
        ca = _flatten(va.metadata.get("config") or {})
        cb = _flatten(vb.metadata.get("config") or {})
        config = {
            k: {"a": ca.get(k), "b": cb.get(k)}
            for k in sorted(set(ca) | set(cb))
            if ca.get(k) != cb.get(k)
        }
        return {"a": va.version, "b": vb.version, "metrics": metrics, "config": config}

    def download(self, name: str, ref: str | int, dest: str) -> str:
        """Copies a version to `dest` (a path or URI that does not exist yet), checking every
        file against the sha256 recorded at registration; serving loads from there."""
        version = self.get(name, ref)
        dst_fs, dst = resolve(dest)
        if dst_fs.get_file_info(dst).type != pafs.FileType.NotFound:
            raise RegistryError(f"{dest} already exists; give a new folder to download into")
        local = isinstance(dst_fs, pafs.LocalFileSystem)
        target = posixpath.join(posixpath.dirname(dst), f".{uuid.uuid4().hex}.partial")
        target = target if local else dst  # locally: stage, then rename into place
        src = self._path(name, _folder(version.version))
        try:
            files = _copy_tree(self.fs, src, dst_fs, target)
            expected = {**version.metadata.get("files", {}), MANIFEST: files.get(MANIFEST)}
            if files != expected:
                bad = sorted(
                    k for k in set(files) | set(expected) if files.get(k) != expected.get(k)
                )
                raise RegistryError(
                    f"{name} v{version.version} does not match its manifest: {bad}; "
                    "the stored copy is damaged, register the export again"
                )
            if local:
                dst_fs.move(target, dst)
        except BaseException:
            _remove(dst_fs, target)
            raise
        return dest

    # -- writing -------------------------------------------------------------------------------

    def register(
        self,
        name: str,
        export_dir: str,
        metadata: dict | None = None,
        parent: str | int | None = None,
        alias: str | None = None,
    ) -> Version:
        """Copies an export (index/ included) into the next version, with its metrics, config,
        data snapshot, code, parent and the caller's `metadata`; visible only once complete."""
        from shoprank.models.export_meta import METADATA, ExportError, parse_export
        from shoprank.train.export import code_version  # imports torch: only when needed

        src_fs, src = resolve(export_dir)
        export_meta = self._read_json(posixpath.join(src, METADATA), src_fs)
        if export_meta is None:
            raise RegistryError(
                f"{export_dir} is not a shoprank export (no {METADATA}); export one with "
                "jobs/train.py, or give the run's export/ folder"
            )
        try:
            parse_export(export_meta, export_dir)  # the one typed reading of shoprank.json
        except ExportError as err:
            raise RegistryError(str(err)) from None
        if alias is not None:
            _check_alias(alias, force=False)
        meta = {k: export_meta[k] for k in _EXPORT_KEYS if k in export_meta}
        meta.update(metadata or {})
        meta.update(
            name=name,
            parent=None if parent is None else self.get(name, parent).version,
            source=export_dir if "://" in export_dir else os.path.abspath(export_dir),
            registered_at=_now(),
            registered_with=code_version(),
        )
        self.fs.create_dir(self._path(name), recursive=True)
        # Locally: copy aside (slow, unlocked), then number and rename under the lock.
        staging = self._path(name, f".staging-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        staging = staging if self.local else None
        try:
            files = _copy_tree(src_fs, src, self.fs, staging) if staging else None
            with self._lock(name):
                n = max(self._numbers(name), default=0) + 1
                folder = self._path(name, _folder(n))
                if staging is None:  # object store: write in place, the manifest last
                    files = _copy_tree(src_fs, src, self.fs, folder)
                meta.update(version=n, files=files)
                self._write_json(posixpath.join(staging or folder, MANIFEST), meta)
                if staging is not None:
                    self.fs.move(staging, folder)  # the version appears whole, at once
                    staging = None
                self._log(name, "register", version=n, parent=meta["parent"], source=meta["source"])
                if alias is not None:
                    self._set_alias(name, alias, n, "set at registration")
        finally:
            if staging is not None:
                _remove(self.fs, staging)
        return Version(name, n, self._uri(folder), meta)

    def set_alias(self, name: str, alias: str, ref: str | int, force: bool = False) -> Version:
        """Points `alias` at a version. `production` normally moves only through promote and
        rollback (the gate); force=True moves it by hand, and the history says so."""
        _check_alias(alias, force)
        with self._lock(name):
            version = self.get(name, ref)
            self._set_alias(name, alias, version.version, "set by hand")
        return version

    def promote(
        self,
        name: str,
        ref: str | int,
        metric: str,
        margin: float = 0.0,
        mode: str = "max",
        measured: tuple[int, float] | None = None,
    ) -> Decision:
        """Moves production to `ref` only if it beats production on `metric` by more than
        `margin` (mode "max": higher is better, "min": lower). Every decision, either way, is
        recorded in the history with its reason.

        `measured` = (production version, value): production's `metric` measured on the same
        data as the candidate's (a retraining scores both on the newest day), used instead of
        the value recorded at its registration; a RegistryError if production is no longer
        that version (it moved while the candidate was being measured)."""
        if mode not in ("max", "min"):
            raise RegistryError(f"mode={mode!r}: use 'max' (higher is better) or 'min'")
        if not (math.isfinite(margin) and margin >= 0):
            raise RegistryError(f"margin={margin!r}: give a number >= 0 (0 = any improvement)")
        if measured is not None and not math.isfinite(measured[1]):
            raise RegistryError(f"measured production {metric}={measured[1]!r} is not finite")
        with self._lock(name):
            cand = self.get(name, ref)
            cv = _metric(cand, metric)
            prod_n = self.aliases(name).get(PRODUCTION)
            if measured is not None and prod_n != measured[0]:
                now = "none" if prod_n is None else f"v{prod_n}"
                raise RegistryError(
                    f"{name}: production is {now}, not v{measured[0]} as when the candidate "
                    f"v{cand.version} was measured against it; measure again"
                )
            if measured is not None:
                pv = float(measured[1])
            else:
                pv = None if prod_n is None else _metric(self.get(name, prod_n), metric)
            better = "higher" if mode == "max" else "lower"
            head = f"v{cand.version} {metric}={cv:.6g}"
            if prod_n is None:
                promoted, reason = True, f"{head}; there was no production version"
            elif prod_n == cand.version:
                promoted, reason = False, f"v{cand.version} is already production"
            else:
                gain = cv - pv if mode == "max" else pv - cv
                promoted = gain > margin
                verdict = "beats" if promoted else "does not beat"
                reason = (
                    f"{head} {verdict} production v{prod_n} ({pv:.6g}) by more than the margin "
                    f"{margin:g}: gain {gain:+.6g} ({better} is better)"
                )
            decision = Decision(
                promoted, reason, metric, mode, margin, cand.version, cv, prod_n, pv
            )
            if promoted:
                self._write_aliases(name, {**self.aliases(name), PRODUCTION: cand.version})
            self._log(
                name,
                "promote" if promoted else "refuse",
                alias=PRODUCTION,
                version=cand.version,
                previous=prod_n,
                metric=metric,
                mode=mode,
                margin=margin,
                candidate_value=cv,
                production_value=pv,
                production_measured=measured is not None,
                reason=reason,
            )
        return decision

    def rollback(self, name: str) -> Version:
        """Puts back the version that was production before the current one (from the
        history); rolling back again goes further back."""
        with self._lock(name):
            stack = _production_stack(self.history(name))
            current = self.aliases(name).get(PRODUCTION)
            if len(stack) < 2:
                raise RegistryError(
                    f"{name}: nothing to roll back to (production: "
                    f"{'none' if current is None else f'v{current}'}, and no earlier production "
                    "version in the history)"
                )
            version = self.get(name, stack[-2])
            self._write_aliases(name, {**self.aliases(name), PRODUCTION: version.version})
            self._log(
                name,
                "rollback",
                alias=PRODUCTION,
                version=version.version,
                previous=current,
                reason=f"rolled back from v{current} to v{version.version}, production before it",
            )
        return version

    # -- internals -----------------------------------------------------------------------------

    def _path(self, name: str, *parts: str) -> str:
        if not _NAME.fullmatch(name):
            raise RegistryError(f"model name {name!r}: use letters, digits, '.', '_' and '-'")
        return "/".join(p for p in (self.base, name, *parts) if p)

    def _uri(self, path: str) -> str:
        return f"{self._scheme}://{path}" if self._scheme else path

    def _ls(self, path: str) -> list[pafs.FileInfo]:
        return self.fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))

    def _numbers(self, name: str) -> list[int]:
        """Every version folder, complete or not, so that a number is never given out twice."""
        return sorted(
            int(i.base_name[1:])
            for i in self._ls(self._path(name))
            if i.type == pafs.FileType.Directory
            and re.fullmatch(r"v\d+", i.base_name)
            and i.base_name == _folder(int(i.base_name[1:]))
        )

    def _read_json(self, path: str, fs: pafs.FileSystem | None = None) -> dict | None:
        fs = fs or self.fs
        if fs.get_file_info(path).type != pafs.FileType.File:
            return None
        with fs.open_input_stream(path) as f:
            data = f.read()
        try:
            obj = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RegistryError(
                f"{self._uri(path) if fs is self.fs else path} is not valid JSON ({err}): restore "
                "it from a backup or fix it by hand (history.jsonl records every change)"
            ) from None
        if not isinstance(obj, dict):
            raise RegistryError(f"{path} holds {type(obj).__name__}, not a JSON object: fix it")
        return obj

    def _write_json(self, path: str, obj: dict) -> None:
        """Locally write aside then rename, so a reader sees the old or the new file whole;
        on an object store a single PUT already is."""
        data = json.dumps(obj, indent=2, default=str).encode()
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}" if self.local else path
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        if self.local:
            self.fs.move(tmp, path)

    def _write_aliases(self, name: str, aliases: dict[str, int]) -> None:
        self._write_json(self._path(name, ALIASES), dict(sorted(aliases.items())))

    def _set_alias(self, name: str, alias: str, n: int, why: str) -> None:
        aliases = self.aliases(name)
        previous = aliases.get(alias)
        self._write_aliases(name, {**aliases, alias: n})
        self._log(name, "alias", alias=alias, version=n, previous=previous, reason=why)

    def _log(self, name: str, event: str, **fields) -> None:
        """Appends one event to history.jsonl (object stores cannot append: rewrite it)."""
        line = json.dumps({"time": _now(), "event": event, **fields}, default=str) + "\n"
        path = self._path(name, HISTORY)
        if self.local:
            with self.fs.open_append_stream(path) as f:
                f.write(line.encode())
            return
        old = b""
        if self.fs.get_file_info(path).type == pafs.FileType.File:
            with self.fs.open_input_stream(path) as f:
                old = f.read()
        with self.fs.open_output_stream(path) as f:
            f.write(old + line.encode())

    @contextlib.contextmanager
    def hold(self, name: str, purpose: str) -> Iterator[None]:
        """An exclusive hold on `name` for a long task (a retraining run) that refuses rather
        than waits: while one process holds `purpose`, another gets a RegistryError naming the
        holder. Apart from the writers' lock, so the holder still registers and promotes.
        Locally an fcntl lock on `<model>/.<purpose>.lock` (it dies with its process); on an
        object store a lease under `<model>/.leases-<purpose>/` (as the writers' lease)."""
        if not _NAME.fullmatch(purpose):
            raise RegistryError(f"purpose {purpose!r}: use letters, digits, '.', '_' and '-'")
        if not self.local:
            with self._lease(name, f"{LEASES}-{purpose}", wait_s=0.0, what=purpose):
                yield
            return
        self.fs.create_dir(self._path(name), recursive=True)
        with open(self._path(name, f".{purpose}.lock"), "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "another process"
                raise RegistryError(
                    f"{name}: a {purpose} is already running ({holder}); this one is refused "
                    "and changes nothing: try again when it has finished"
                ) from None
            f.seek(0)
            f.truncate()
            f.write(f"{socket.gethostname()} pid {os.getpid()} since {_now()}")
            f.flush()
            yield  # released when the file closes

    @contextlib.contextmanager
    def _lock(self, name: str) -> Iterator[None]:
        """An exclusive hold on the model between processes: an fcntl lock locally, a lease on
        object stores."""
        if not self.local:
            with self._lease(name):
                yield
            return
        self.fs.create_dir(self._path(name), recursive=True)
        with open(self._path(name, ".lock"), "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes
            yield

    @contextlib.contextmanager
    def _lease(
        self, name: str, leases: str = LEASES, wait_s: float | None = None, what: str = "writer"
    ) -> Iterator[None]:
        folder = self._path(name, leases)
        wait_s = self.lock_wait_s if wait_s is None else wait_s
        # Named by time: when writers see each other, the oldest keeps its lease and waits; the
        # younger ones withdraw theirs and put them back only once no live lease is left, so the
        # oldest is never starved by contenders flickering in and out. A writer goes on only
        # when its own lease is up and a listing after it shows no other.
        mine = posixpath.join(folder, f"{time.time_ns():020d}-{uuid.uuid4().hex}.json")
        owner = f"{socket.gethostname()} pid {os.getpid()}"

        def put() -> None:
            self._write_json(mine, {"owner": owner, "expires": time.time() + LEASE_S})

        self.fs.create_dir(folder, recursive=True)
        deadline = time.monotonic() + wait_s
        put()
        up = True
        while True:
            others = self._live_leases(folder, mine)
            if not others:
                if up:
                    break
                put()
                up = True
                continue
            if up and min(others)[0] < posixpath.basename(mine):
                self.fs.delete_file(mine)  # an older writer is waiting or writing: withdraw
                up = False
            if time.monotonic() > deadline:
                if up:
                    self.fs.delete_file(mine)
                raise RegistryError(
                    f"{name}: another {what} holds the registry ({min(others)[1]}) for over "
                    f"{wait_s:g} s; retry later. A {what} that died frees it within "
                    f"{LEASE_S:g} s (or delete its lease under {self._uri(folder)})"
                )
            time.sleep(random.uniform(0.02, 0.2))
        held = threading.Event()

        def renew() -> None:
            while not held.wait(LEASE_S / 3):
                put()

        renewer = threading.Thread(target=renew, daemon=True)
        renewer.start()
        try:
            yield
        finally:
            held.set()
            renewer.join()
            self.fs.delete_file(mine)

    def _live_leases(self, folder: str, mine: str) -> list[tuple[str, str]]:
        """(name, owner) of the other leases that have not expired (expired ones are removed)."""
        owners = []
        for info in self._ls(folder):
            if info.path == mine or info.type != pafs.FileType.File:
                continue
            try:
                lease = self._read_json(info.path)
            except FileNotFoundError:  # withdrawn between the listing and the read
                continue
            except RegistryError:  # being written this instant: count it as live
                lease = None
            if lease is None:  # half-written, or gone: live only if it still exists
                if self.fs.get_file_info(info.path).type != pafs.FileType.File:
                    continue
                lease = {"owner": "a writer", "expires": time.time() + 1}
            if float(lease.get("expires", 0)) < time.time():
                with contextlib.suppress(FileNotFoundError, OSError):
                    self.fs.delete_file(info.path)  # another writer may be removing it too
                continue
            owners.append((info.base_name, str(lease.get("owner", "unknown"))))
        return owners


def publish(
    root: str,
    name: str,
    export_dir: str,
    metric: str,
    mode: str = "max",
    margin: float = 0.0,
    promote: bool = True,
    metadata: dict | None = None,
) -> tuple[Version, Decision | None]:
    """Register an export as the `candidate` (its parent: the production version, if any) and,
    when `promote`, let the gate decide whether it becomes production."""
    registry = Registry(root)
    production = registry.aliases(name).get(PRODUCTION)
    version = registry.register(name, export_dir, metadata, parent=production, alias="candidate")
    decision = registry.promote(name, version.version, metric, margin, mode) if promote else None
    return version, decision


def publish_run(
    cfg, export_dir: str, metadata: dict | None = None
) -> tuple[Version, Decision | None]:
    """A job's export published as `cfg.registry` says: registered under `registry.model` (default
    `run.name`) and, when `registry.promote`, through the gate on `registry.metric` (default
    `val_<train.metric>`) with `registry.margin`."""
    r = cfg.registry
    return publish(
        r.root,
        r.model or cfg.run.name,
        export_dir,
        r.metric or f"val_{cfg.train.metric}",
        cfg.train.metric_mode,
        r.margin,
        r.promote,
        metadata,
    )


def _folder(n: int) -> str:
    return f"v{n:04d}"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _check_alias(alias: str, force: bool) -> None:
    if not _NAME.fullmatch(alias) or re.fullmatch(r"v?\d+", alias) or alias == LATEST:
        raise RegistryError(
            f"alias {alias!r}: use a name such as 'candidate' (not a number, not {LATEST!r})"
        )
    if alias == PRODUCTION and not force:
        raise RegistryError(
            "production moves through promote (the metric gate) or rollback; "
            "force it by hand only if you must"
        )


def _metric(version: Version, metric: str) -> float:
    metrics = version.metrics
    if metric not in metrics:
        known = ", ".join(sorted(metrics)) or "none"
        raise RegistryError(
            f"{version.name} v{version.version} has no metric {metric!r} (it has: {known}); "
            "pick one of those"
        )
    value = metrics[metric]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise RegistryError(
            f"{version.name} v{version.version} {metric}={value!r} is not a finite number"
        )
    return float(value)


def _production_stack(history: list[dict]) -> list[int]:
    """Production versions in the order they took over, with rolled-back ones removed."""
    stack: list[int] = []
    for event in history:
        if event.get("alias") != PRODUCTION:
            continue
        if event["event"] in ("promote", "alias") and stack[-1:] != [event["version"]]:
            stack.append(event["version"])
        elif event["event"] == "rollback" and stack:
            stack.pop()
    return stack


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _copy_tree(
    src_fs: pafs.FileSystem, src: str, dst_fs: pafs.FileSystem, dst: str
) -> dict[str, dict]:
    """Copies every file under `src`; returns {relative path: {size, sha256}} of what was
    written, so a copy can be checked later without trusting the source."""
    files = {}
    dst_fs.create_dir(dst, recursive=True)
    infos = src_fs.get_file_info(pafs.FileSelector(src, recursive=True))
    for info in sorted(infos, key=lambda i: i.path):
        rel = posixpath.relpath(info.path, src)
        if info.type == pafs.FileType.Directory:
            dst_fs.create_dir(posixpath.join(dst, rel), recursive=True)
        elif info.type == pafs.FileType.File:
            digest, size = hashlib.sha256(), 0
            with (
                src_fs.open_input_stream(info.path) as fin,
                dst_fs.open_output_stream(posixpath.join(dst, rel)) as fout,
            ):
                while chunk := fin.read(_CHUNK):
                    digest.update(chunk)
                    fout.write(chunk)
                    size += len(chunk)
            files[rel] = {"size": size, "sha256": digest.hexdigest()}
    return files


def _remove(fs: pafs.FileSystem, path: str) -> None:
    """Deletes what a failed write left; nothing there is fine, other errors are not hidden."""
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)
