"""What a compiled program's HLO text (`jax.stages.Compiled.as_text()`) says about communication:
its collectives (count, bytes) and whether given values are all-reduced over every device.

Pure text analysis, for any backend's optimised HLO (TPU's asynchronous `*-start`/`*-done` pairs
count once, at the start). A collective inside a loop body counts once per trip when XLA knows
the trip count (`known_trip_count`), else once.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict
from collections.abc import Iterable

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2, "f16": 2,
    "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}

_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\) -> .* \{$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.+?) ([\w\-]+)\((.*)$")
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([\d,]*)\]")
_OPERAND = re.compile(r"%([\w.\-]+)")


@dataclasses.dataclass(frozen=True)
class Instruction:
    name: str
    computation: str
    opcode: str
    shape: str  # the result's shape text, e.g. "(f32[4]{0}, f32[4]{0})"
    operands: tuple[str, ...]
    attributes: str  # everything after the operands: replica_groups, calls, metadata, ...

    @property
    def op_name(self) -> str:
        found = re.search(r'op_name="([^"]*)"', self.attributes)
        return found.group(1) if found else ""

    @property
    def nbytes(self) -> int:
        """Bytes of the result (every array of a tuple)."""
        return sum(DTYPE_BYTES.get(dtype, 4) * math.prod(int(n) for n in dims.split(",") if n)
                   for dtype, dims in _ARRAY.findall(self.shape))


def parse(text: str) -> list[Instruction]:
    """Every instruction of every computation of an HLO module's text."""
    out, computation = [], ""
    for line in text.splitlines():
        if header := _COMPUTATION.match(line.strip()):
            computation = header.group(1)
            continue
        found = _INSTRUCTION.match(line)
        if not found:
            continue
        name, shape, opcode, rest = found.groups()
        depth, end = 1, len(rest)
        for i, ch in enumerate(rest):  # the operand list ends at its matching parenthesis
            depth += {"(": 1, ")": -1}.get(ch, 0)
            if depth == 0:
                end = i
                break
        out.append(Instruction(name, computation, opcode, shape,
                               tuple(_OPERAND.findall(rest[:end])), rest[end + 1:]))
    return out


def _kind(opcode: str) -> str | None:
    base = opcode.removesuffix("-start")
    return base if base in COLLECTIVES and not opcode.endswith("-done") else None


def _trip_counts(instructions: Iterable[Instruction]) -> dict[str, int]:
    """computation -> how many times one execution of the program runs it (loop bodies)."""
    calls: dict[str, list[tuple[str, int]]] = defaultdict(list)  # callee -> [(caller, trips)]
    for ins in instructions:
        trips = 1
        if ins.opcode == "while":
            known = re.search(r'"known_trip_count":\{"n":"(\d+)"', ins.attributes)
            trips = int(known.group(1)) if known else 1
        for callee in re.findall(r"(?:body|calls|to_apply|condition)=%?([\w.\-]+)",
                                 ins.attributes):
            calls[callee].append((ins.computation, trips))

    def count(computation: str, seen: frozenset = frozenset()) -> int:
        callers = calls.get(computation)
        if not callers or computation in seen:
            return 1
        return max(trips * count(c, seen | {computation}) for c, trips in callers)

    return defaultdict(lambda: 1, {c: count(c) for c in calls})


@dataclasses.dataclass(frozen=True)
class Collective:
    count: int  # executions per run of the program
    bytes: int  # bytes of their results per run, per device


def collectives(text: str) -> dict[str, Collective]:
    """kind ("all-reduce", ...) -> count and result bytes per execution of the program."""
    instructions = parse(text)
    trips = _trip_counts(instructions)
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for ins in instructions:
        if kind := _kind(ins.opcode):
            n = trips[ins.computation]
            counts[kind][0] += n
            counts[kind][1] += n * ins.nbytes
    return {k: Collective(*counts[k]) for k in COLLECTIVES if k in counts}


def group_size(ins: Instruction) -> int | None:
    """Devices in each replica group of a collective, from its `replica_groups=` (explicit
    `{{0,1},{2,3}}`, iota `[2,2]<=[4]`, or mesh `mesh['x'=4,'y'=2] {'x'}` form)."""
    attrs = ins.attributes
    if found := re.search(r"replica_groups=\{\{([\d,]*)\}", attrs):
        return len(found.group(1).split(","))
    if found := re.search(r"replica_groups=\[(\d+),(\d+)\]<=", attrs):
        return int(found.group(2))
    if found := re.search(r"replica_groups=mesh\[([^\]]*)\] \{([^}]*)\}", attrs):
        sizes = dict(re.findall(r"'(\w+)'=(\d+)", found.group(1)))
        return math.prod(int(sizes[a]) for a in re.findall(r"'(\w+)'", found.group(2)))
    return None


def all_reduced_over(text: str, op_name_pattern: str, num_devices: int,
                     max_hops: int = 8) -> dict[str, bool]:
    """op_name -> whether that operation is all-reduced over all `num_devices` devices, for
    every op_name (metadata of the optimised HLO) matching `op_name_pattern` (a regex).

    True where an instruction of that name is such an all-reduce or a tuple element of one (the
    local part of a reduction can vanish, e.g. over one example per device), or its value
    reaches one within `max_hops` uses (a match inside a fusion stands for the fusion).
    """
    instructions = parse(text)
    by_name = {ins.name: ins for ins in instructions}
    users: dict[str, list[Instruction]] = defaultdict(list)
    fusion_of: dict[str, str] = {}
    for ins in instructions:
        for operand in ins.operands:
            users[operand].append(ins)
        if ins.opcode == "fusion" and (called := re.search(r"calls=%?([\w.\-]+)", ins.attributes)):
            fusion_of[called.group(1)] = ins.name

    def over_slice(ins: Instruction) -> bool:
        if ins.opcode == "all-reduce-done" and ins.operands and ins.operands[0] in by_name:
            ins = by_name[ins.operands[0]]  # the asynchronous pair's start holds the groups
        return _kind(ins.opcode) == "all-reduce" and group_size(ins) == num_devices

    pattern = re.compile(op_name_pattern)
    result: dict[str, bool] = {}
    for ins in instructions:
        if ins.opcode == "parameter" or not pattern.search(ins.op_name):
            continue
        reached = over_slice(ins) or (ins.opcode == "get-tuple-element" and any(
            over_slice(by_name[o]) for o in ins.operands if o in by_name))
        frontier = [by_name[fusion_of.get(ins.computation, ins.name)]]
        for _ in range(max_hops if not reached else 0):
            frontier = [u for f in frontier for u in users[f.name]]
            if any(over_slice(u) for u in frontier):
                reached = True
                break
        result[ins.op_name] = result.get(ins.op_name, False) or reached
    return result
