"""Errors caused by the user's input (files, configs, checkpoints) rather than by a bug.

The CLI prints them as one line naming what and where, without a traceback
(set LLMTRAIN_DEBUG=1 to see one). Every package raises these; none defines its own root.
"""


class UserError(Exception):
    """Bad input: a missing or corrupt file, an invalid config value, a mismatched tokenizer."""


class ConfigError(UserError):
    """A configuration value is missing, malformed, or inconsistent with another; names the key."""


class DataError(UserError):
    """A corpus, tokenizer or shard problem; the message names the file (and line, where known)."""


class CheckpointError(UserError):
    """A requested checkpoint is missing, incomplete, corrupt or incompatible; names the path."""


class JobError(Exception):
    """The job cannot go on for a reason outside this process (a rank stalled or died); printed as one
    line with exit code 1, so a launcher may restart the job (a UserError exits 2: restarting cannot help)."""


def check(ok: bool, key: str, message: str) -> None:
    """Raise ConfigError("<key>: <message>") unless `ok`: the one shape of a config complaint."""
    if not ok:
        raise ConfigError(f"{key}: {message}")


def check_choice(value, choices: tuple, key: str) -> None:
    """`value` must be one of `choices`; the message lists them all."""
    names = ", ".join(map(str, choices[:-1])) + f" or {choices[-1]}" if len(choices) > 1 else str(choices[0])
    check(value in choices, key, f"must be {names}, got {value!r}")
