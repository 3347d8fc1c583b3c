"""The control API between a client (the CLI, Python, the vLLM connector) and the daemon running in a home:
its routes and typed bodies (routes.py), its limits (limits.py), the files a running daemon leaves in its
home (runfiles.py) and the client (client.py). The daemon's side is node/api.py; nothing here imports node/.
"""
