"""Plans of the shipped stacks, each made once per test process and shared by every test that reads it.

Planning a stack runs the whole program twice under mocks; dozens of tests read the same five plans,
so they share them (pytest-xdist runs one process per worker, so each worker plans them once). A test
must treat a shared plan as read-only; one that needs a changed stack plans its own copy
(the ``project`` fixture). Tests that prove planning itself (byte-identical runs, failures injected
into the program) call ``build_plan`` directly.
"""

from __future__ import annotations

import functools
from pathlib import Path

from fleet.plan.planner import Plan, build_plan

ROOT = Path(__file__).resolve().parent.parent


@functools.cache
def shipped_plan(stack: str) -> Plan:
    return build_plan(ROOT, stack)
