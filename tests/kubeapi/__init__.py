"""A Kubernetes API emulator for tests: the API server's semantics over HTTP on loopback.

`ApiServer` (server.py) serves the REST paths, discovery, Table output and watches; `Store`
(store.py) keeps the objects with resourceVersion, generation, status subresource, finalizers,
graceful pod deletion and owner garbage collection; schema.py admits custom resources with their
CRD's structural schema and CEL rules. See docs/operations.md for what it does not emulate.
"""
