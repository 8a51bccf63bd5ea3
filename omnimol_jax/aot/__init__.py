"""Ahead-of-time compilation for hardware this host does not have: `omnimol compile` (topology.py: the devices
of a TPU slice or fake CPU devices; programs.py: the run's train step and generation program, compiled)."""
