"""The simulated midjourney-proxy upstream, for tests, benchmarks, `mjctl simulate` and `mjctl demo`.

>>> from mjctl.sim import run_simulator_in_thread
>>> with run_simulator_in_thread(step_seconds=0.02) as handle:   # doctest: +SKIP
...     handle.url, handle.sim.stats()

Control endpoints (no secret needed), for tests and benchmarks in another process:
``GET /_sim/stats``, ``GET|POST /_sim/faults`` (JSON merge of fault rates and settings),
``POST /_sim/restart`` (forget every task) and ``POST /_sim/reset-stats``.

Split by concern:

- ``png``    real PNG bytes per task (small by default, any size for benchmarks)
- ``tasks``  a task's fixed fate and its lifecycle computed lazily from the elapsed time
- ``engine`` the store and every answer, Java or C# flavoured, without a web framework
- ``push``   notifyHook delivery from background threads
- ``app``    :class:`Simulator` (settings, faults, stats, Bottle app) and ``run_simulator_in_thread``
"""

from mjctl.sim.app import FAULTS, Simulator, SimulatorHandle, run_simulator_in_thread

__all__ = ["FAULTS", "Simulator", "SimulatorHandle", "run_simulator_in_thread"]
