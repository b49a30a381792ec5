"""The `bert-compile` command: its commands, option groups (flags, defaults, the specs they build),
--config files and the doctor."""
