"""Reading compiled programs' HLO text (`jitted.lower(...).compile().as_text()`): their
computations, whether their collectives run in one order (`mesh.collectives.ordering`),
and which run asynchronously beside compute (`overlap`)."""

from __future__ import annotations

import re

COLLECTIVE_KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_HEADER = re.compile(r"^(ENTRY )?%(?P<name>[^\s(]+) \(")


def computations(hlo_text: str) -> tuple[dict[str, list[str]], str]:
    """{computation name: its instruction lines} and the entry computation's name."""
    bodies: dict[str, list[str]] = {}
    entry, current = "", None
    for line in hlo_text.splitlines():
        header = _HEADER.match(line)
        if header and line.rstrip().endswith("{"):
            current = header["name"]
            bodies[current] = []
            entry = current if header[1] else entry
        elif line.startswith("}"):
            current = None
        elif current is not None:
            bodies[current].append(line)
    return bodies, entry


_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%(?P<name>[^\s=]+)\s*=\s*(?P<rest>.*)$")
# The result type: a tuple, or one token (TPU and GPU layouts hold parentheses: "T(8,128)").
_OPCODE = re.compile(r"^(?:\([^=]*?\)|\S+)\s+(?P<op>[a-z][a-z0-9-]*)\((?P<args>.*)$")
_OPERAND = re.compile(r"%([^\s,(){}]+)")
_CALLS = re.compile(r"\b(?:calls|body|condition|to_apply|true_computation|false_computation)=%([^\s,]+)")
_BRANCH_LIST = re.compile(r"branch_computations=\{([^}]*)\}")
_COMMENT = re.compile(r"/\*.*?\*/")
# What a collective carries, from the scope it runs under (`mesh.collectives.tagged`).
PURPOSE = re.compile(r'op_name="[^"]*\bcomm_(?P<purpose>[a-z_]+)/')
# Instructions that move no data through the device's compute units.
_BOOKKEEPING = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "opt-barrier"}


def unordered_collectives(hlo_text: str) -> list[tuple[str, str]]:
    """Pairs of collectives in a compiled program (`compiled.as_text()`) that no data
    dependency orders: consecutive collectives (or calls of computations holding some,
    like a conditional) in schedule order, the second not reached from the first.
    Empty when every computation's collectives form one chain."""
    parsed = _parse(hlo_text)
    holds: dict[str, bool] = {}

    def holds_collectives(name: str) -> bool:
        if name not in holds:
            holds[name] = False  # recursion guard
            holds[name] = any(
                _base(op) in COLLECTIVE_KINDS or any(holds_collectives(c) for c in called)
                for _, op, _, called in parsed.get(name, ())
            )
        return holds[name]

    broken = []
    for name, instructions in parsed.items():
        if not holds_collectives(name):
            continue
        operands = {inst: deps for inst, _, deps, _ in instructions}
        members = [
            inst
            for inst, op, _, called in instructions
            if _base(op) in COLLECTIVE_KINDS or any(holds_collectives(c) for c in called)
        ]
        for first, second in zip(members, members[1:]):
            if not _reaches(operands, second, first):
                broken.append((first, second))
    return broken


def _base(op: str) -> str:
    return op.removesuffix("-start").removesuffix("-done")


def _parse(hlo_text: str) -> dict[str, list[tuple[str, str, list[str], list[str]]]]:
    """{computation: [(instruction, opcode, operands, called computations)]} in order."""
    bodies, _ = computations(hlo_text)
    return {name: [i for i in map(_instruction, lines) if i] for name, lines in bodies.items()}


def _instruction(line: str) -> tuple[str, str, list[str], list[str]] | None:
    match = _INSTRUCTION.match(_COMMENT.sub("", line))
    opcode = _OPCODE.match(match["rest"]) if match else None
    if not opcode:
        return None
    args, op = opcode["args"], opcode["op"]
    # Operands end where the attributes (", name=...") begin.
    operand_text = args.split("), ", 1)[0] if "), " in args else args
    called = _CALLS.findall(args)
    branches = _BRANCH_LIST.search(args)
    if branches:
        called += [b.strip().lstrip("%") for b in branches[1].split(",")]
    # An optimization barrier only aliases its operands: it orders nothing at run time.
    deps = [] if op == "opt-barrier" else _OPERAND.findall(operand_text)
    return match["name"], op, deps, called


def _reaches(operands: dict[str, list[str]], start: str, target: str) -> bool:
    """Whether `start` depends on `target` through operands."""
    seen, stack = set(), [start]
    while stack:
        node = stack.pop()
        for dep in operands.get(node, ()):
            if dep == target:
                return True
            if dep not in seen:
                seen.add(dep)
                stack.append(dep)
    return False


def overlap(hlo_text: str) -> list[dict]:
    """Every collective of a compiled, scheduled program (on GPU and TPU a computation's
    instructions are listed in schedule order), one record each: its `kind`, `purpose`
    (`mesh.collectives.tagged`, "" if none), `computation`, whether it sits in a
    conditional's branch (`in_branch`: its start and done cannot leave it), whether it
    runs asynchronously (a -start/-done pair) and, if so, how many compute instructions
    the schedule places between its start and done (`overlapped`: what it can hide
    behind)."""
    parsed = _parse(hlo_text)
    lines = {
        name: [_COMMENT.sub("", line) for line in body] for name, body in computations(hlo_text)[0].items()
    }
    branches = set()
    for instructions in parsed.values():
        for _, op, _, called in instructions:
            if op == "conditional":
                branches.update(called)
    branches = _closure(parsed, branches)
    out = []
    for name, instructions in parsed.items():
        purpose_of = {i: PURPOSE.search(line) for i, line in zip(_names(lines[name]), lines[name])}
        for position, (inst, op, _, _) in enumerate(instructions):
            if _base(op) not in COLLECTIVE_KINDS or op.endswith("-done"):
                continue
            found = purpose_of.get(inst)
            record = {
                "kind": _base(op),
                "purpose": found["purpose"] if found else "",
                "computation": name,
                "in_branch": name in branches,
                "async": op.endswith("-start"),
                "overlapped": 0,
            }
            if record["async"]:
                record["overlapped"] = _compute_until_done(instructions, position)
            out.append(record)
    return out


def _names(lines: list[str]) -> list[str | None]:
    return [m["name"] if (m := _INSTRUCTION.match(line)) else None for line in lines]


def _closure(parsed: dict, names: set[str]) -> set[str]:
    """`names` and every computation they call, transitively."""
    seen, stack = set(names), list(names)
    while stack:
        for _, _, _, called in parsed.get(stack.pop(), ()):
            for c in called:
                if c not in seen:
                    seen.add(c)
                    stack.append(c)
    return seen


def _compute_until_done(instructions: list, start: int) -> int:
    """Compute instructions scheduled after the async start at `start` and before its done."""
    name = instructions[start][0]
    count = 0
    for _, op, deps, _ in instructions[start + 1 :]:
        if op.endswith("-done") and name in deps:
            return count
        if op not in _BOOKKEEPING and not op.endswith(("-start", "-done")):
            count += 1
    return count
