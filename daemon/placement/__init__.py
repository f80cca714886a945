"""Where workers run: scope backends (systemd through pystemd, a delegated cgroupfs
subtree, none), their limits (cpu.max, memory.high) and the CPUs a process may use."""
