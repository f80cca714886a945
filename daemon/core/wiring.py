"""Build the Service from its parts: the models, where their workers run, what the daemon
listens to, the policy engine and the hands it acts through. main.py calls build()."""

from __future__ import annotations

from pathlib import Path

from ..catalog.config import Config, trigger_of
from ..control.cpumonitor import CpuMonitor
from ..control.observer import Observer
from ..control.policyengine import PolicyEngine
from ..control.watches import Watches
from ..paths import default_state_dir
from ..placement.placer import Placement
from ..policies import CpuRead, LimitsSet
from .actuator import Actuator
from .fleet import Fleet
from .models import Models
from .service import Service
from .slots import Slots


def build(config: Config, socket_path: Path) -> Service:
    daemon = config.daemon
    models = Models()
    for model in config.models.values():
        models.add(model)
    observer = Observer(lambda: {w.name: w.scope.cgroup if w.scope else None
                                 for w in models.workers()})
    # The callbacks below reach the service once it is built; none runs before start().
    cpu = CpuMonitor(
        lambda: {w.name: w.pid for w in models.workers() if w.pid is not None},
        lambda: {w.name for w in models.workers() if not w.model.threads},
        observer.outside_cgroups, lambda: service.notify(CpuRead()),
        daemon.cpu_poll_interval, trigger_of(daemon.psi_cpu_trigger))
    watches = Watches(cpu, trigger_of(daemon.psi_system_trigger),
                      trigger_of(daemon.psi_scope_trigger), lambda key: service.pressure(key))
    fleet = Fleet(lambda: service.config, models, Placement(), watches,
                  lambda name: service.notify(LimitsSet(name)))
    slots = Slots(models)
    engine = PolicyEngine(list(config.policies))
    engine.bind(Actuator(models, slots, fleet, observer, cpu, engine.is_deferred))
    service = Service(config, socket_path, Path(daemon.state_dir or default_state_dir()),
                      models=models, slots=slots, engine=engine, fleet=fleet, watches=watches,
                      observer=observer)
    return service
