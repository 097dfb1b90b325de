"""The simulated midjourney-proxy upstream, split by concern.

- ``png``    real PNG bytes per task (small by default, any size for benchmarks)
- ``tasks``  a task's fixed fate and its lifecycle computed lazily from the elapsed time
- ``engine`` the store and every answer, Java or C# flavoured, without a web framework
- ``push``   notifyHook delivery from background threads
- ``app``    :class:`Simulator` (settings, faults, stats, Bottle app) and ``run_simulator_in_thread``

``mjctl.simulator`` re-exports the public names; import from there.
"""

from mjctl.sim.app import FAULTS, Simulator, SimulatorHandle, run_simulator_in_thread

__all__ = ["FAULTS", "Simulator", "SimulatorHandle", "run_simulator_in_thread"]
