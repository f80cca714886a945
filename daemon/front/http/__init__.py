"""The OpenAI-compatible HTTP front: aiohttp in the daemon's own event loop.

app.py serves the routes, openai.py translates OpenAI request and response shapes to the
submit op and back, auth.py says who a peer is (SO_PEERCRED on the Unix socket, API keys
on TCP). Every request goes through the submit op's validation and Service.submit, the
same path as the msgpack socket's.
"""
