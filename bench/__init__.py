"""ov bench: ``python3 bench/run.py`` (see bench/README.rst) measures ``ov run
--agent`` and ``ov agent`` and prints one table.

Modules: run (the command line), environment (the throwaway venv, vaults, agents,
processes and their cleanup), timing (wall time of whole processes: posix_spawn,
alternating loops, hyperfine), load (the protocol spoken with ovagent's own codec:
round trips and the load generator), procfs (CPU and memory from /proc), sections
(the table's six sections), stats (percentiles, summaries, targets, the Table),
profiling (perf stat, and --profile: py-spy, perf record, strace, importtime).
bench/programs/ holds programs run by path with the throwaway venv's python.
"""
