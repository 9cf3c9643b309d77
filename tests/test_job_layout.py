"""The write side's layout: Ray only in qmoe_ray/job, options with one source of truth, the
source index read once, one storage-option flag."""

from __future__ import annotations

import ast
import dataclasses
import pickle
from pathlib import Path

import pytest

import qmoe_ray
from qmoe_ray.job.config import CompressConfig
from qmoe_ray.job.group import QuantOptions

pytestmark = pytest.mark.usefixtures("module_ray")  # every job here runs in-process

PKG = Path(qmoe_ray.__file__).parent


def _imports(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module)
    return out


def test_ray_is_imported_in_the_job_package_only():
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG).parts
        if rel[0] in ("job", "bench"):
            continue
        ray = {m for m in _imports(path) if m == "ray" or m.startswith("ray.")}
        assert not ray, f"{path} imports {ray}"


def test_job_modules_import_no_circle():
    mods = {p.stem: _imports(p) for p in (PKG / "job").glob("*.py")}
    edges = {m: {i.rsplit(".", 1)[-1] for i in imps if i.startswith("qmoe_ray.job.")}
             for m, imps in mods.items()}

    def reach(start: str, seen: set[str]) -> None:
        for n in edges.get(start, ()):
            assert n != start_mod, f"import circle through qmoe_ray.job.{start_mod}"
            if n not in seen:
                seen.add(n)
                reach(n, seen)

    for start_mod in edges:
        reach(start_mod, set())


def test_quant_options_come_from_the_config():
    defaults = QuantOptions.from_config(CompressConfig())
    bare = QuantOptions(defaults.scheme)
    assert bare == defaults  # one default per option, CompressConfig's
    cfg = CompressConfig(scheme="int4", quant_group_size=32, actorder=False, blocksize=64,
                         percdamp=0.2, sequential_experts=False, segment_symbols=1024)
    q = QuantOptions.from_config(cfg)
    assert (q.actorder, q.blocksize, q.percdamp, q.sequential, q.segment_symbols) == (
        False, 64, 0.2, False, 1024)
    assert q.scheme.name == "int4"
    names = {f.name for f in dataclasses.fields(QuantOptions)} - {"scheme", "sequential"}
    assert names <= {f.name for f in dataclasses.fields(CompressConfig)}


def test_open_from_index_reads_nothing_and_matches(monkeypatch):
    from qmoe_ray.data import embedded_model_path
    from qmoe_ray.storage import checkpoint as ck

    src = str(embedded_model_path())

    ckpt = ck.open_checkpoint(src)
    index = ck.source_index(ckpt)
    assert pickle.loads(pickle.dumps(index)) == index
    assert ck.SourceIndex.from_json(index.to_json()) == index  # as the actors read it
    index = ck.SourceIndex.from_json(index.to_json())

    def no_reads(*a, **k):
        raise AssertionError("open_from_index read the source's headers")

    monkeypatch.setattr(ck, "_read_headers", no_reads)
    monkeypatch.setattr(ck, "_read_json", no_reads)
    again = ck.open_source(src, {}, index)
    assert again.names == ckpt.names and again.config == ckpt.config
    name = ckpt.names[0]
    assert again.info(name) == ckpt.info(name)
    assert again.read(name).equal(ckpt.read(name))


@pytest.mark.parametrize("command", [["compress"], ["eval"], ["export", "u", "o"],
                                     ["inspect", "u"]])
def test_one_storage_option_flag_for_every_command(command):
    from qmoe_ray.cli import build_parser, storage_options

    args = build_parser().parse_args([*command, "--storage-option", "endpoint_url=http://h:9",
                                      "--storage-option", 'client_kwargs={"region_name": "x"}',
                                      "--storage-option", "anon=true"])
    assert storage_options(args) == {"endpoint_url": "http://h:9", "anon": True,
                                     "client_kwargs": {"region_name": "x"}}


def test_compress_side_options_win_over_the_shared_ones():
    from qmoe_ray.cli import build_parser
    from qmoe_ray.job.cli import config_from_args

    args = build_parser().parse_args(["compress", "--storage-option", "anon=true",
                                      "--storage-option", "endpoint_url=e",
                                      "--output-option", "anon=false"])
    _, storage = config_from_args(args)
    assert storage.source == {"anon": True, "endpoint_url": "e"}
    assert storage.output == {"anon": False, "endpoint_url": "e"}
