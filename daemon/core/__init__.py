"""The request path and the models: Service (submit, dispatch, finish), one Model object
per model and their registry, requests and queues, slots, the daemon's handle on each
worker process and the fleet of them, the lifecycle (load, keep-alive, eviction), reload,
and the actuator the policy engine acts through. wiring.py puts it together."""
