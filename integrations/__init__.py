"""compact-hooks integrations with DeepSpeed and diffusers (import the submodule you need)."""
