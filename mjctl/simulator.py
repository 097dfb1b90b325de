"""Public entry point of the simulated midjourney-proxy (the implementation lives in ``mjctl.sim``).

>>> from mjctl.simulator import run_simulator_in_thread
>>> with run_simulator_in_thread(step_seconds=0.02) as handle:   # doctest: +SKIP
...     handle.url, handle.sim.stats()

Control endpoints (no secret needed), for tests and benchmarks in another process:
``GET /_sim/stats``, ``GET|POST /_sim/faults`` (JSON merge of fault rates and settings),
``POST /_sim/restart`` (forget every task) and ``POST /_sim/reset-stats``.
"""

from mjctl.sim import FAULTS, Simulator, SimulatorHandle, run_simulator_in_thread

__all__ = ["FAULTS", "Simulator", "SimulatorHandle", "run_simulator_in_thread"]
