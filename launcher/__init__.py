"""compact-hooks launcher: starting processes only (rank discovery, ``launch``, local ranks, emulated hosts)."""
