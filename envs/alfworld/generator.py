"""Procedural ALFRED-domain PDDL problems for the six ALFWorld task types.

A game is a random room (receptacles at their own locations, objects inside them, some
containers closed) plus one goal from alfworld's goal library. Everything is drawn from a
`random.Random` seeded by a string, so a (split, task type, index, attempt) always gives the
same problem, whatever the process or PYTHONHASHSEED.

Splits: a task's *pair* is (object type, target receptacle type), or (object type, lamp type)
for look_at_obj_in_light. Pairs in `UNSEEN_PAIRS` are held out for eval_unseen (which uses only
them); train and eval_seen use all other pairs and differ only in their random streams.

Engine facts this file relies on (checked on alfworld 0.4.2): ids are mangled THOR
ids (`Apple_bar_1`; a sink basin must be `Sink_bar_1_bar_SinkBasin` to render as "sinkbasin 1");
the agent starts at a location without a receptacle (else the intro changes); `canContain`
facts are needed by PutObject; a lamp must be `inReceptacle` to be usable; no target may start
where the goal would already hold.
"""

from __future__ import annotations

import dataclasses
import functools
import random
from typing import Any

import alfworld.gen.constants as alfred_constants
import alfworld.gen.goal_library as goal_library

#: Bumped whenever the output of this module changes, so cached games are regenerated.
GENERATOR_VERSION = 1

TASK_TYPES: tuple[str, ...] = (
    "pick_and_place_simple",
    "look_at_obj_in_light",
    "pick_clean_then_place_in_recep",
    "pick_heat_then_place_in_recep",
    "pick_cool_then_place_in_recep",
    "pick_two_obj_and_place",
)

# The domain hard-codes the appliance type of CleanObject, HeatObject and CoolObject.
APPLIANCE: dict[str, str] = {
    "pick_clean_then_place_in_recep": "SinkBasin",
    "pick_heat_then_place_in_recep": "Microwave",
    "pick_cool_then_place_in_recep": "Fridge",
}
_AFFORDANCE: dict[str, str] = {
    "pick_clean_then_place_in_recep": "Cleanable",
    "pick_heat_then_place_in_recep": "Heatable",
    "pick_cool_then_place_in_recep": "Coolable",
}
LAMPS: tuple[str, ...] = ("DeskLamp", "FloorLamp")
# Lamps stand on furniture that is never closed (ToggleObject needs the lamp in a receptacle).
LAMP_HOLDERS: tuple[str, ...] = ("Desk", "Dresser", "SideTable")
_OPEN_PROB: dict[str, float] = {"Cabinet": 0.3, "Drawer": 0.3}
#: How many object types other than the task's are scattered in a room: (fewest, most).
DEFAULT_DISTRACTORS: tuple[int, int] = (4, 7)

# Held out for eval_unseen: train and eval_seen never have a task on one of these pairs
# (distractor placements are unrestricted). Chosen so that each task type keeps both seen and
# unseen pairs, across all room kinds.
UNSEEN_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {
        ("Mug", "CoffeeMachine"),
        ("Apple", "DiningTable"),
        ("Potato", "GarbageCan"),
        ("Egg", "CounterTop"),
        ("Tomato", "SideTable"),
        ("Lettuce", "DiningTable"),
        ("Bread", "CounterTop"),
        ("Cup", "Shelf"),
        ("Plate", "Cabinet"),
        ("Pan", "StoveBurner"),
        ("Spoon", "Drawer"),
        ("Knife", "SideTable"),
        ("Cloth", "Toilet"),
        ("SoapBar", "Cabinet"),
        ("SoapBottle", "GarbageCan"),
        ("CellPhone", "Bed"),
        ("KeyChain", "Safe"),
        ("Book", "Desk"),
        ("Pillow", "ArmChair"),
        ("RemoteControl", "CoffeeTable"),
        ("Vase", "Shelf"),
        ("Pencil", "Drawer"),
        ("Book", "FloorLamp"),
        ("CD", "DeskLamp"),
        ("Watch", "DeskLamp"),
        ("AlarmClock", "FloorLamp"),
    }
)


@dataclasses.dataclass(frozen=True)
class RoomKind:
    """Receptacles always present, optional ones (3-5 drawn), and the object types that fit."""

    base: dict[str, tuple[int, int]]
    extras: dict[str, tuple[int, int]]
    objects: tuple[str, ...]

    @property
    def receptacle_types(self) -> frozenset[str]:
        return frozenset(self.base) | frozenset(self.extras)


ROOMS: dict[str, RoomKind] = {
    "Kitchen": RoomKind(
        base={"CounterTop": (1, 2), "Cabinet": (2, 5), "Drawer": (1, 3)},
        extras={
            "Fridge": (1, 1), "Microwave": (1, 1), "SinkBasin": (1, 1), "StoveBurner": (2, 4),
            "DiningTable": (1, 1), "GarbageCan": (1, 1), "CoffeeMachine": (1, 1),
            "Shelf": (1, 3), "SideTable": (1, 1),
        },
        objects=(
            "Apple", "Bowl", "Bread", "ButterKnife", "CellPhone", "CreditCard", "Cup",
            "DishSponge", "Egg", "Fork", "Kettle", "Knife", "Ladle", "Lettuce", "Mug", "Pan",
            "PepperShaker", "Plate", "Pot", "Potato", "SaltShaker", "SoapBottle", "Spatula",
            "Spoon", "Tomato", "WineBottle",
        ),
    ),
    "LivingRoom": RoomKind(
        base={"Sofa": (1, 1), "CoffeeTable": (1, 1), "SideTable": (1, 2)},
        extras={
            "ArmChair": (1, 2), "Shelf": (1, 3), "Drawer": (1, 3), "Cabinet": (1, 4),
            "GarbageCan": (1, 1), "DiningTable": (1, 1), "Ottoman": (1, 1), "Dresser": (1, 1),
            "TVStand": (1, 1), "Desk": (1, 1),
        },
        objects=(
            "Book", "Bowl", "Box", "Candle", "CellPhone", "CreditCard", "KeyChain", "Laptop",
            "Newspaper", "Pillow", "Plate", "RemoteControl", "Statue", "TissueBox", "Vase",
            "Watch", "WateringCan",
        ),
    ),
    "Bedroom": RoomKind(
        base={"Bed": (1, 1), "Drawer": (1, 4), "SideTable": (1, 2)},
        extras={
            "Desk": (1, 1), "Dresser": (1, 1), "Shelf": (1, 3), "GarbageCan": (1, 1),
            "Safe": (1, 1), "ArmChair": (1, 1), "Cabinet": (1, 2), "LaundryHamper": (1, 1),
        },
        objects=(
            "AlarmClock", "BaseballBat", "BasketBall", "Book", "Bowl", "Box", "CD", "CellPhone",
            "Cloth", "CreditCard", "KeyChain", "Laptop", "Mug", "Pen", "Pencil", "Pillow",
            "Statue", "TennisRacket", "TissueBox", "Vase", "Watch",
        ),
    ),
    "Bathroom": RoomKind(
        base={"CounterTop": (1, 1), "Cabinet": (1, 4), "SinkBasin": (1, 2), "Toilet": (1, 1)},
        extras={
            "Drawer": (1, 4), "GarbageCan": (1, 1), "Shelf": (1, 2), "HandTowelHolder": (1, 1),
            "ToiletPaperHanger": (1, 1), "Dresser": (1, 1), "Cart": (1, 1),
        },
        objects=(
            "Candle", "Cloth", "DishSponge", "HandTowel", "Plunger", "SoapBar", "SoapBottle",
            "SprayBottle", "TissueBox", "ToiletPaper",
        ),
    ),
}


#: Every object, receptacle and lamp name as the game text writes it ("saltshaker").
LEXICON: tuple[str, ...] = tuple(
    sorted(
        {name.lower() for room in ROOMS.values() for name in (*room.objects, *room.receptacle_types)}
        | {lamp.lower() for lamp in LAMPS}
    )
)


def can_contain(receptacle: str, obj: str) -> bool:
    return obj in alfred_constants.VAL_RECEPTACLE_OBJECTS.get(receptacle, ())


def _has_affordance(obj: str, affordance: str) -> bool:
    return obj in alfred_constants.VAL_ACTION_OBJECTS[affordance]


def _room_kinds(task_type: str) -> list[str]:
    return sorted(alfred_constants.GOALS_VALID[task_type])


def _start_receptacles(task_type: str, room: RoomKind, obj: str, parent: str) -> list[str]:
    """Receptacle types of `room` where a target of `obj` may start."""
    banned = {parent, APPLIANCE.get(task_type, "")}
    return sorted(r for r in room.receptacle_types - banned if can_contain(r, obj))


def _pair_rooms(task_type: str, obj: str, parent: str) -> list[str]:
    """Room kinds where the task (obj, parent) can be set up."""
    rooms = []
    for name in _room_kinds(task_type):
        room = ROOMS[name]
        if obj not in room.objects:
            continue
        if task_type != "look_at_obj_in_light":
            needed = {parent, APPLIANCE.get(task_type, parent)}
            if not needed <= room.receptacle_types or not can_contain(parent, obj):
                continue
        if _start_receptacles(task_type, room, obj, parent):
            rooms.append(name)
    return rooms


@functools.cache
def candidate_pairs(task_type: str) -> tuple[tuple[str, str], ...]:
    """All (object type, target type) pairs a task of this type can use, in any split."""
    if task_type not in TASK_TYPES:
        raise ValueError(f"unknown task type {task_type!r}")
    objects = sorted({o for name in _room_kinds(task_type) for o in ROOMS[name].objects})
    if task_type == "look_at_obj_in_light":
        targets = list(LAMPS)
    else:
        targets = sorted({r for name in _room_kinds(task_type) for r in ROOMS[name].receptacle_types})
        targets = [r for r in targets if r != APPLIANCE.get(task_type)]
    affordance = _AFFORDANCE.get(task_type)
    return tuple(
        (obj, target)
        for obj in objects
        if affordance is None or _has_affordance(obj, affordance)
        for target in targets
        if _pair_rooms(task_type, obj, target)
    )


def split_pairs(split: str, task_type: str) -> list[tuple[str, str]]:
    """The pairs tasks of `task_type` in `split` are drawn from."""
    unseen = split == "eval_unseen"
    return [p for p in candidate_pairs(task_type) if (p in UNSEEN_PAIRS) == unseen]


@dataclasses.dataclass(frozen=True)
class Problem:
    """One generated game before it is played: PDDL problem, task text and ALFRED metadata."""

    pddl_problem: str
    task_desc: str
    traj_data: dict[str, Any]


def _mangle(name: str, n: int) -> str:
    # The demangler renders "Sink_bar_1_bar_SinkBasin" as "sinkbasin 1"; "SinkBasin_bar_1" would
    # become "sinkbasinbasin 1", which the handcoded expert cannot find.
    if name == "SinkBasin":
        return f"Sink_bar_{n}_bar_SinkBasin"
    return f"{name}_bar_{n}"


def task_id(split: str, task_type: str, index: int) -> str:
    """The stable id of generated task `index` of `task_type` in `split`."""
    return f"alfworld/{split}/{task_type}/{index:06d}"


def _draw_receptacles(
    rng: random.Random, task_type: str, room: RoomKind, obj: str, parent: str, toggle: str
) -> dict[str, str]:
    """Receptacle id -> type: the room's base furniture, 3-5 extras, and what the task needs."""
    counts = {r: rng.randint(*span) for r, span in sorted(room.base.items())}
    extras = sorted(room.extras)
    for r in rng.sample(extras, rng.randint(3, min(5, len(extras)))):
        counts[r] = rng.randint(*room.extras[r])
    required = [r for r in (parent, APPLIANCE.get(task_type, "")) if r]
    if toggle:
        required.append(rng.choice([h for h in LAMP_HOLDERS if h in room.receptacle_types]))
    for r in required:
        counts.setdefault(r, rng.randint(*room.extras.get(r, (1, 1))))
    start_types = _start_receptacles(task_type, room, obj, parent)
    if not set(start_types) & set(counts):
        counts[rng.choice(start_types)] = 1
    return {_mangle(r, n): r for r in sorted(counts) for n in range(1, counts[r] + 1)}


def _place_objects(
    rng: random.Random, task_type: str, room: RoomKind, obj: str, parent: str, toggle: str,
    recep_type: dict[str, str], distractors: tuple[int, int],
) -> dict[str, str]:
    """Object id -> receptacle id: the targets, the lamp, and `distractors` (a range) other
    object types, one or two of each."""

    def instances_of(types: set[str]) -> list[str]:
        return sorted(rid for rid, r in recep_type.items() if r in types)

    placement: dict[str, str] = {}
    start = instances_of(set(_start_receptacles(task_type, room, obj, parent)))
    n_targets = rng.randint(2, 3) if task_type == "pick_two_obj_and_place" else rng.randint(1, 2)
    for n in range(1, n_targets + 1):
        placement[_mangle(obj, n)] = rng.choice(start)
    if toggle:
        placement[_mangle(toggle, 1)] = rng.choice(instances_of(set(LAMP_HOLDERS)))
    present = set(recep_type.values())
    others = [o for o in room.objects if o != obj]
    fewest, most = distractors
    for other in rng.sample(others, rng.randint(min(fewest, len(others)), min(most, len(others)))):
        fits = instances_of({r for r in present if can_contain(r, other)})
        for n in range(1, rng.randint(1, 2) + 1) if fits else ():
            placement[_mangle(other, n)] = rng.choice(fits)
    return placement


def generate(
    split: str, task_type: str, index: int, attempt: int = 0,
    distractors: tuple[int, int] = DEFAULT_DISTRACTORS,
) -> Problem:
    """The problem for task `index` of `task_type` in `split` (`attempt` > 0: a resample), with
    between `distractors[0]` and `distractors[1]` object types besides the task's."""
    rng = random.Random(f"alfworld-gen-v{GENERATOR_VERSION}:{split}:{task_type}:{index}:{attempt}")
    pairs = split_pairs(split, task_type)
    if not pairs:
        raise ValueError(f"no {task_type} pairs in split {split!r}")
    obj, target = rng.choice(pairs)
    room_name = rng.choice(_pair_rooms(task_type, obj, target))
    room = ROOMS[room_name]
    look = task_type == "look_at_obj_in_light"
    parent, toggle = ("", target) if look else (target, "")

    recep_type = _draw_receptacles(rng, task_type, room, obj, parent, toggle)
    placement = _place_objects(rng, task_type, room, obj, parent, toggle, recep_type, distractors)
    opened = sorted(r for r in recep_type if rng.random() < _OPEN_PROB.get(recep_type[r], 0.0))
    locations = {rid: f"loc_bar_{i}" for i, rid in enumerate(recep_type, start=1)}
    # alfworld's own add_task_to_grammar picks the template with the global `random`.
    task_desc = rng.choice(goal_library.gdict[task_type]["templates"]).format(
        obj=obj.lower(), recep=parent.lower(), toggle=toggle.lower(), mrecep=""
    )
    pddl = _write_pddl(task_type, obj, parent, toggle, recep_type, placement, opened, locations)
    traj_data = {
        "task_type": task_type,
        "task_id": task_id(split, task_type, index),
        "scene": {"room": room_name, "attempt": attempt},
        "pddl_params": {
            "object_target": obj,
            "parent_target": parent,
            "toggle_target": toggle,
            "mrecep_target": "",
            "object_sliced": False,
        },
    }
    return Problem(pddl_problem=pddl, task_desc=task_desc, traj_data=traj_data)


def _object_type(oid: str) -> str:
    return oid.split("_bar_")[0]


def _write_pddl(
    task_type: str,
    obj: str,
    parent: str,
    toggle: str,
    recep_type: dict[str, str],
    placement: dict[str, str],
    opened: list[str],
    locations: dict[str, str],
) -> str:
    objects = sorted(placement)
    otypes = sorted({_object_type(o) for o in objects})
    rtypes = sorted(set(recep_type.values()))
    decls = ["agent1 - agent"]
    decls += [f"{t}Type - otype" for t in otypes]
    decls += [f"{t}Type - rtype" for t in rtypes]
    decls += [f"{o} - object" for o in objects]
    decls += [f"{r} - receptacle" for r in sorted(recep_type)]
    decls += ["loc_bar_0 - location"] + [f"{locations[r]} - location" for r in sorted(recep_type)]

    facts = ["(atLocation agent1 loc_bar_0)"]
    for rid in sorted(recep_type):
        rtype = recep_type[rid]
        facts += [f"(receptacleType {rid} {rtype}Type)", f"(receptacleAtLocation {rid} {locations[rid]})"]
        if rtype in alfred_constants.OPENABLE_CLASS_LIST:
            facts.append(f"(openable {rid})")
        if rid in opened:
            facts.append(f"(opened {rid})")
    for oid in objects:
        otype = _object_type(oid)
        rid = placement[oid]
        facts += [
            f"(objectType {oid} {otype}Type)",
            f"(inReceptacle {oid} {rid})",
            f"(objectAtLocation {oid} {locations[rid]})",
        ]
        if otype not in LAMPS:
            facts.append(f"(pickupable {oid})")
        if otype in alfred_constants.MOVABLE_RECEPTACLES:
            facts.append(f"(isReceptacleObject {oid})")
        for affordance, predicate in (
            ("Cleanable", "cleanable"), ("Heatable", "heatable"), ("Coolable", "coolable"),
            ("Sliceable", "sliceable"), ("Toggleable", "toggleable"),
        ):
            if _has_affordance(otype, affordance):
                facts.append(f"({predicate} {oid})")
    facts += [
        f"(canContain {r}Type {o}Type)" for r in rtypes for o in otypes if can_contain(r, o)
    ]
    # The library writes types as `?r # receptacle` and its text closes the `(define`.
    goal = goal_library.gdict[task_type]["pddl"].format(
        obj=obj, recep=parent, toggle=toggle, mrecep=""
    ).replace("#", "-")
    return (
        "(define (problem alfworld_generated)\n(:domain alfred)\n(:objects\n"
        + "\n".join(f"    {d}" for d in decls)
        + "\n)\n(:init\n"
        + "\n".join(f"    {f}" for f in facts)
        + "\n)\n"
        + goal
        + "\n"
    )
