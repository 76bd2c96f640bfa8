"""An expert that acts only on what an agent could know: it searches for objects it has not seen.

The Fast Downward planner sees the whole game state, so its plans walk straight to a hidden
object. Demonstrations from it teach a policy to guess, which a policy that only reads
observations cannot learn. The explorer follows the planner except where the planner would go
to a receptacle to take or use something there that the agent has not seen yet: then it
searches instead, visiting the receptacles that can hold the object (by ALFRED's
receptacle-object table) in the order the admissible actions list them, and opening closed ones.
An object of the wanted type in view at the current receptacle is taken at once, unless that
receptacle is where the plan puts it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import alfworld.gen.constants as alfred_constants

from empg_envs.alfworld import generator

_ARRIVE = re.compile(r"You arrive at (?P<r>[a-z]+ \d+)\.")
_CONTENTS = re.compile(r"(?:On the (?P<a>[a-z]+ \d+), you see|The (?P<b>[a-z]+ \d+) is open\. In it, you see)")
_OPENED = re.compile(r"You open the (?P<r>[a-z]+ \d+)\.")
_PUT = re.compile(r"^move [a-z]+ \d+ to (?P<r>[a-z]+ \d+)$")
_INTERACT = re.compile(r"^(?:take (?P<obj>[a-z]+) \d+ from|use (?P<lamp>[a-z]+) \d+)")


def _type_names() -> tuple[dict[str, str], dict[str, str]]:
    objects = {o for room in generator.ROOMS.values() for o in room.objects} | set(generator.LAMPS)
    receptacles = set(alfred_constants.VAL_RECEPTACLE_OBJECTS) | {
        r for room in generator.ROOMS.values() for r in room.receptacle_types
    }
    return {o.lower(): o for o in objects}, {r.lower(): r for r in receptacles}


_OBJECT_TYPES, _RECEPTACLE_TYPES = _type_names()


def _may_hold(receptacle: str, object_name: str) -> bool:
    """Whether a receptacle ("countertop 1") can hold an object type ("tomato"); unknown names
    may hold anything."""
    rtype = _RECEPTACLE_TYPES.get(receptacle.rsplit(" ", 1)[0])
    otype = _OBJECT_TYPES.get(object_name)
    if rtype is None or otype is None:
        return True
    if otype in generator.LAMPS:
        return rtype in generator.LAMP_HOLDERS
    return generator.can_contain(rtype, otype)


class Explorer:
    """Per-episode memory of which receptacles' contents the agent has seen."""

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self.location: str | None = None

    def observe(self, observation: str) -> None:
        if m := _ARRIVE.search(observation):
            self.location = m.group("r")
        if m := _CONTENTS.search(observation):
            self.seen.add(m.group("a") or m.group("b"))
        elif m := _OPENED.search(observation):
            self.seen.add(m.group("r"))

    def act(self, plan: Sequence[str], admissible: Sequence[str]) -> str:
        """The next action, given an optimal plan from the true state and the admissible actions."""
        wanted = self._wanted_object(plan)
        if wanted is None:
            return plan[0]
        name, receptacle = wanted
        destinations = {m.group("r") for a in plan if (m := _PUT.match(a))}
        for action in admissible:
            m = _INTERACT.match(action)
            wanted_here = m is not None and (m.group("obj") or m.group("lamp")) == name
            if wanted_here and not any(action.endswith(f"from {d}") for d in destinations):
                return action
        if receptacle in self.seen:
            return plan[0]
        here = self.location
        if here is not None and here not in self.seen and _may_hold(here, name) and f"open {here}" in admissible:
            return f"open {here}"
        for action in admissible:
            if action.startswith("go to "):
                target = action[len("go to ") :]
                if target not in self.seen and target != here and _may_hold(target, name):
                    return action
        return plan[0]

    @staticmethod
    def _wanted_object(plan: Sequence[str]) -> tuple[str, str] | None:
        """(object name, receptacle) when the plan's next leg goes to a receptacle to take or use
        an object there; None when the next leg needs no knowledge of hidden objects."""
        if not plan or not plan[0].startswith("go to "):
            return None
        receptacle = plan[0][len("go to ") :]
        for action in plan[1:]:
            if action.startswith("go to "):
                return None
            if m := _INTERACT.match(action):
                return (m.group("obj") or m.group("lamp")), receptacle
        return None
