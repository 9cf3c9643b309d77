"""``cluster.yaml`` against the cluster-launcher schema shipped in the installed ray wheel, plus
what the schema cannot say: a CPU-only head, a GPU worker type with disk for object spilling,
setup that installs this package, and ``ray start`` flags that exist in this Ray."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_validates_against_the_ray_schema(config):
    jsonschema = pytest.importorskip("jsonschema")  # installed with ray[default]
    import ray.autoscaler
    from ray.autoscaler._private.util import validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    validate_config(config)  # the launcher's own checks (head type, min/max workers, ...)
    bad = {**config, "available_node_types": {"x": {"node_config": {}}}}
    with pytest.raises(jsonschema.ValidationError):  # the schema does reject things
        jsonschema.validate(bad, schema)


def test_node_types(config):
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert not head["resources"].get("GPU") and head["resources"].get("CPU") == 0
    gpu = [t for name, t in types.items() if t["resources"].get("GPU", 0) >= 1]
    assert gpu, "no GPU worker type"
    for t in gpu:
        assert t["max_workers"] >= 1
        disk = t["node_config"]["BlockDeviceMappings"][0]["Ebs"]["VolumeSize"]
        assert disk >= 500, "GPU workers need disk for object spilling"
        assert t["node_config"].get("IamInstanceProfile"), "workers need S3 access"


def test_setup_installs_this_package_and_start_flags_exist(config):
    from ray.scripts.scripts import start

    mounts = config["file_mounts"]
    remote = next(r for r, local in mounts.items() if local == ".")
    setup = " ".join(config["setup_commands"])
    assert re.search(r"pip install .*-e .*qmoe-ray\[gpu\]", setup)
    assert remote.lstrip("~/") in setup
    known = {opt for p in start.params for opt in p.opts}
    for cmd in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        if "ray start" not in cmd:
            continue
        flags = [a.split("=")[0] for a in shlex.split(cmd.split("ray start", 1)[1])
                 if a.startswith("--")]
        assert flags and set(flags) <= known, set(flags) - known
