"""Types and formats that cross a boundary: the msgpack framing and error codes shared
with llmctl (protocol.py), the daemon <-> worker messages (messages.py), and values
that clients and config files write (durations.py). The worker process imports only this
package of the daemon's."""
