"""Entry points: one short module per peer role. Only this package parses argv, sets up logging,
handles signals and chooses exit codes; the library (``swarm``) does none of that."""
