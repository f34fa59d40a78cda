"""Reading compiled programs' HLO text (`jitted.lower(...).compile().as_text()`): their
computations, and whether their collectives run in one order
(`mesh.collectives.ordering`)."""

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
_OPCODE = re.compile(r"^(?:\([^=]*?\)|[^\s(]+)\s+(?P<op>[a-z][a-z0-9-]*)\((?P<args>.*)$")
_OPERAND = re.compile(r"%([^\s,(){}]+)")
_CALLS = re.compile(r"\b(?:calls|body|condition|to_apply|true_computation|false_computation)=%([^\s,]+)")
_BRANCH_LIST = re.compile(r"branch_computations=\{([^}]*)\}")
_COMMENT = re.compile(r"/\*.*?\*/")


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
