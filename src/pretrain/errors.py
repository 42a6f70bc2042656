"""The one base of every error whose message is meant for the user.

A bad spec, a missing job, an unreadable source, a storage path that would leave its folder: each
module raises its own subclass (`api.validation.SpecError`, `client.ClientError`,
`data.sources.DataError`, `storage.fs.StorageError`, `storage.paths.UnsafePath`), and the command
line (`clitools.friendly_errors`) catches this class alone and prints its message as one line. A
leaf: it imports nothing of the project, so any module can raise one without importing the CLI.
"""


class UserError(Exception):
    """Bad input or an environment problem the user can fix: its message names what and why,
    printed as one line (exit code 1)."""
