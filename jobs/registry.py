"""The model registry: list, show, compare, register, promote and roll back versions.

    python jobs/registry.py [--root registry] list [NAME]
    python jobs/registry.py show NAME VERSION|ALIAS [--files]
    python jobs/registry.py compare NAME A B
    python jobs/registry.py register NAME EXPORT_DIR [--parent V] [--alias candidate]
    python jobs/registry.py promote NAME VERSION|ALIAS --metric val_ndcg@10 [--margin 0.0]
        [--mode max]
    python jobs/registry.py rollback NAME
    python jobs/registry.py history NAME
    python jobs/registry.py alias NAME ALIAS VERSION [--force]

--root is a local folder or a filesystem URI (s3://bucket/registry). promote moves production
only when the version beats it on --metric by more than --margin, and exits 1 when it refuses.
"""

from __future__ import annotations

import argparse
import json

from shoprank.registry import Registry, RegistryError


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)
    return "\n".join(line.rstrip() for line in lines)


def fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "-" if value is None else str(value)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="registry", help="registry folder or URI")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="models, or one model's versions").add_argument("name", nargs="?")
    show = sub.add_parser("show", help="one version's metadata")
    show.add_argument("name")
    show.add_argument("version")
    show.add_argument("--files", action="store_true", help="list every file with its sha256")
    compare = sub.add_parser("compare", help="metrics (b - a) and config differences")
    compare.add_argument("name")
    compare.add_argument("a")
    compare.add_argument("b")
    register = sub.add_parser("register", help="copy an exported model in as a new version")
    register.add_argument("name")
    register.add_argument("export_dir")
    register.add_argument("--parent", help="version or alias this one was derived from")
    register.add_argument("--alias", help="point this alias (e.g. candidate) at the new version")
    promote = sub.add_parser("promote", help="make a version production if it beats production")
    promote.add_argument("name")
    promote.add_argument("version")
    promote.add_argument("--metric", required=True, help="e.g. val_ndcg@10")
    promote.add_argument("--margin", type=float, default=0.0, help="required improvement")
    promote.add_argument("--mode", choices=["max", "min"], default="max", help="better is")
    sub.add_parser("rollback", help="production back to the one before").add_argument("name")
    sub.add_parser("history", help="every event, oldest first").add_argument("name")
    alias = sub.add_parser("alias", help="point an alias at a version")
    alias.add_argument("name")
    alias.add_argument("alias")
    alias.add_argument("version")
    alias.add_argument("--force", action="store_true", help="allow moving production by hand")
    args = parser.parse_args(argv)

    registry = Registry(args.root)
    try:
        run(registry, args)
    except RegistryError as e:
        raise SystemExit(f"error: {e}") from e


def run(registry: Registry, args: argparse.Namespace) -> None:
    if args.command == "list" and args.name is None:
        print("\n".join(registry.models()) or f"no models under {registry.root}")
    elif args.command == "list":
        versions = registry.versions(args.name)
        if not versions:
            raise RegistryError(f"{args.name} has no versions under {registry.root}")
        by_version: dict[int, list[str]] = {}
        for name, n in registry.aliases(args.name).items():
            by_version.setdefault(n, []).append(name)
        metrics = sorted({k for v in versions for k in v.metrics if k.startswith("val_")})
        rows = [["version", "aliases", "kind", "registered_at", "parent", *metrics]]
        for v in versions:
            meta = v.metadata
            rows.append(
                [f"v{v.version}", ",".join(sorted(by_version.get(v.version, []))) or "-"]
                + [fmt(meta.get(k)) for k in ("kind", "registered_at", "parent")]
                + [fmt(v.metrics.get(m)) for m in metrics]
            )
        print(table(rows))
    elif args.command == "show":
        v = registry.get(args.name, args.version)
        meta = dict(v.metadata)
        files = meta.get("files") or {}
        if not args.files:
            meta["files"] = f"{len(files)} files, {sum(f['size'] for f in files.values())} bytes"
        aliases = sorted(a for a, n in registry.aliases(args.name).items() if n == v.version)
        print(json.dumps({"uri": v.uri, "aliases": aliases, **meta}, indent=2, default=str))
    elif args.command == "compare":
        found = registry.compare(args.name, args.a, args.b)
        rows = [["metric", f"v{found['a']}", f"v{found['b']}", "b - a"]]
        rows += [[k, fmt(m["a"]), fmt(m["b"]), fmt(m["diff"])] for k, m in found["metrics"].items()]
        print(table(rows))
        if found["config"]:
            rows = [["config", f"v{found['a']}", f"v{found['b']}"]]
            rows += [[k, fmt(c["a"]), fmt(c["b"])] for k, c in found["config"].items()]
            print("\n" + table(rows))
    elif args.command == "register":
        v = registry.register(args.name, args.export_dir, parent=args.parent, alias=args.alias)
        print(f"registered {v.name} v{v.version} at {v.uri}")
    elif args.command == "promote":
        d = registry.promote(args.name, args.version, args.metric, args.margin, args.mode)
        if not d.promoted:
            raise SystemExit(f"refused: {d.reason}")
        print(f"promoted {args.name} v{d.candidate} to production: {d.reason}")
    elif args.command == "rollback":
        before = registry.aliases(args.name).get("production")
        v = registry.rollback(args.name)
        print(f"{args.name} production: v{before} -> v{v.version}")
    elif args.command == "history":
        for e in registry.history(args.name):
            prev = f" (was v{e['previous']})" if e.get("previous") is not None else ""
            what = f"{e.get('alias', '')} v{e.get('version')}".strip()
            print(f"{e['time']}  {e['event']:<8}  {what}{prev}  {e.get('reason', '')}".rstrip())
    elif args.command == "alias":
        v = registry.set_alias(args.name, args.alias, args.version, force=args.force)
        print(f"{args.name} {args.alias} -> v{v.version}")


if __name__ == "__main__":
    main()
