"""The federation as a Flower app: the same client and server steps, over Flower messages.

* :mod:`.core` — the plain parts (no ``flwr`` import): run config -> training config, the
  user partitions, what a node builds once per run, its train and evaluate steps, the
  clients' memory as arrays for ``context.state``, and the run directory the server writes.
* :mod:`.messages` — state dicts, partial aggregates, prototypes <-> Flower records.
* :mod:`.client_app` / :mod:`.server_app` — the ``ClientApp`` and ``ServerApp``.
* :mod:`.deploy` — launch a local simulation or a loopback SuperLink + SuperNodes.

Flower is imported only in this package (and only by the modules that need it).
"""
