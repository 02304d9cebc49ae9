"""`WeakEngine`: the engine attribute of callbacks and schedules, held weakly. The engine holds
them in turn (`engine.history`, an attached schedule), and with a strong reference back each
pair would be a cycle: a dropped engine's native memory (device buffers on a GPU) would then
stay allocated until Python's cycle collector happened to run, where dropping the last
reference should free it at once, as it does for a torch module."""

import weakref

from .errors import StateError


class WeakEngine:
    """A data descriptor: ``obj.engine = e`` keeps a weak reference under the same name in
    obj.__dict__ (so vars(obj) still lists "engine"); ``obj.engine`` is the engine, or None where
    none was set. Reading it after the engine was freed gives None, or with `what` a StateError
    naming what needed it."""

    def __init__(self, what=None):
        self.what = what

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        ref = obj.__dict__.get(self.name)
        engine = None if ref is None else ref()
        if engine is None and ref is not None and self.what:
            raise StateError(f"the engine this {self.what} was built on no longer exists")
        return engine

    def __set__(self, obj, value):
        obj.__dict__[self.name] = None if value is None else weakref.ref(value)
