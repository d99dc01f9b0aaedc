"""Every cluster-launcher YAML in cluster/ is one that Ray accepts."""

import json
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER = Path(__file__).resolve().parents[2] / "cluster"
FILES = sorted(CLUSTER.glob("*.yaml"))
SCHEMA = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def test_cluster_folder_holds_both_configs():
    assert {p.name for p in FILES} >= {"config.yaml", "local.yaml"}


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_validates_against_rays_schema(path):
    jsonschema.validate(yaml.safe_load(path.read_text()), SCHEMA)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_ray_up_would_accept_it(path):
    """Ray's own preparation (defaults merged, local provider expanded) and check."""
    config = prepare_config(yaml.safe_load(path.read_text()))
    validate_config(config)
    assert config["file_mounts"], "the package must reach the nodes through file_mounts"


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_header_gives_the_commands_and_the_time(path):
    lines = path.read_text().splitlines()
    header = "\n".join(line for line in lines[: next(i for i, line in enumerate(lines)
                                                     if not line.startswith("#"))])
    assert lines[0].startswith("# ")
    for command in (f"ray up -y cluster/{path.name}", f"ray submit cluster/{path.name} search.py",
                    "ray dashboard", "qlnas tensorboard", f"ray down -y cluster/{path.name}"):
        assert command in header, f"{path.name}: the header lacks `{command}`"
    assert "Time:" in header and "minutes" in header


def test_aws_workers_have_eight_gpus_and_the_venv_is_on_path():
    config = yaml.safe_load((CLUSTER / "config.yaml").read_text())
    gpu = [t for name, t in config["available_node_types"].items()
           if name != config["head_node_type"]]
    assert [t["node_config"]["InstanceType"] for t in gpu] == ["p4d.24xlarge"]
    assert "make setup" in " ".join(config["setup_commands"])
    assert ".venv/bin" in config["setup_commands"][-1]
