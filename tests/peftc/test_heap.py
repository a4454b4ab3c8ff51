"""peftc.heap: the stage's collections skip older objects, and nothing stays frozen after the stage."""

from __future__ import annotations

import gc
import subprocess
import sys
import weakref

import pytest

from peftc.heap import frozen_heap


@pytest.fixture(autouse=True)
def _unfrozen():
    assert gc.get_freeze_count() == 0, "a test before this one left the heap frozen"
    yield
    gc.unfreeze()


class _Cycle:
    def __init__(self) -> None:
        self.me = self


def test_a_frozen_heap_is_released_when_the_stage_ends() -> None:
    older = _Cycle()
    alive = weakref.ref(older)
    with frozen_heap():
        assert gc.get_freeze_count() > 0
        del older  # cyclic garbage that existed before the stage: the stage's collections skip it
        gc.collect()
        assert alive() is not None
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert alive() is None, "freed by the first collection after the stage"


def test_objects_made_inside_the_stage_are_still_collected() -> None:
    with frozen_heap():
        alive = weakref.ref(_Cycle())
        gc.collect()
        assert alive() is None


def test_a_caller_s_freeze_is_left_as_it_was() -> None:
    gc.freeze()
    frozen = gc.get_freeze_count()
    with frozen_heap(), frozen_heap():
        pass
    assert gc.get_freeze_count() == frozen


def test_the_stage_unfreezes_when_it_raises() -> None:
    with pytest.raises(RuntimeError), frozen_heap():
        raise RuntimeError("boom")
    assert gc.get_freeze_count() == 0


def test_only_the_command_freezes_for_its_exit() -> None:
    """``main([...])`` (tests, embedding) leaves the heap alone; the ``peftc`` command freezes it before exiting."""
    from peftc.cli import main

    with pytest.raises(SystemExit):
        main(["--version"])
    assert gc.get_freeze_count() == 0
    probe = (
        "import atexit, gc, sys\n"
        "atexit.register(lambda: print('frozen at exit:', gc.get_freeze_count() > 0))\n"
        "sys.argv = ['peftc', '--version']\n"
        "from peftc.cli import main\n"
        "main()\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert "frozen at exit: True" in out
