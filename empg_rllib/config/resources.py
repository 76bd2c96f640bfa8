"""The resource plan of an experiment, and whether it fits a cluster. Pure: no Ray.

`plan_of(exp)` lists the actors Ray will start (remote env runners and learners) with what each
reserves, read from the experiment's `resources:` section; `fit_plan(plan, nodes)` places them
on a list of node resource dicts, as Ray would, and returns the problems in words. The nodes come
from a running cluster (`cluster.live_nodes`) or from the node types of a `ray up` config
(`nodes_of_cluster_config`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from empg_rllib.config.schema import Experiment

#: The experiment key that sets each role's resources, and the one that sets how many.
ROLES = {
    "env runner": ("resources.env_runner", "num_env_runners"),
    "learner": ("resources.learner", "num_learners"),
}


@dataclass(frozen=True)
class ActorGroup:
    """`count` actors of one role, each reserving `resources` (Ray's names: CPU, GPU, custom)."""

    role: str
    count: int
    resources: dict[str, float]


@dataclass(frozen=True)
class Plan:
    """What an experiment asks Ray for. `in_driver`: roles that run inside the driver process
    (a count of 0), for which Ray reserves nothing."""

    name: str
    model: str
    engine: str
    env: str
    learner_backend: str
    actors: tuple[ActorGroup, ...]
    in_driver: tuple[str, ...]

    def totals(self) -> dict[str, float]:
        """Every resource the actors reserve together."""
        total: dict[str, float] = {}
        for group in self.actors:
            for name, amount in group.resources.items():
                total[name] = total.get(name, 0.0) + amount * group.count
        return total

    def lines(self) -> list[str]:
        """The plan in words, one line per item, for `empg train --dry-run`."""
        out = [
            f"experiment       {self.name}",
            f"model            {self.model}",
            f"engine           {self.engine}",
            f"env              {self.env}",
            f"learner backend  {self.learner_backend}",
        ]
        for group in self.actors:
            key, count_key = ROLES[group.role]
            out.append(
                f"{group.role + 's':<17}{group.count} x {{{format_resources(group.resources)}}}  ({count_key}, {key})"
            )
        for role in self.in_driver:
            key, count_key = ROLES[role]
            out.append(f"{role + 's':<17}one in the driver process ({count_key}: 0; Ray reserves nothing for it)")
        out.append(f"{'total':<17}{format_resources(self.totals()) or 'nothing'} (reserved by the actors above)")
        return out


def format_resources(resources: Mapping[str, float]) -> str:
    return ", ".join(f"{name}: {amount:g}" for name, amount in resources.items())


def plan_of(exp: Experiment) -> Plan:
    """The actors `exp` makes Ray start and what each reserves."""
    counts = {"env runner": exp.num_env_runners, "learner": exp.num_learners}
    settings = {"env runner": exp.resources.env_runner, "learner": exp.resources.learner}
    backend = exp.learner_backend
    if backend == "deepspeed":
        backend += f" (ZeRO stage {exp.deepspeed.get('zero_optimization', {}).get('stage', 0)})"
    if exp.lora is not None:
        backend += f", LoRA r={exp.lora.r}"
    return Plan(
        name=exp.name,
        model=exp.model,
        engine=exp.engine,
        env=exp.env if exp.agent is None else f"{exp.env}, played by agent {exp.agent!r} through the runners' chat endpoint",
        learner_backend=backend,
        actors=tuple(
            ActorGroup(role, counts[role], settings[role].ray_resources()) for role in ROLES if counts[role]
        ),
        in_driver=tuple(role for role in ROLES if not counts[role]),
    )


def fit_plan(
    plan: Plan, nodes: Sequence[Mapping[str, float]], names: Sequence[str] | None = None
) -> list[str]:
    """Whether `plan`'s actors fit on `nodes` (each node's total resources, Ray's names, e.g.
    {"CPU": 8, "GPU": 1, "vllm_runner": 1}); returns the problems in words, [] when it fits.
    `names` label the nodes in the messages (default "node 0", "node 1", ...).

    Each actor needs all its resources on one node. Checked in this order, stopping at the
    first kind of problem found: a role no single node can hold (naming the resource no node
    has enough of), a resource the plan needs more of than all nodes have together, and last
    the actors left over when they are placed largest first, as Ray would place them one by
    one. Nodes are taken as given: for an autoscaling cluster pass every node it may grow to.
    """
    names = list(names) if names is not None else [f"node {i}" for i in range(len(nodes))]
    if len(names) != len(nodes):
        raise ValueError(f"{len(names)} names for {len(nodes)} nodes")
    alone = [problem for group in plan.actors if (problem := _fits_alone(group, nodes, names))]
    if alone:
        return alone
    supply: dict[str, float] = {}
    for node in nodes:
        for name, amount in node.items():
            supply[name] = supply.get(name, 0.0) + float(amount)
    short = [
        f"the plan reserves {format_resources({name: amount})} in all ({_who_needs(plan, name)}); "
        f"the nodes have {supply.get(name, 0.0):g}"
        for name, amount in plan.totals().items()
        if amount > supply.get(name, 0.0) + 1e-9
    ]
    if short:
        return short
    return _pack(plan, nodes)


def _fits_alone(group: ActorGroup, nodes: Sequence[Mapping[str, float]], names: Sequence[str]) -> str | None:
    """Why no single node can hold one actor of `group`, or None."""
    if any(_holds(node, group.resources) for node in nodes):
        return None
    key, _ = ROLES[group.role]
    need = f"each {group.role} ({key}) reserves {{{format_resources(group.resources)}}}"
    missing = []
    for name, amount in group.resources.items():
        best = max(range(len(nodes)), key=lambda i: float(nodes[i].get(name, 0.0)), default=None)
        have = float(nodes[best].get(name, 0.0)) if best is not None else 0.0
        if have < amount:
            missing.append(f"{name} (the most on one node is {have:g}{f', on {names[best]}' if have else ''})")
    if missing:
        return f"{need}, but no node has enough {' or '.join(missing)}"
    return f"{need}, but no node has all of it at once"


def _holds(free: Mapping[str, float], resources: Mapping[str, float]) -> bool:
    return all(float(free.get(name, 0.0)) + 1e-9 >= amount for name, amount in resources.items())


def _who_needs(plan: Plan, resource: str) -> str:
    return ", ".join(
        f"{group.count} {group.role}{'s' if group.count > 1 else ''} x {group.resources[resource]:g}"
        for group in plan.actors
        if resource in group.resources
    )


def _pack(plan: Plan, nodes: Sequence[Mapping[str, float]]) -> list[str]:
    """First-fit, scarcest demands first (custom resources and GPUs before CPUs): the actors
    of each role that find no node with room left."""
    free = [{name: float(amount) for name, amount in node.items()} for node in nodes]

    def scarcity(group: ActorGroup) -> tuple[float, float, float]:
        custom = sum(v for k, v in group.resources.items() if k not in ("CPU", "GPU"))
        return (custom, group.resources.get("GPU", 0.0), group.resources.get("CPU", 0.0))

    problems = []
    for group in sorted(plan.actors, key=scarcity, reverse=True):
        placed = 0
        for _ in range(group.count):
            node = next((n for n in free if _holds(n, group.resources)), None)
            if node is None:
                break
            for name, amount in group.resources.items():
                node[name] -= amount
            placed += 1
        if placed < group.count:
            key, _ = ROLES[group.role]
            scarce = [
                name for name, amount in group.resources.items() if not any(n.get(name, 0.0) + 1e-9 >= amount for n in free)
            ]
            problems.append(
                f"only {placed} of {group.count} {group.role}s ({key}: {{{format_resources(group.resources)}}}) "
                f"fit beside the other actors: the nodes run out of "
                f"{', '.join(scarce) if scarce else 'room for all of it on one node'}"
            )
    return problems


def nodes_of_cluster_config(config: Mapping[str, Any]) -> tuple[list[dict[str, float]], list[str]]:
    """The nodes a `ray up` config can grow to, with their names: the head node once and each
    worker node type `max_workers` times (its own, capped by the cluster's). Resources are what
    each type's `resources:` declares (the autoscaler would detect undeclared CPUs and GPUs from
    the instance type; a plan is checked against declared ones only). The cluster-wide
    `max_workers` also caps the sum over types, which this does not model."""
    types = config.get("available_node_types")
    if not isinstance(types, Mapping) or not types:
        raise ValueError("the cluster config has no 'available_node_types'")
    head = config.get("head_node_type")
    if head not in types:
        raise ValueError(f"the cluster config's head_node_type {head!r} is not in available_node_types")
    cap = config.get("max_workers")
    nodes, names = [], []
    for type_name, spec in types.items():
        copies = 1 if type_name == head else spec.get("max_workers", cap if cap is not None else 0)
        if type_name != head and cap is not None:
            copies = min(copies, cap)
        resources = {k: float(v) for k, v in (spec.get("resources") or {}).items()}
        for i in range(copies):
            nodes.append(dict(resources))
            names.append(type_name if type_name == head else f"{type_name} #{i + 1}")
    return nodes, names
