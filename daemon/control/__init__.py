"""What the daemon hears and decides: PSI triggers, CPU load, cgroup and process stats,
the kernel view the policies see, and the policy engine that runs them. Acting on a
decision is core's job: the engine hands each action to the Actuator it was given."""
