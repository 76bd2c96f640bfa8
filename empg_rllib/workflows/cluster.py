"""What a run needs to know about the Ray cluster it joins: the nodes (for `empg train --dry-run`)
and whether every node sees the model and run directories (checked before any actor starts).

Model and run directories on a cluster live on shared storage (NFS, EFS, Filestore, a bucket
mounted by FUSE) at the same path on every node: env runners and learners load the model from
that path on their own node, and learners write and read checkpoint shards there.
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

import ray
import yaml

from empg_rllib.config.resources import nodes_of_cluster_config

logger = logging.getLogger(__name__)

class NodePathError(FileNotFoundError):
    """A node of the cluster cannot see the model or run directory; the message names both."""


#: How long the path check waits for a node's answer before going on without it.
CHECK_TIMEOUT_S = 120.0


def live_nodes(address: str | None = None) -> tuple[list[dict[str, float]], list[str]]:
    """(total resources, name) of every alive node of the cluster at `address`: a dashboard
    address (http://127.0.0.1:8265 through `ray dashboard`, what `ray job submit` uses), a GCS
    address (head:6379) or None for $RAY_ADDRESS. Reads Ray's state API; starts nothing on the cluster."""
    from ray.util.state import list_nodes

    nodes = list_nodes(address=address, filters=[("state", "=", "ALIVE")], limit=10_000)
    return (
        [{k: float(v) for k, v in node.resources_total.items()} for node in nodes],
        [f"{'head ' if node.is_head_node else ''}node {node.node_ip} ({node.node_id[:8]})" for node in nodes],
    )


def nodes_to_check(
    address: str | None, cluster_yaml: str | None
) -> tuple[list[dict[str, float]], list[str], str] | None:
    """(nodes' resources, their names, a description) to check a resource plan against: the
    node types of a `ray up` config, else the alive nodes of the cluster at `address`; None with
    neither. A config without node types raises ValueError."""
    if cluster_yaml:
        nodes, names = nodes_of_cluster_config(yaml.safe_load(Path(cluster_yaml).read_text()))
        return nodes, names, f"the node types of {cluster_yaml} (each up to its max_workers)"
    if address:
        nodes, names = live_nodes(address)
        return nodes, names, f"the {len(nodes)} alive node(s) of the cluster at {address}"
    return None


@ray.remote(num_cpus=0)
def _what_node_sees(model_dir: str, probe: str | None, token: str | None) -> list[str]:
    """Runs on one node: the paths it cannot see, in words."""
    missing = []
    if not (Path(model_dir) / "config.json").is_file():
        missing.append(f"the model directory {model_dir} (no config.json there)")
    if probe is not None:
        try:
            seen = Path(probe).read_text()
        except OSError:
            seen = None
        if seen != token:
            missing.append(f"the run directory {Path(probe).parent} (a file the driver just wrote there is missing)")
    return missing


def check_nodes_see(model_dir: str | Path, shared_dir: str | Path | None = None) -> None:
    """Fail before any actor starts when another alive node of the cluster cannot read
    `model_dir`, or cannot read a file the driver writes into `shared_dir` (the run directory,
    which the learners write checkpoints into on their own nodes). One zero-CPU task per other
    node; nothing to do on a single-node Ray. Nodes that an autoscaler adds later are checked
    by the actors themselves when they load the model."""
    if not ray.is_initialized():
        return
    here = ray.get_runtime_context().get_node_id()
    others = [n for n in ray.nodes() if n["Alive"] and n["NodeID"] != here]
    if not others:
        return
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = token = None
    if shared_dir is not None:
        token = uuid.uuid4().hex
        probe = Path(shared_dir) / f".empg-shared-check-{token}"
        probe.write_text(token)
    try:
        refs = {
            _what_node_sees.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
            ).remote(str(model_dir), str(probe) if probe else None, token): node
            for node in others
        }
        done, pending = ray.wait(list(refs), num_returns=len(refs), timeout=CHECK_TIMEOUT_S)
        problems = [
            f"node {refs[ref]['NodeManagerAddress']} ({refs[ref]['NodeID'][:8]}) cannot see {what}"
            for ref in done
            for what in ray.get(ref)
        ]
    finally:
        if probe is not None:
            probe.unlink(missing_ok=True)
    if pending:
        logger.warning(
            "%d node(s) did not answer the path check within %.0f s: %s",
            len(pending), CHECK_TIMEOUT_S, ", ".join(refs[r]["NodeManagerAddress"] for r in pending),
        )
    if problems:
        raise NodePathError(
            "; ".join(problems)
            + ". On a cluster, model and run directories must be on storage every node mounts at the same path."
        )
