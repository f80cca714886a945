"""Types and formats that cross a boundary: the msgpack framing and error codes shared
with llmctl (protocol.py), the daemon <-> worker messages (messages.py), and values
that clients and config files write (durations.py), and one way to declare and check
such values (schema.py: the config's keys, the ops' fields, the policies' parameters).
The worker process imports only this package of the daemon's."""
