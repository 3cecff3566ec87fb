"""The run's life: command line, job process, signals, checkpoints, resume, atomic writes."""
