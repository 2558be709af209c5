"""The `ptqflow` command line (Typer): the apps, the commands, their option groups, and how errors end a command."""
