"""The import direction of docs/INTERNALS.md: process -> capabilities -> shared ground -> hw.

Read from the source with ``ast`` (imports inside functions count too), so a lazy import cannot
slip a backwards arrow past the check.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROCESS = {"agent.cli", "agent.service", "agent.demo", "agent.statusfile", "agent.sdnotify", "agent.__main__"}
GROUND = {"agent", "agent.config", "agent.state", "agent.errors", "agent.fsutil", "agent.logs", "agent.clock",
          "agent.wakeup", "agent.signal_relay", "agent.cmdline"}
CAPABILITIES = ("agent.signin", "agent.telemetry", "agent.mqtt", "agent.panel")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if is_module(sub) else node.module)
    return {name for name in found if name.split(".")[0] in ("agent", "hw")}


def is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def room(name: str) -> str:
    """The room a module of ours lives in."""
    if name == "hw" or name.startswith("hw."):
        return "hw"
    if name.startswith("agent.sim"):
        return "sim"
    if name.startswith("agent.net"):
        return "net"
    for cap in CAPABILITIES:
        if name == cap or name.startswith(cap + "."):
            return cap
    if name in GROUND:
        return "ground"
    return "process"


ALLOWED = {
    "hw": {"hw"},
    "net": {"net", "ground"},
    "ground": {"ground", "net", "hw"},
    "sim": {"sim", "ground", "net"},
    **{cap: {cap, "ground", "net", "hw"} for cap in CAPABILITIES},
    "process": {"process", "ground", "net", "hw", "sim", *CAPABILITIES},
}


def all_modules() -> list[Path]:
    return sorted(p for top in ("agent", "hw") for p in (ROOT / top).rglob("*.py"))


def arrows_against_the_grain(paths: list[Path]) -> list[str]:
    bad = []
    for path in paths:
        me = module_name(path)
        for target in sorted(imports_of(path)):
            # "from agent import config" names the submodule; "agent" alone is the version.
            there = room(target)
            if target == "agent":
                continue
            if there not in ALLOWED[room(me)]:
                bad.append(f"{me} ({room(me)}) imports {target} ({there})")
    return bad


def test_imports_point_one_way() -> None:
    assert arrows_against_the_grain(all_modules()) == []


def test_every_module_is_in_a_room_and_every_package_says_what_lives_there() -> None:
    for init in (ROOT / "agent").rglob("__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8")))
        assert doc and len(doc) > 40, f"{init.relative_to(ROOT)} needs a docstring saying what lives there"


OUTBOX_PARTS = ("intake", "storage", "corruption", "readonly", "rowcodec", "sidefile")


def test_the_outbox_parts_never_import_the_outbox() -> None:
    """agent/telemetry/outbox.py uses its parts (agent/telemetry/__init__.py); one importing it
    back would make the small modules a cycle around the big one."""
    for name in OUTBOX_PARTS:
        found = imports_of(ROOT / "agent" / "telemetry" / f"{name}.py")
        assert "agent.telemetry.outbox" not in found, f"agent/telemetry/{name}.py imports the outbox"


@pytest.mark.parametrize("source, expected", [
    ("from agent.signin import authenticator\n", "agent.telemetry.uploader (agent.telemetry) imports agent.signin"),
    ("import agent.service\n", "imports agent.service (process)"),
    ("def f():\n    from agent.sim.idp import SimIdp\n", "imports agent.sim.idp (sim)"),
])
def test_the_check_sees_a_backwards_arrow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          source: str, expected: str) -> None:
    fake = tmp_path / "agent" / "telemetry" / "uploader.py"
    fake.parent.mkdir(parents=True)
    fake.write_text(source)
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    found = arrows_against_the_grain([fake])
    assert found and expected in found[0]


def test_hw_never_imports_agent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "hw" / "oled.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("from agent.state import Snapshot\n")
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    assert arrows_against_the_grain([fake]) == ["hw.oled (hw) imports agent.state (ground)"]
