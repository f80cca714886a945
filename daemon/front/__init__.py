"""Who talks to the daemon: the msgpack control socket (server.py), the HTTP front
(http/), the ops both run (ops/, one per file), and the views of state they reply with
(views.py, prometheus.py). Everything here calls down into core/ through Service."""
