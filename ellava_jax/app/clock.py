"""Wall time of each phase of a run, and the part of it JAX spent compiling."""

from __future__ import annotations

import contextlib
import time

import jax
import numpy as np

_COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)


class PhaseClock:
    """Wall seconds of each phase of a run, and the part of them JAX spent compiling (tracing,
    lowering, XLA compilation: the union of those intervals, so nested traces count once).

        clock = PhaseClock()
        with clock("database"):
            ...
        clock.seconds() -> {"database_s": 12.1, "database_compile_s": 3.4}
    """

    def __init__(self):
        self.wall: dict[str, float] = {}
        self._spans: dict[str, list[tuple[float, float]]] = {}
        self._current: str | None = None

    def _listen(self, event: str, duration: float, **_):
        if self._current is not None and event in _COMPILE_EVENTS:
            end = time.perf_counter()
            self._spans[self._current].append((end - duration, end))

    def compile_seconds(self, name: str) -> float:
        total, reach = 0.0, -np.inf
        for a, b in sorted(self._spans.get(name, [])):
            if b > reach:
                total += b - max(a, reach)
                reach = b
        return total

    @contextlib.contextmanager
    def __call__(self, name: str):
        self._current, self._spans[name] = name, []
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.wall[name] = time.perf_counter() - t0
            jax.monitoring.unregister_event_duration_listener(self._listen)
            self._current = None

    def seconds(self) -> dict[str, float]:
        out = {}
        for name, wall in self.wall.items():
            out[f"{name}_s"] = wall
            out[f"{name}_compile_s"] = self.compile_seconds(name)
        return out
