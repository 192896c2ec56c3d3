"""The model registry: atomic versions under concurrent writers, the promotion gate, rollback,
and the CLI (no Ray, no model: fake export folders)."""

from __future__ import annotations

import filecmp
import json
import multiprocessing
import os
import runpy
import sys
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from shoprank.registry import Registry, RegistryError

JOB = Path(__file__).resolve().parents[1] / "jobs" / "registry.py"
NDCG = "val_ndcg@10"


def fake_export(folder: Path, ndcg: float = 0.05, seed: int = 0, size: int = 1 << 16) -> Path:
    """What jobs/train.py leaves: weights, tokenizer, shoprank.json, and a retriever's index/."""
    (folder / "index" / "embeddings").mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"hidden_size": 32}))
    (folder / "model.safetensors").write_bytes(os.urandom(size))
    (folder / "tokenizer.json").write_text(json.dumps({"seed": seed}))
    (folder / "index" / "faiss.index").write_bytes(os.urandom(size // 4))
    (folder / "index" / "embeddings" / "part-0.npy").write_bytes(os.urandom(1024))
    meta = {
        "kind": "retriever",
        "base_model": "minilm",
        "max_length": 64,
        "pooling": "mean",
        "context_max_length": 128,
        "item_max_length": 64,
        "metrics": {NDCG: ndcg, "val_recall@10": 2 * ndcg, "step": 100 + seed},
        "config": {"train": {"lr": 1e-4 * (seed + 1)}, "model": {"name": "minilm"}},
        "data": {"catalog.parquet": {"digest": "abc", "n_files": 1}},
        "code": {"shoprank": "0.1.0", "commit": "deadbeef"},
    }
    (folder / "shoprank.json").write_text(json.dumps(meta))
    return folder


def same_tree(a: Path, b: Path) -> bool:
    """Every file of `a` is in `b` with the same bytes (b may hold registry.json besides)."""
    files = [p.relative_to(a) for p in a.rglob("*") if p.is_file()]
    return all(filecmp.cmp(a / f, b / f, shallow=False) for f in files)


@pytest.fixture
def exports(tmp_path: Path):
    def make(ndcg: float, seed: int = 0) -> str:
        return str(fake_export(tmp_path / f"export-{seed}-{ndcg}", ndcg, seed))

    return make


def test_register_list_get_round_trip(tmp_path, exports):
    reg = Registry(str(tmp_path / "reg"))
    src = exports(0.05)
    v1 = reg.register("shop", src)
    v2 = reg.register("shop", exports(0.06, seed=1), parent=1, metadata={"sweep": "s1"})
    assert [v.version for v in reg.versions("shop")] == [1, 2]
    assert reg.models() == ["shop"]
    got = reg.get("shop", "v1")
    assert got == v1 and got.uri == str(tmp_path / "reg" / "shop" / "v0001")
    assert same_tree(Path(src), Path(got.uri))
    meta = reg.get("shop", "latest").metadata
    assert meta["parent"] == 1 and meta["sweep"] == "s1" and meta["kind"] == "retriever"
    assert meta["metrics"][NDCG] == 0.06 and meta["code"]["commit"] == "deadbeef"
    assert "shoprank" in meta["registered_with"] and meta["registered_at"].endswith("+00:00")
    assert set(meta["files"]) >= {"model.safetensors", "index/faiss.index", "shoprank.json"}
    assert reg.get("shop", 2) == v2
    assert [e["event"] for e in reg.history("shop")] == ["register", "register"]
    # A copy for serving is checked file by file against the manifest.
    out = reg.download("shop", 1, str(tmp_path / "served"))
    assert same_tree(Path(src), Path(out))
    with pytest.raises(RegistryError, match="already exists"):
        reg.download("shop", 1, out)
    Path(got.uri, "index", "faiss.index").write_bytes(b"damaged")
    with pytest.raises(RegistryError, match="index/faiss.index"):
        reg.download("shop", 1, str(tmp_path / "served2"))
    assert not (tmp_path / "served2").exists()
    with pytest.raises(RegistryError, match="no version 7"):
        reg.get("shop", 7)
    with pytest.raises(RegistryError, match="not a shoprank export"):
        reg.register("shop", str(tmp_path / "reg"))
    # shoprank.json is read through the one typed schema: a broken one is refused, named.
    broken = fake_export(tmp_path / "broken")
    (broken / "shoprank.json").write_text(json.dumps({"kind": "retriever", "config": {}}))
    with pytest.raises(RegistryError, match="base_model: Field required"):
        reg.register("shop", str(broken))


def _register(root: str, src: str, start, results) -> None:
    start.wait()  # all writers at once
    try:
        results.put((Registry(root).register("shop", src).version, src))
    except Exception as e:  # reported to the test, which fails on it
        results.put((repr(e), src))


def test_concurrent_writers_get_distinct_complete_versions(tmp_path):
    import shoprank.train.export  # noqa: F401  (forked writers inherit it instead of importing torch)

    root = str(tmp_path / "reg")
    sources = [str(fake_export(tmp_path / f"src{i}", 0.01 * i, i, size=1 << 20)) for i in range(8)]
    ctx = multiprocessing.get_context("fork")
    start, results = ctx.Barrier(len(sources)), ctx.Queue()
    writers = [ctx.Process(target=_register, args=(root, s, start, results)) for s in sources]
    for w in writers:
        w.start()
    got = [results.get(timeout=60) for _ in writers]  # (version or error, source)
    for w in writers:
        w.join(timeout=60)
        assert w.exitcode == 0
    assert [err for err, _ in got if not isinstance(err, int)] == []  # no writer failed
    assert sorted(n for n, _ in got) == list(range(1, 9))
    reg = Registry(root)
    for n, src in got:
        version = reg.get("shop", n)
        assert version.metadata["source"] == src
        assert same_tree(Path(src), Path(version.uri))
    model = tmp_path / "reg" / "shop"
    assert sorted(p.name for p in model.iterdir() if p.name.startswith(".")) == [".lock"]
    history = reg.history("shop")
    assert sorted(e["version"] for e in history) == list(range(1, 9))


def test_half_written_versions_are_invisible(tmp_path, exports):
    reg = Registry(str(tmp_path / "reg"))
    reg.register("shop", exports(0.05))
    model = tmp_path / "reg" / "shop"
    (model / ".staging-123-abcd" / "index").mkdir(parents=True)  # a writer that died copying
    (model / "v0002").mkdir()  # an object-store writer that died before its manifest
    (model / "v0002" / "model.safetensors").write_bytes(b"partial")
    assert [v.version for v in reg.versions("shop")] == [1]
    with pytest.raises(RegistryError, match="no version 2"):
        reg.get("shop", 2)
    assert reg.register("shop", exports(0.06)).version == 3  # the number is not reused


def test_object_store_path_writes_manifest_last(tmp_path, exports):
    """A filesystem that is not LocalFileSystem takes the object-store path (no rename)."""
    fs = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    reg = Registry("reg", filesystem=fs)
    assert not reg.local
    src = exports(0.05)
    v = reg.register("shop", src, alias="candidate")
    assert v.uri == "reg/shop/v0001" and reg.get("shop", "candidate").version == 1
    assert same_tree(Path(src), tmp_path / "reg" / "shop" / "v0001")
    assert reg.promote("shop", "candidate", NDCG).promoted


def test_file_uri_root(tmp_path, exports):
    reg = Registry(f"file://{tmp_path}/reg")
    assert reg.local
    v = reg.register("shop", exports(0.05))
    assert v.uri == f"{tmp_path}/reg/shop/v0001" and Path(v.uri, "index", "faiss.index").exists()
    assert reg.promote("shop", 1, NDCG).promoted
    assert Registry(str(tmp_path / "reg")).get("shop", "production").version == 1


def test_promotion_gate(tmp_path, exports):
    reg = Registry(str(tmp_path / "reg"))
    for i, ndcg in enumerate([0.050, 0.040, 0.0505, 0.060]):
        reg.register("shop", exports(ndcg, seed=i))
    first = reg.promote("shop", 1, NDCG, margin=0.001)
    assert first.promoted and first.production is None
    worse = reg.promote("shop", 2, NDCG, margin=0.001)
    assert not worse.promoted and worse.production == 1 and "does not beat" in worse.reason
    within = reg.promote("shop", 3, NDCG, margin=0.001)  # better, but by less than the margin
    assert not within.promoted and within.candidate_value > within.production_value
    assert reg.aliases("shop")["production"] == 1
    better = reg.promote("shop", 4, NDCG, margin=0.001)
    assert better.promoted and reg.get("shop", "production").version == 4
    assert not reg.promote("shop", 4, NDCG).promoted  # already production
    events = [(e["event"], e["version"]) for e in reg.history("shop") if e["event"] != "register"]
    assert events == [("promote", 1), ("refuse", 2), ("refuse", 3), ("promote", 4), ("refuse", 4)]
    refusal = [e for e in reg.history("shop") if e["event"] == "refuse"][0]
    assert refusal["reason"] == worse.reason and refusal["production_value"] == 0.05
    assert refusal["metric"] == NDCG and refusal["margin"] == 0.001


def test_promotion_mode_min_and_errors(tmp_path, exports):
    reg = Registry(str(tmp_path / "reg"))
    for i, ndcg in enumerate([0.05, 0.04, 0.06]):
        reg.register("shop", exports(ndcg, seed=i))
    assert reg.promote("shop", 1, NDCG, mode="min").promoted
    assert not reg.promote("shop", 3, NDCG, mode="min").promoted  # higher is worse here
    assert reg.promote("shop", 2, NDCG, mode="min").promoted
    with pytest.raises(RegistryError, match=r"v3 has no metric 'val_auc' \(it has: step, val_"):
        reg.promote("shop", 3, "val_auc")
    with pytest.raises(RegistryError, match="mode='best'"):
        reg.promote("shop", 3, NDCG, mode="best")
    with pytest.raises(RegistryError, match="margin=-0.1"):
        reg.promote("shop", 3, NDCG, margin=-0.1)


def test_rollback_restores_previous_production(tmp_path, exports):
    reg = Registry(str(tmp_path / "reg"))
    for i, ndcg in enumerate([0.05, 0.06, 0.07]):
        reg.register("shop", exports(ndcg, seed=i))
    with pytest.raises(RegistryError, match="nothing to roll back to"):
        reg.rollback("shop")
    for n in (1, 2, 3):
        assert reg.promote("shop", n, NDCG).promoted
    assert reg.rollback("shop").version == 2
    assert reg.aliases("shop")["production"] == 2
    last = reg.history("shop")[-1]
    assert (last["event"], last["version"], last["previous"]) == ("rollback", 2, 3)
    assert reg.rollback("shop").version == 1  # again: further back
    with pytest.raises(RegistryError, match="nothing to roll back to"):
        reg.rollback("shop")
    assert reg.promote("shop", 3, NDCG).promoted
    assert reg.rollback("shop").version == 1


def test_aliases(tmp_path, exports):
    reg = Registry(str(tmp_path / "reg"))
    reg.register("shop", exports(0.05))
    reg.register("shop", exports(0.06, seed=1), alias="candidate")
    assert reg.aliases("shop") == {"candidate": 2}
    reg.set_alias("shop", "candidate", "v1")
    assert reg.get("shop", "candidate").version == 1
    with pytest.raises(RegistryError, match="promote"):
        reg.set_alias("shop", "production", 2)
    reg.set_alias("shop", "production", 2, force=True)
    assert reg.get("shop", "production").version == 2
    for bad in ("3", "v3", "latest", "../x"):
        with pytest.raises(RegistryError, match="alias"):
            reg.set_alias("shop", bad, 1)
    with pytest.raises(RegistryError, match="no alias 'staging'"):
        reg.get("shop", "staging")
    with pytest.raises(RegistryError, match="model name"):
        reg.versions("../etc")
    diff = reg.compare("shop", 1, "candidate")
    assert diff["metrics"][NDCG]["diff"] == 0 and diff["config"] == {}
    diff = reg.compare("shop", 1, 2)
    assert diff["metrics"][NDCG]["diff"] == pytest.approx(0.01)
    assert diff["config"] == {"train.lr": {"a": 1e-4, "b": 2e-4}}


def cli(capsys, monkeypatch, *argv: str) -> tuple[int, str, str]:
    """Runs jobs/registry.py as a user would; returns (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", [str(JOB), *argv])
    code = 0
    try:
        runpy.run_path(str(JOB), run_name="__main__")
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_end_to_end(tmp_path, exports, capsys, monkeypatch):
    root = ["--root", str(tmp_path / "reg")]
    for i, ndcg in enumerate([0.05, 0.04, 0.07]):
        code, out, _ = cli(capsys, monkeypatch, *root, "register", "shop", exports(ndcg, i))
        assert code == 0 and f"registered shop v{i + 1}" in out
    code, out, _ = cli(capsys, monkeypatch, *root, "promote", "shop", "1", "--metric", NDCG)
    assert code == 0 and "promoted shop v1" in out
    code, out, err = cli(capsys, monkeypatch, *root, "promote", "shop", "2", "--metric", NDCG)
    assert code == 1 and "refused: v2 val_ndcg@10=0.04 does not beat production v1" in err
    code, _, err = cli(capsys, monkeypatch, *root, "promote", "shop", "2", "--metric", "auc")
    assert code == 1 and "error: shop v2 has no metric 'auc'" in err
    args = ("promote", "shop", "3", "--metric", NDCG, "--margin", "0.01")
    assert cli(capsys, monkeypatch, *root, *args)[0] == 0
    code, out, _ = cli(capsys, monkeypatch, *root, "list", "shop")
    lines = out.splitlines()
    header = ["version", "aliases", "kind", "registered_at", "parent", NDCG, "val_recall@10"]
    assert lines[0].split() == header
    assert lines[3].split()[:3] == ["v3", "production", "retriever"]
    code, out, _ = cli(capsys, monkeypatch, *root, "show", "shop", "production")
    shown = json.loads(out)
    assert shown["version"] == 3 and shown["aliases"] == ["production"]
    assert shown["files"].startswith("6 files")
    code, out, _ = cli(capsys, monkeypatch, *root, "compare", "shop", "1", "3")
    assert code == 0 and "val_ndcg@10" in out and "train.lr" in out
    code, out, _ = cli(capsys, monkeypatch, *root, "rollback", "shop")
    assert code == 0 and "shop production: v3 -> v1" in out
    code, out, _ = cli(capsys, monkeypatch, *root, "history", "shop")
    # A missing metric is an error, not a decision: it is not in the history.
    events = ["register", "register", "register", "promote", "refuse", "promote", "rollback"]
    assert [line.split()[1] for line in out.splitlines()] == events
    code, _, err = cli(capsys, monkeypatch, *root, "show", "shop", "9")
    assert code == 1 and "error: shop has no version 9" in err
    code, out, _ = cli(capsys, monkeypatch, *root, "list")
    assert out.split() == ["shop"]


def test_corrupt_files_are_named_and_do_not_hide_the_rest(tmp_path, exports):
    reg = Registry(str(tmp_path / "reg"))
    reg.register("shop", exports(0.05))
    reg.register("shop", exports(0.06, seed=1))
    (tmp_path / "reg" / "shop" / "v0001" / "registry.json").write_text('{"version": 1, ')
    assert [v.version for v in reg.versions("shop")] == [2]  # v1 left out, v2 still listed
    with pytest.raises(RegistryError, match=r"v0001/registry.json is not valid JSON"):
        reg.get("shop", 1)
    (tmp_path / "reg" / "shop" / "aliases.json").write_bytes(b"\xff\xfe")
    with pytest.raises(RegistryError, match="aliases.json is not valid JSON"):
        reg.get("shop", "production")
    (tmp_path / "reg" / "shop" / "aliases.json").write_text("[1, 2]")
    with pytest.raises(RegistryError, match="not a JSON object"):
        reg.aliases("shop")


def _object_store(tmp_path: Path, **kw) -> Registry:
    fs = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    return Registry("reg", filesystem=fs, **kw)


def test_object_store_writers_are_serialised_by_a_lease(tmp_path):
    """No rename, no fcntl: concurrent writers on an object store still get distinct numbers
    and lose no history line, because numbering happens under the lease."""
    import threading

    import shoprank.train.export  # noqa: F401  (imported once, before the threads race)

    sources = [str(fake_export(tmp_path / f"src{i}", 0.01 * i, i, size=1 << 12)) for i in range(6)]
    start, got, errors = threading.Barrier(len(sources)), [], []

    def write(src: str) -> None:
        start.wait()
        try:
            got.append(_object_store(tmp_path).register("shop", src).version)
        except Exception as err:  # a thread's error would otherwise only be printed
            errors.append(err)

    threads = [threading.Thread(target=write, args=(s,)) for s in sources]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    assert sorted(got) == list(range(1, 7))
    reg = _object_store(tmp_path)
    assert sorted(e["version"] for e in reg.history("shop")) == list(range(1, 7))
    assert list((tmp_path / "reg" / "shop" / ".leases").iterdir()) == []  # all released


def test_a_held_lease_stops_a_writer_and_a_dead_ones_expires(tmp_path, exports):
    import time

    reg = _object_store(tmp_path, lock_wait_s=0.3)
    reg.register("shop", exports(0.05))
    leases = tmp_path / "reg" / "shop" / ".leases"
    held = {"owner": "trainer-7 pid 42", "expires": time.time() + 3600}
    (leases / "other.json").write_text(json.dumps(held))
    with pytest.raises(RegistryError, match="trainer-7 pid 42"):
        reg.promote("shop", 1, NDCG)
    (leases / "other.json").write_text(json.dumps({**held, "expires": time.time() - 1}))
    assert reg.promote("shop", 1, NDCG).promoted  # the dead writer's lease is taken over
    assert list(leases.iterdir()) == []
