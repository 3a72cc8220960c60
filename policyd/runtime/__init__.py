"""What every front-end runs on: the supervisor and its workers, the config
and engine they are built from, exit codes.  Never imports a front-end."""
