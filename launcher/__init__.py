"""compact-hooks launcher: the `compact-hooks` command and rank discovery."""
