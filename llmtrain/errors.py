"""Errors caused by the user's input (files, configs, checkpoints) rather than by a bug.

The CLI prints them as one line naming what and where, without a traceback
(set LLMTRAIN_DEBUG=1 to see one).
"""


class UserError(Exception):
    """Bad input: a missing or corrupt file, an invalid config value, a mismatched tokenizer."""


class DataError(UserError):
    """A corpus, tokenizer or shard problem; the message names the file (and line, where known)."""


class CheckpointError(UserError):
    """A requested checkpoint is missing, incomplete or incompatible."""
