"""The pool of GPU machines on NATS JetStream: the connection, the node registry, the JetStream
task queue, the dispatch lease of the orchestrators, and ``vramancer worker``."""
