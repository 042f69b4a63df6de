"""The fastpath: block bytes between nodes over the fastest link (TCP, shared memory), NATS
staying the control plane. See docs/fastpath.md."""
